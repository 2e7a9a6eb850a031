"""The robustness evaluation papers report (docs/method.md section 4; docs/evaluation.md),
on a trained checkpoint.

`python main.py --mode=eval --config=... --workdir=DIR` restores the run's best (or latest)
checkpoint and runs the attacks of `config.eval.protocol` (`protocols.PROTOCOLS`), or
`config.eval.attacks` when set, over the first `config.eval.num_examples` test points,
batched and sharded over all devices. Each attack yields a per-point "still correct"
vector; the worst case is correct naturally and under every attack run (FSR's "Ensemble"
under the fsr protocol). Results go to `DIR/eval.json` and the table to `DIR/eval.md`; an
evaluation that ran AutoAttack also writes `DIR/robustbench.json` (`robustbench_record`).
"""
from __future__ import annotations

import dataclasses
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

from jaxdefense import attacks, data, defenses, models, parallel
from jaxdefense.config import validation
from jaxdefense.evaluation import autoattack_checks, protocols, robustbench_record
from jaxdefense.training import train_state
from jaxdefense.workdir import paths, run_config
from jaxdefense.attacks import auto_attack
from jaxdefense.evaluation.protocols import EvalAttack

# (x, labels, key) -> per point (correct, finite, {name: per-point values}), each (N,): an
# attack bound to a model; the dict holds what else the attack reports per point (e.g.
# AutoAttack's robustness after each of its attacks, for its checks).
PointsFn = Callable[[jax.Array, jax.Array, jax.Array],
                    tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def correct_points(model, variables, x_adv, labels) -> tuple[jax.Array, jax.Array]:
  """Per point, whether the deployed model classifies x' correctly, and whether x' and its
  logits are finite. A point where the attack went non-finite (NaN gradients make NaN
  steps) is never counted correct: argmax of NaN logits would pick a class anyway."""
  logits = attacks.deployed(model, variables)(x_adv).logits
  finite = (jnp.all(jnp.isfinite(logits), axis=-1)
            & jnp.all(jnp.isfinite(x_adv), axis=tuple(range(1, x_adv.ndim))))
  return (jnp.argmax(logits, -1) == labels) & finite, finite


def attacked_model(attack: EvalAttack, model, variables: dict) -> attacks.ModelFn:
  """The deterministic model a gradient attack differentiates: as deployed, or with CIFS's
  mask a function of the input (`attack.mask_gradient`)."""
  if attack.mask_gradient:
    model = model.clone(defense=dataclasses.replace(model.defense, mask_stop_gradient=False))
  return attacks.deployed(model, variables)


def bind(attack: EvalAttack, model, defense: defenses.DefenseConfig, variables: dict, *,
         eps: float, norm: str, count: Callable = lambda f: f) -> PointsFn:
  """`attack` on `model` with `variables` as a function of the batch; `count` wraps every
  model function the attack calls (`attacks.PassCounter.wrap`)."""
  deployed = attacks.deployed(model, variables)
  stochastic = lambda v, k: model.apply(variables, v, train=False, stochastic_mask=True,
                                        rngs={"gumbel": k})

  def fgsm(x, labels, key):
    del key
    return *correct_points(model, variables, attacks.fgsm(count(deployed), x, labels, eps=eps,
                                                    norm=norm), labels), {}

  def pgd(x, labels, key):
    model_fn = count(stochastic if attack.eot_samples else
                     attacked_model(attack, model, variables))
    x_adv = attacks.pgd(model_fn, x, labels, key, eps=eps, step_size=attack.step_size * eps,
                        steps=attack.steps, norm=norm, random_start=attack.random_start,
                        loss=attack.loss.fn(defense), eot_samples=attack.eot_samples)
    return *correct_points(model, variables, x_adv, labels), {}

  def autoattack(x, labels, key):
    model_fn = count(stochastic if attack.version == "rand" else deployed)
    result = attacks.autoattack(model_fn, x, labels, key, eps=eps, norm=norm,
                                version=attack.version, options=attack.options,
                                chunks=attack.chunks)
    # Scored on the model as deployed, like every other column.
    correct, finite = correct_points(model, variables, result.x_adv, labels)
    # For AutoAttack's checks: robust after each attack; an input gradient of exactly zero.
    gradient_fn = ((lambda v: model_fn(v, jax.random.fold_in(key, 2))) if attack.version == "rand"
                   else deployed)
    loss = attacks.losses.dlr if jax.eval_shape(gradient_fn, x).logits.shape[-1] >= 3 else \
        attacks.losses.cross_entropy
    gradient = attacks.input_gradient(gradient_fn, loss, x, labels)
    extras = {f"robust_after.{k}": v for k, v in result.robust_after.items()}
    extras["zero_gradient"] = jnp.all(gradient == 0, axis=tuple(range(1, x.ndim)))
    extras["clean"] = result.clean
    return result.robust & correct, finite, extras
  return {"fgsm": fgsm, "pgd": pgd, "autoattack": autoattack}[attack.method]


@dataclasses.dataclass
class BatchResult:
  correct: np.ndarray   # Per valid point: classified correctly under the attack.
  finite: np.ndarray    # Per valid point: x' and its logits finite.
  seconds: float
  forward: int          # Forward passes (examples x model calls) the attack made.
  backward: int
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # Per valid point.


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
      extras = {k[len("extra:"):]: f[k] for k in f.files if k.startswith("extra:")}
      return BatchResult(f["correct"], f["finite"], float(f["seconds"]), int(f["forward"]),
                         int(f["backward"]), extras)

  def put(self, name: str, index: int, result: BatchResult) -> None:
    if self.directory is None or jax.process_index() != 0:
      return
    buffer = io.BytesIO()
    fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "extras"}
    np.savez(buffer, **fields, **{f"extra:{k}": v for k, v in result.extras.items()})
    paths.write_bytes(self._path(name, index), buffer.getvalue())


