"""The robustness evaluation papers report (METHOD.md section 4), on a trained checkpoint.

`python main.py --mode=eval --config=... --workdir=DIR` restores the run's best (or latest)
checkpoint and runs the attacks of `config.eval.protocol` (fsr, cas, cifs, autoattack or full;
`PROTOCOLS`), or `config.eval.attacks` when set, over the first `config.eval.num_examples`
test points, batched and sharded over all devices. Each attack yields a per-point "still
correct" vector; the worst case is correct naturally and under every attack run (FSR's
"Ensemble" under the fsr protocol). Results go to `DIR/eval.json` and the table to
`DIR/eval.md`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath

from jaxdefense import attacks, data, defenses, errors, guard, parallel, paths, train
from jaxdefense.attacks.autoattack import autoattack
from jaxdefense.attacks import losses


@dataclasses.dataclass(frozen=True)
class Attack:
  """One column of the table: how to find x' for a batch, and what it is."""
  title: str
  run: Callable[..., tuple[jax.Array, jax.Array]]  # (model, defense, variables, x, labels,
  #   key, *, eps, norm, count) -> (correct, finite), each (N,) (see `_correct`); `count`
  #   wraps every model function the attack calls (PassCounter.wrap).
  params: dict[str, Any]
  applies: Callable[[str], bool] = lambda defense: True
  norms: tuple[str, ...] = ("linf",)  # Threat models it is defined for.


def _correct(model, variables, x_adv, labels) -> tuple[jax.Array, jax.Array]:
  """Per point, whether the deployed model classifies x' correctly, and whether x' and its
  logits are finite. A point where the attack went non-finite (NaN gradients make NaN
  steps) is never counted correct: argmax of NaN logits would pick a class anyway."""
  logits = attacks.deployed(model, variables)(x_adv).logits
  finite = (jnp.all(jnp.isfinite(logits), axis=-1)
            & jnp.all(jnp.isfinite(x_adv), axis=tuple(range(1, x_adv.ndim))))
  return (jnp.argmax(logits, -1) == labels) & finite, finite


def _uncounted(model_fn):
  return model_fn


def _pgd_attack(steps: int, step_fraction: float, random_start: bool, loss: str = "ce",
                eot_samples: int = 0, mask_gradient: bool = False):
  """PGD on `loss`; `mask_gradient`: through CIFS's mask as a function of the input (the
  relevance at the live pooled features), which the authors' attacks never see."""
  def run(model, defense, variables, x, labels, key, *, eps, norm="linf", count=_uncounted):
    loss_fn = {"ce": losses.cross_entropy, "cw": losses.cw(50.0),
               "defense": losses.defense_loss(defense),
               "heads_ce": losses.with_aux_heads(losses.cross_entropy, defense.beta),
               "heads_cw0": losses.with_aux_heads(losses.cw(0.0), defense.beta),
               "heads_cw50": losses.with_aux_heads(losses.cw(50.0), defense.beta)}[loss]
    attacked = model
    if mask_gradient:
      attacked = model.clone(defense=dataclasses.replace(model.defense,
                                                         mask_stop_gradient=False))
    model_fn = count(attacks.deployed(attacked, variables))
    if eot_samples:
      model_fn = count(lambda v, k: model.apply(variables, v, train=False,
                                                stochastic_mask=True, rngs={"gumbel": k}))
    x_adv = attacks.pgd(model_fn, x, labels, key, eps=eps, step_size=step_fraction * eps,
                        steps=steps, norm=norm, random_start=random_start, loss=loss_fn,
                        eot_samples=eot_samples)
    return _correct(model, variables, x_adv, labels)
  return run


def _fgsm(model, defense, variables, x, labels, key, *, eps, norm="linf", count=_uncounted):
  del defense, key, norm
  return _correct(model, variables,
                  attacks.fgsm(count(attacks.deployed(model, variables)), x, labels, eps=eps),
                  labels)


def _autoattack(version: str, options: dict, chunks: int = 1):
  def run(model, defense, variables, x, labels, key, *, eps, norm="linf", count=_uncounted):
    del defense
    if version == "rand":
      model_fn = count(lambda v, k: model.apply(variables, v, train=False,
                                                stochastic_mask=True, rngs={"gumbel": k}))
    else:
      model_fn = count(attacks.deployed(model, variables))
    result = autoattack(model_fn, x, labels, key, eps=eps, norm=norm, version=version,
                        options=options or None, chunks=chunks)
    # Scored on the model as deployed, like every other column.
    correct, finite = _correct(model, variables, result.x_adv, labels)
    return result.robust & correct, finite
  return run