def attack_points(name: str, fn: Callable[..., tuple[jax.Array, jax.Array, dict]],
                  variables: dict, images: np.ndarray, labels: np.ndarray, mesh, *,
                  batch_size: int, seed: int, record: Record, progress: bool = True
                  ) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
  """`fn(variables, x, labels, key, count=...)` over the points in batches (batch i with key
  fold_in(key(seed), i)), each batch's result taken from `record` if there, else computed
  and recorded: per point correct; the count of points with non-finite x' or logits,
  seconds, forward and backward passes; the attack's other per-point values."""
  counter = attacks.PassCounter()
  step = jax.jit(lambda v, batch, key: fn(v, batch["x"], batch["labels"], key,
                                          count=counter.wrap))
  out, extras, totals = [], [], {"non_finite_points": 0, "time_s": 0.0, "forward_passes": 0,
                                 "backward_passes": 0}
  batches = list(data.eval_batches(images, labels, batch_size,
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
      key = jax.random.fold_in(jax.random.key(seed), i)
      correct, finite, more = jax.tree.map(parallel.to_host, step(variables, batch, key))
      jax.effects_barrier()  # The pass-count callbacks of this batch have all run.
      valid = parallel.to_host(batch["mask"])
      result = BatchResult(correct[valid], finite[valid], time.time() - start,
                           counter.forward - passes[0], counter.backward - passes[1],
                           {k: v[valid] for k, v in more.items()})
      record.put(name, i, result)
    out.append(result.correct)
    extras.append(result.extras)
    totals["non_finite_points"] += int(np.sum(~result.finite))
    totals["time_s"] += result.seconds
    totals["forward_passes"] += result.forward
    totals["backward_passes"] += result.backward
  return (np.concatenate(out), totals,
          {k: np.concatenate([e[k] for e in extras]) for k in extras[0]} if extras else {})


def _robust_after(extras: dict[str, np.ndarray]) -> dict[str, float]:
  """AutoAttack's robust accuracy after each of its attacks, from "clean", in run order."""
  ran = [k.split(".", 1)[1] for k in extras if k.startswith("robust_after.")]
  order = [a for a in auto_attack.ATTACKS if a in ran]
  return {"clean": float(np.mean(extras["clean"])),
          **{a: float(np.mean(extras[f"robust_after.{a}"])) for a in order}}


def autoattack_checks_of(attack: EvalAttack, model, variables, images: np.ndarray,
                         labels: np.ndarray, mesh, extras: dict[str, np.ndarray],
                         batch_size: int, norm: str) -> list[autoattack_checks.Check]:
  """AutoAttack's checks (`autoattack_checks`) of one AutoAttack column: on the model's
  outputs for the first batch (drawn `RANDOMIZED_DRAWS` times, by separate calls), and on
  the attack's per-point results."""
  x, y, mask = next(iter(data.eval_batches(images, labels, batch_size,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())))
  batch = parallel.shard_batch(mesh, {"x": x, "labels": y, "mask": mask})
  forward = jax.jit(lambda v, x: attacks.deployed(model, v)(data.to_float(x)).logits)
  valid = parallel.to_host(batch["mask"])
  draws = [parallel.to_host(forward(variables, batch["x"]))[valid]
           for _ in range(autoattack_checks.RANDOMIZED_DRAWS if attack.version != "rand" else 1)]
  checks = [] if attack.version == "rand" else [
      autoattack_checks.randomized(draws, parallel.to_host(batch["labels"])[valid])]
  ran, options = auto_attack.check_options(attack.version, norm, attack.options)
  checks += [autoattack_checks.probabilities(draws[0]),
             autoattack_checks.zero_gradients(extras["zero_gradient"], extras["clean"]),
             autoattack_checks.square_lowered(_robust_after(extras)),
             autoattack_checks.classes(draws[0].shape[-1], ran, options)]
  return checks


def evaluate(config: ml_collections.ConfigDict, model, variables, images: np.ndarray,
             labels: np.ndarray, mesh, *, names: tuple[str, ...] | None = None,
             progress: bool = True, record: Record = Record(None)) -> dict[str, Any]:
  """Per-attack and worst-case accuracy of `model` on (images, labels) (uint8 NHWC);
  (attack, batch) results found in `record` are taken from it, new ones added."""
  e = config.eval
  validation.check_eval(config, mesh)
  defense = defenses.from_config(config)
  suite = protocols.suite(e)
  if names is None:
    names = protocols.attack_names(e)
  else:
    validation.check_attacks(config, names)
  points = lambda name, fn: attack_points(name, fn, variables, images, labels, mesh,
                                          batch_size=e.batch_size, seed=e.seed, record=record,
                                          progress=progress)
  natural, totals, _ = points("natural",
                              lambda v, x, y, k, count: (*correct_points(model, v, x, y), {}))
  results: dict[str, Any] = {
      "natural": {"title": "Natural", "accuracy": float(natural.mean()),
                  "num_points": int(natural.size),
                  "non_finite_points": totals["non_finite_points"], "time_s": totals["time_s"]}}
  worst = natural.copy()
  for name in names:
    attack = suite[name]
    if not attack.applies(defense.name):
      results[name] = {"title": attack.title,
                       "skipped": f"not applicable to defense {defense.name!r}"}
      continue
    fn = lambda v, x, y, k, count, attack=attack: bind(
        attack, model, defense, v, eps=e.eps, norm=e.norm, count=count)(x, y, k)
    correct, totals, extras = points(name, fn)
    correct &= natural  # Robust: correct naturally and under the attack.
    worst &= correct
    results[name] = {"title": attack.title, "accuracy": float(correct.mean()),
                     "num_points": int(correct.size), "eps": e.eps, "norm": e.norm,
                     "seed": e.seed, **totals, **attack.report()}
    if attack.method == "autoattack":
      checks = autoattack_checks_of(attack, model, variables, images, labels, mesh, extras,
                                    e.batch_size, e.norm)
      results[name]["robust_after"] = {k: float(v) for k, v in _robust_after(extras).items()}
      results[name]["checks"] = [c.report() for c in checks]
      results[name]["warnings"] = [c.warning for c in checks if not c.passed]
      for warning in results[name]["warnings"]:
        if jax.process_index() == 0:
          print(f"warning: {attack.title}: {warning}", flush=True)
  results["worst_case"] = {"title": protocols.worst_case_title(e),
                           "accuracy": float(worst.mean()), "num_points": int(worst.size),
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
  notes += [f"- {r['title']}: warning: {w}" for _, r in cols for w in r.get("warnings", ())]
  cost = ["| attack | seconds | forward passes | backward passes |", "|---|---|---|---|"]
  cost += [f"| {r['title']} | {r['time_s']:.1f} | {r['forward_passes']} | "
           f"{r['backward_passes']} |" for _, r in cols if "forward_passes" in r]
  setup = ["| attack | method | steps | step (x eps) | random start | loss | source |",
           "|---|---|---|---|---|---|---|"]
  setup += [f"| {r['title']} | {r['method']} | {r['steps']} | "
            f"{r['step_size_x_eps']:.4g} | {'yes' if r['random_start'] else 'no'} | "
            f"{r['loss']}{_extras(r)} | {r['source']} |" if r["method"] != "autoattack" else
            f"| {r['title']} | AutoAttack ({r['version']}) | | | | {_budgets(r['options'])} | "
            f"{r['source']} |" for _, r in cols if "method" in r]
  sections = [cost, setup]
  return "\n".join([caption, "", head, rule, row, *([""] + notes if notes else []), "",
                    *[line for table in sections if len(table) > 2 for line in table + [""]]])


def _extras(r: dict[str, Any]) -> str:
  extras = ([f"EOT over {r['eot_samples']} mask draws"] if r.get("eot_samples") else []) + (
      ["through the mask's input dependence"] if r.get("mask_gradient") else [])
  return "".join(f"; {x}" for x in extras)


def _budgets(options: dict[str, dict[str, Any]]) -> str:
  return "; ".join(f"{name} " + ", ".join(f"{k} {v}" for k, v in budget.items())
                   for name, budget in options.items())


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, which: str = "best") -> dict:
  """Restores the run in `workdir` and writes eval.json and eval.md there."""
  workdir = paths.resolve(workdir)
  mesh = parallel.make_mesh()
  validation.validate(config, mesh)
  run_config.check_trained(workdir, config)
  e = config.eval
  dataset = data.from_config(config)
  # eval.dtype: the model's compute dtype for evaluation; inputs, perturbations, logits and
  # losses stay float32 (the backbones cast inputs in and logits out).
  dtype = e.dtype or config.model.dtype
  model = models.from_config(config, dataset.num_classes, dtype=dtype)
  variables, step = train_state.restore_variables(config, workdir, which, model, dataset.image_shape,
                                            mesh)
  n = e.num_examples or len(dataset.test_labels)
  images, labels = dataset.test_images[:n], dataset.test_labels[:n]
  # Finished batches of an interrupted evaluation of this step with this config are reused.
  identity = json.dumps({"step": step, "eval": e.to_dict(), "points": len(labels),
                         "model": run_config.parameter_fields(config)}, sort_keys=True, default=str)
  progress = workdir / "eval_progress" / hashlib.sha256(identity.encode()).hexdigest()[:16]
  norm_title = protocols.NORM_TITLES[e.norm]
  if jax.process_index() == 0:
    print(f"evaluating {which} checkpoint (step {step}) of {workdir} on {len(labels)} "
          f"{dataset.name} test points, eps {e.eps:.4f} {norm_title}"
          + (" (resuming: finished batches reused)" if progress.exists() else ""), flush=True)
  results = evaluate(config, model, variables, images, labels, mesh, record=Record(progress))
  report = {"config": config.name, "checkpoint": which, "step": step,
            "defense": config.defense.name, "arch": config.model.arch, "data": dataset.name,
            "eps": e.eps, "norm": e.norm, "protocol": e.protocol, "dtype": dtype,
            "results": results}
  if jax.process_index() == 0:
    paths.write_text(workdir / "eval.json", json.dumps(report, indent=2))
    eps = f"{255 * e.eps:g}/255" if e.norm == "linf" else f"{e.eps:g}"
    caption = (f"{config.name}: {config.model.arch} + {config.defense.name}, {dtype} compute, "
               f"{dataset.name}, {len(labels)} test points, eps {eps} {norm_title}, {which} "
               f"checkpoint (step {step}); accuracy (%)")
    table = markdown_table(results, caption)
    paths.write_text(workdir / "eval.md", table)
    print(table, flush=True)
    listing = robustbench_record.record(report, config)
    if listing is not None:
      paths.write_text(workdir / "robustbench.json", json.dumps(listing, indent=2))
      print(f"robustbench.json: RobustBench's model_info record (fill in "
            f"{', '.join(robustbench_record.TO_FILL)})"
            + "".join(f"; note: {check}" for check in listing["checks"]), flush=True)
    if progress.exists():
      progress.rmtree()
  return report