# The CAS evaluation's PGD / C&W step is 0.003 for its eps 0.031; other eps scale it.
CAS_STEP_FRACTION = 0.003 / 0.031
# The attacks of each evaluation protocol (`config.eval.protocol`; `config.eval.attacks`,
# when not empty, replaces the list). fsr: wkim97/FSR test.py; cas: bymavis/CAS_ICLR2021
# Trades/pgd_attack_cifar10_cas.py; cifs: HanshuYAN/CIFS CIFAR10_Res18_CIFS_test.py (main
# head and joint loss); autoattack: RobustBench's; full: everything (of CIFS's joint
# attacks the PGD-20 and C&W), with the attacks on each defense's own loss, through
# CIFS's mask as a function of the input and through FSR's stochastic mask.
PROTOCOLS = {
    "fsr": ("fgsm", "pgd20", "pgd100", "cw"),
    "cas": ("cas_fgsm", "cas_pgd20", "cas_cw"),
    "cifs": ("fgsm", "pgd20", "pgd100", "cw", "cifs_fgsm", "cifs_pgd20", "cifs_pgd100",
             "cifs_cw"),
    "autoattack": ("autoattack",),
    "full": ("fgsm", "pgd20", "pgd100", "cw", "cas_fgsm", "cas_pgd20", "cas_cw", "cifs_pgd20",
             "cifs_cw", "autoattack", "adaptive", "cifs_mask_pgd100", "eot"),
}
JOINT = "CE + beta x mean probe CE"
BOTH = ("linf", "l2")
NORMS = BOTH
NORM_TITLES = {"linf": "L-inf", "l2": "L2"}


def attack_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The attacks `config.eval` asks for: its `attacks` if any, else its protocol's."""
  e = config.eval
  if e.protocol not in PROTOCOLS:
    raise ValueError(f"unknown eval.protocol {e.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
  return tuple(e.attacks) or PROTOCOLS[e.protocol]


def suite(config: ml_collections.ConfigDict) -> dict[str, Attack]:
  """Every attack the evaluation knows, configured from `config.eval`."""
  e = config.eval
  aa_options = {k.replace("_", "-"): dict(v) for k, v in e.autoattack_options.items()}
  rand_options = {k: dict(aa_options.get(k, {})) for k in ("apgd-ce", "apgd-dlr")}
  for options in rand_options.values():
    options.setdefault("eot_samples", e.eot_samples)
  return {
      "fgsm": Attack("FGSM", _fgsm, {}),
      "pgd20": Attack("PGD-20", _pgd_attack(20, 0.1, False),
                      {"steps": 20, "step_size": "0.1 eps", "random_start": False},
                      norms=BOTH),
      "pgd100": Attack("PGD-100", _pgd_attack(100, 0.1, False),
                       {"steps": 100, "step_size": "0.1 eps", "random_start": False},
                       norms=BOTH),
      "pgd20_rs": Attack("PGD-20 (rs)", _pgd_attack(20, 0.25, True),
                         {"steps": 20, "step_size": "0.25 eps", "random_start": True},
                         norms=BOTH),
      "cw": Attack("C&W", _pgd_attack(30, 0.1, False, loss="cw"),
                   {"steps": 30, "step_size": "0.1 eps", "loss": "cw (kappa 50)"}),
      "autoattack": Attack("AA", _autoattack("standard", aa_options,
                                             e.get("autoattack_chunks", 1)),
                           {"version": "standard", "options": aa_options}, norms=BOTH),
      "autoattack_rand": Attack("AA (rand)", _autoattack("rand", rand_options),
                                {"version": "rand", "options": rand_options},
                                applies=lambda d: d == "fsr", norms=BOTH),
      "adaptive": Attack(f"Adaptive PGD-{e.adaptive_steps}",
                         _pgd_attack(e.adaptive_steps, 0.1, False, loss="defense"),
                         {"steps": e.adaptive_steps, "step_size": "0.1 eps",
                          "loss": "defense training loss"},
                         applies=lambda d: d != "none", norms=BOTH),
      # The CAS protocol (Bai et al., Trades/pgd_attack_cifar10_cas.py): every attack from a
      # random start, on the main output's loss + CAS beta x the mean over the CAS heads.
      "cas_fgsm": Attack("FGSM (CAS)", _pgd_attack(1, 1.0, True, loss="heads_ce"),
                         {"steps": 1, "step_size": "eps", "random_start": True,
                          "loss": "CE + beta x mean CAS-head CE"}),
      "cas_pgd20": Attack("PGD-20 (CAS)", _pgd_attack(20, CAS_STEP_FRACTION, True,
                                                      loss="heads_ce"),
                          {"steps": 20, "step_size": "0.003 / 0.031 eps", "random_start": True,
                           "loss": "CE + beta x mean CAS-head CE"}),
      "cas_cw": Attack("C&W (CAS)", _pgd_attack(20, CAS_STEP_FRACTION, True, loss="heads_cw0"),
                       {"steps": 20, "step_size": "0.003 / 0.031 eps", "random_start": True,
                        "loss": "C&W kappa 0 + beta x mean over the CAS heads"}),
      # The CIFS protocol (Yan et al., CIFAR10_Res18_CIFS_test.py --is_joint 1): FSR's
      # attacks (which its code inherited) on the main output + beta x the mean over the
      # probes; `cifs_mask_pgd100` adds the mask's input dependence (ours).
      "cifs_fgsm": Attack("FGSM (joint)", _pgd_attack(1, 1.0, False, loss="heads_ce"),
                          {"steps": 1, "step_size": "eps", "loss": JOINT},
                          applies=lambda d: d in defenses.LABELLED),
      "cifs_pgd20": Attack("PGD-20 (joint)", _pgd_attack(20, 0.1, False, loss="heads_ce"),
                           {"steps": 20, "step_size": "0.1 eps", "random_start": False,
                            "loss": JOINT}, applies=lambda d: d in defenses.LABELLED),
      "cifs_pgd100": Attack("PGD-100 (joint)", _pgd_attack(100, 0.1, False, loss="heads_ce"),
                            {"steps": 100, "step_size": "0.1 eps", "random_start": False,
                             "loss": JOINT}, applies=lambda d: d in defenses.LABELLED),
      "cifs_cw": Attack("C&W (joint)", _pgd_attack(30, 0.1, False, loss="heads_cw50"),
                        {"steps": 30, "step_size": "0.1 eps", "loss": "C&W kappa 50, joint"},
                        applies=lambda d: d in defenses.LABELLED),
      "cifs_mask_pgd100": Attack("PGD-100 (joint, mask gradient)",
                                 _pgd_attack(100, 0.1, False, loss="heads_ce",
                                             mask_gradient=True),
                                 {"steps": 100, "step_size": "0.1 eps", "random_start": False,
                                  "loss": JOINT, "mask": "differentiated w.r.t. the input"},
                                 applies=lambda d: d == "cifs"),
      "eot": Attack(f"EOT PGD-20 (x{e.eot_samples})",
                    _pgd_attack(20, 0.1, False, eot_samples=e.eot_samples),
                    {"steps": 20, "step_size": "0.1 eps", "eot_samples": e.eot_samples,
                     "mask": "train-mode stochastic Gumbel mask"},
                    applies=lambda d: d == "fsr"),
  }


def check_workdir(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Before any data is loaded: the workdir has checkpoints, of a model this config builds."""
  directory = workdir / "checkpoints"
  if not directory.exists():
    raise errors.NoCheckpoint(f"no checkpoint in {directory}: train first with "
                              f"--mode=train --workdir={workdir}")
  guard.check_config(workdir, config)


@dataclasses.dataclass
class BatchResult:
  correct: np.ndarray   # Per valid point: classified correctly under the attack.
  finite: np.ndarray    # Per valid point: x' and its logits finite.
  seconds: float
  forward: int          # Forward passes (examples x model calls) the attack made.
  backward: int


class Record:
  """Finished (attack, batch) results in a directory, so that an interrupted evaluation
  continues where it stopped: one `<attack>.<batch>.npz` per batch (per point correct,
  finite; seconds), written whole by process 0. Batches are seeded by their index, so a
  batch run again gives the same result."""

  def __init__(self, directory: epath.Path | None):
    self.directory = directory

  def _path(self, name: str, index: int) -> epath.Path:
    return self.directory / f"{name}.{index:05d}.npz"

  def get(self, name: str, index: int) -> BatchResult | None:
    if self.directory is None or not self._path(name, index).exists():
      return None
    with np.load(io.BytesIO(self._path(name, index).read_bytes())) as f:
      return BatchResult(f["correct"], f["finite"], float(f["seconds"]), int(f["forward"]),
                         int(f["backward"]))

  def put(self, name: str, index: int, result: BatchResult) -> None:
    if self.directory is None or jax.process_index() != 0:
      return
    buffer = io.BytesIO()
    np.savez(buffer, **dataclasses.asdict(result))
    paths.write_bytes(self._path(name, index), buffer.getvalue())


def evaluate(config: ml_collections.ConfigDict, model, variables, images: np.ndarray,
             labels: np.ndarray, mesh, *, names: tuple[str, ...] | None = None,
             progress: bool = True, record: Record = Record(None)) -> dict[str, Any]:
  """Per-attack and worst-case accuracy of `model` on (images, labels) (uint8 NHWC);
  (attack, batch) results found in `record` are taken from it, new ones added."""
  e = config.eval
  defense = train.defense_config(config)
  attacks_by_name = suite(config)
  names = attack_names(config) if names is None else names
  unknown = [n for n in names if n not in attacks_by_name]
  if unknown:
    raise ValueError(f"unknown eval attack(s) {unknown}; allowed: {', '.join(attacks_by_name)}")
  if e.get("norm", "linf") not in NORMS:
    raise ValueError(f"unknown eval.norm {e.norm!r}; allowed: {', '.join(NORMS)}")
  norm = e.get("norm", "linf")
  linf_only = [n for n in names if norm not in attacks_by_name[n].norms]
  if linf_only:
    allowed = [n for n, a in attacks_by_name.items() if norm in a.norms]
    raise ValueError(f"eval.norm={norm!r}: attack(s) {linf_only} of protocol "
                     f"{e.protocol!r} are L-inf only; use --config.eval.protocol=autoattack "
                     f"or --config.eval.attacks from {', '.join(allowed)}")
  parallel.check_batch_size(e.batch_size, mesh, "eval.batch_size")
  chunks = e.get("autoattack_chunks", 1)
  if not isinstance(chunks, int) or chunks < 1:
    raise ValueError(f"eval.autoattack_chunks must be an integer >= 1, got {chunks!r}")
  if chunks > 1 and mesh.size > 1:
    raise ValueError(f"eval.autoattack_chunks={chunks} gathers AutoAttack's robust points "
                     f"into batches that are not split over the mesh; with {mesh.size} "
                     f"devices use eval.autoattack_chunks=1")
  if e.eps < 0:
    raise ValueError(f"eval.eps must be >= 0, got {e.eps}")

  def per_point(name: str, fn) -> tuple[np.ndarray, dict[str, Any]]:
    """Per point correct; the count of points with non-finite x' or logits, seconds,
    forward and backward passes."""
    counter = attacks.PassCounter()
    step = jax.jit(lambda v, batch, key: fn(v, batch["x"], batch["labels"], key,
                                            count=counter.wrap))
    out, totals = [], {"non_finite_points": 0, "time_s": 0.0, "forward_passes": 0,
                       "backward_passes": 0}
    batches = list(data.eval_batches(images, labels, e.batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()))
    bar = tqdm.tqdm(batches, desc=name, unit="batch",
                    disable=not progress or jax.process_index() != 0)
    for i, (x, y, mask) in enumerate(bar):
      result = record.get(name, i)
      if result is None:
        start, passes = time.time(), (counter.forward, counter.backward)
        batch = parallel.shard_batch(mesh, {"x": x, "labels": y, "mask": mask})
        batch["x"] = data.to_float(batch["x"])
        key = jax.random.fold_in(jax.random.key(e.seed), i)
        correct, finite = map(parallel.to_host, step(variables, batch, key))
        jax.effects_barrier()  # The pass-count callbacks of this batch have all run.
        valid = parallel.to_host(batch["mask"])
        result = BatchResult(correct[valid], finite[valid], time.time() - start,
                             counter.forward - passes[0], counter.backward - passes[1])
        record.put(name, i, result)
      out.append(result.correct)
      totals["non_finite_points"] += int(np.sum(~result.finite))
      totals["time_s"] += result.seconds
      totals["forward_passes"] += result.forward
      totals["backward_passes"] += result.backward
    return np.concatenate(out), totals

  natural_fn = lambda v, x, y, k, count: _correct(model, v, x, y)
  results: dict[str, Any] = {}
  natural, totals = per_point("natural", natural_fn)
  results["natural"] = {"title": "Natural", "accuracy": float(natural.mean()),
                        "num_points": int(natural.size),
                        "non_finite_points": totals["non_finite_points"],
                        "time_s": totals["time_s"]}
  worst = natural.copy()
  for name in names:
    attack = attacks_by_name[name]
    if not attack.applies(defense.name):
      results[name] = {"title": attack.title, "skipped": f"not applicable to defense "
                                                         f"{defense.name!r}"}
      continue
    correct, totals = per_point(name, functools.partial(attack.run, model, defense, eps=e.eps,
                                                        norm=norm))
    correct &= natural  # Robust: correct naturally and under the attack.
    worst &= correct
    results[name] = {"title": attack.title, "accuracy": float(correct.mean()),
                     "num_points": int(correct.size), "eps": e.eps, "norm": norm,
                     "seed": e.seed, **totals, **attack.params}
  # The per-point worst case over every attack run. FSR's "Ensemble" is this over its
  # protocol's four attacks; over any other set it is named for what it is.
  title = "Ensemble (FSR)" if e.protocol == "fsr" and not tuple(e.attacks) else "Worst case"
  results["worst_case"] = {"title": title, "accuracy": float(worst.mean()),
                           "num_points": int(worst.size),
                           "attacks": [n for n in names if "accuracy" in results[n]]}
  return results


def markdown_table(results: dict[str, Any], caption: str) -> str:
  """The papers' table: one row, a column per attack in run order, the worst case last;
  then each attack's cost: seconds, forward and backward passes (examples x model calls)."""
  cols = [(r["title"], r) for r in results.values()]
  head = "| " + " | ".join(t for t, _ in cols) + " |"
  rule = "|" + "---|" * len(cols)
  cell = lambda r: f"{100 * r['accuracy']:.2f}" if "accuracy" in r else "n/a"
  row = "| " + " | ".join(cell(r) for _, r in cols) + " |"
  notes = [f"- {r['title']}: {r['skipped']}" for _, r in cols if "skipped" in r]
  notes += [f"- {r['title']}: {r['non_finite_points']} point(s) with non-finite x' or logits, "
            "counted as not robust" for _, r in cols if r.get("non_finite_points")]
  cost = ["| attack | seconds | forward passes | backward passes |", "|---|---|---|---|"]
  cost += [f"| {r['title']} | {r['time_s']:.1f} | {r['forward_passes']} | "
           f"{r['backward_passes']} |" for _, r in cols if "forward_passes" in r]
  return "\n".join([caption, "", head, rule, row, *([""] + notes if notes else []), "",
                    *(cost + [""] if len(cost) > 2 else [])])


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, which: str = "best") -> dict:
  """Restores the run in `workdir` and writes eval.json and eval.md there."""
  workdir = paths.resolve(workdir)
  mesh = parallel.make_mesh()
  train.validate(config, mesh)
  check_workdir(config, workdir)
  dataset = train.load_data(config)
  # eval.dtype: the model's compute dtype for evaluation; inputs, perturbations, logits and
  # losses stay float32 (the backbones cast inputs in and logits out).
  model = train.build_model(config, dataset.num_classes, dtype=config.eval.get("dtype") or None)
  variables, step = train.restore_variables(config, workdir, which, model, dataset.image_shape,
                                            mesh)
  n = config.eval.num_examples or len(dataset.test_labels)
  images, labels = dataset.test_images[:n], dataset.test_labels[:n]
  # Finished batches of an interrupted evaluation of this step with this config are reused.
  identity = json.dumps({"step": step, "eval": config.eval.to_dict(), "points": len(labels),
                         "model": guard.parameter_fields(config)}, sort_keys=True, default=str)
  progress = workdir / "eval_progress" / hashlib.sha256(identity.encode()).hexdigest()[:16]
  if jax.process_index() == 0:
    print(f"evaluating {which} checkpoint (step {step}) of {workdir} on {len(labels)} "
          f"{dataset.name} test points, eps {config.eval.eps:.4f} "
          f"{NORM_TITLES[config.eval.get('norm', 'linf')]}"
          + (" (resuming: finished batches reused)" if progress.exists() else ""), flush=True)
  results = evaluate(config, model, variables, images, labels, mesh, record=Record(progress))
  report = {"config": config.get("name", ""), "checkpoint": which, "step": step,
            "defense": config.defense.name, "arch": config.model.arch,
            "data": dataset.name, "eps": config.eval.eps,
            "norm": config.eval.get("norm", "linf"),
            "protocol": config.eval.protocol,
            "dtype": config.eval.get("dtype") or config.model.dtype, "results": results}
  if jax.process_index() == 0:
    paths.write_text(workdir / "eval.json", json.dumps(report, indent=2))
    eps = (f"{255 * config.eval.eps:g}/255" if report["norm"] == "linf"
           else f"{config.eval.eps:g}")
    caption = (f"{config.get('name', '')}: {config.model.arch} + {config.defense.name}, "
               f"{report['dtype']} compute, {dataset.name}, {len(labels)} test points, "
               f"eps {eps} {NORM_TITLES[report['norm']]}, {which} checkpoint (step {step}); "
               "accuracy (%)")
    table = markdown_table(results, caption)
    paths.write_text(workdir / "eval.md", table)
    print(table, flush=True)
    if progress.exists():
      progress.rmtree()
  return report
