"""The robustness evaluation papers report (docs/method.md section 4; docs/evaluation.md),
on a trained checkpoint.

`python main.py --mode=eval --config=... --workdir=DIR` restores the run's best (or latest)
checkpoint and runs the attacks of `config.eval.protocol` (`protocols.PROTOCOLS`), or
`config.eval.attacks` when set, over the first `config.eval.num_examples` test points,
batched and sharded over all devices. Each attack yields a per-point "still correct"
vector; the worst case is correct naturally and under every attack run (FSR's "Ensemble"
under the fsr protocol). Results go to `DIR/eval.json` and the table to `DIR/eval.md`; an
evaluation that ran AutoAttack also writes `DIR/robustbench.json` (`robustbench_record`).
eval.json also holds every point's outcome under every attack (`outcomes`), so that
`python -m jaxdefense.report` can compare two evaluations of the same points point by point.
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

from jaxdefense import attacks, data, defenses, parallel
from jaxdefense.evaluation import autoattack_checks, protocols, robustbench_record, setup
from jaxdefense.workdir import paths
from jaxdefense.attacks import auto_attack
from jaxdefense.evaluation.protocols import EvalAttack

# (x, labels, key) -> per point (correct, finite, per_point), each (N,): an attack bound to a
# model; `per_point` holds, by name, the attack's other per-point values (e.g. AutoAttack's
# robustness after each of its attacks, for its checks).
PointsFn = Callable[[jax.Array, jax.Array, jax.Array],
                    tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


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
    x_adv = attacks.fgsm(count(deployed), x, labels, eps=eps, norm=norm)
    return *attacks.correct_points(model, variables, x_adv, labels), {}

  def pgd(x, labels, key):
    model_fn = count(stochastic if attack.eot_samples else
                     attacked_model(attack, model, variables))
    x_adv = attacks.pgd(model_fn, x, labels, key, eps=eps, step_size=attack.step_size * eps,
                        steps=attack.steps, norm=norm, random_start=attack.random_start,
                        loss=attack.loss.fn(defense), eot_samples=attack.eot_samples)
    return *attacks.correct_points(model, variables, x_adv, labels), {}

  def autoattack(x, labels, key):
    model_fn = count(stochastic if attack.version == "rand" else deployed)
    result = attacks.autoattack(model_fn, x, labels, key, eps=eps, norm=norm,
                                version=attack.version, options=attack.options,
                                chunks=attack.chunks)
    # Scored on the model as deployed, like every other column.
    correct, finite = attacks.correct_points(model, variables, result.x_adv, labels)
    # For AutoAttack's checks: robust after each attack; an input gradient of exactly zero.
    gradient_fn = ((lambda v: model_fn(v, jax.random.fold_in(key, 2))) if attack.version == "rand"
                   else deployed)
    loss = attacks.losses.dlr if jax.eval_shape(gradient_fn, x).logits.shape[-1] >= 3 else \
        attacks.losses.cross_entropy
    gradient = attacks.input_gradient(gradient_fn, loss, x, labels)
    per_point = {f"robust_after.{k}": v for k, v in result.robust_after.items()}
    per_point["zero_gradient"] = jnp.all(gradient == 0, axis=tuple(range(1, x.ndim)))
    per_point["clean"] = result.clean
    return result.robust & correct, finite, per_point
  return {"fgsm": fgsm, "pgd": pgd, "autoattack": autoattack}[attack.method]


@dataclasses.dataclass
class BatchResult:
  correct: np.ndarray   # Per valid point: classified correctly under the attack.
  finite: np.ndarray    # Per valid point: x' and its logits finite.
  seconds: float
  forward: int          # Forward passes (examples x model calls) the attack made.
  backward: int
  # Per valid point, by name: the attack's other per-point values.
  per_point: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


# A record's key prefix of the per-point values: "extra:", as written before they were
# named `per_point`, so that an interrupted evaluation of an earlier version still resumes.
PER_POINT_PREFIX = "extra:"


class Record:
  """Finished (attack, batch) results in a directory, so that an interrupted evaluation
  continues where it stopped: one `<attack>.<batch>.npz` per batch (per point correct,
  finite, the other per-point values under PER_POINT_PREFIX; seconds, passes), written
  whole by process 0. Batches are seeded by their index, so a batch run again gives the
  same result."""

  def __init__(self, directory: epath.Path | None):
    self.directory = directory

  def _path(self, name: str, index: int) -> epath.Path:
    return self.directory / f"{name}.{index:05d}.npz"

  def get(self, name: str, index: int) -> BatchResult | None:
    if self.directory is None or not self._path(name, index).exists():
      return None
    with np.load(io.BytesIO(self._path(name, index).read_bytes())) as f:
      per_point = {k[len(PER_POINT_PREFIX):]: f[k] for k in f.files
                   if k.startswith(PER_POINT_PREFIX)}
      return BatchResult(f["correct"], f["finite"], float(f["seconds"]), int(f["forward"]),
                         int(f["backward"]), per_point)

  def put(self, name: str, index: int, result: BatchResult) -> None:
    if self.directory is None or jax.process_index() != 0:
      return
    buffer = io.BytesIO()
    fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "per_point"}
    np.savez(buffer, **fields,
             **{f"{PER_POINT_PREFIX}{k}": v for k, v in result.per_point.items()})
    paths.write_bytes(self._path(name, index), buffer.getvalue())


@dataclasses.dataclass(frozen=True)
class Program:
  """A points function compiled once (`program`), with the counter its model calls report
  their passes to: every `attack_points` call given the same Program runs the same compiled
  batch function (the audit's eps curve passes eps as an argument), each batch's passes
  read as the counter's increase."""
  step: Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]
  counter: attacks.PassCounter


def program(fn: Callable[..., tuple[jax.Array, jax.Array, dict]]) -> Program:
  """`fn(args, x, labels, key, count=...)` jitted over (args, batch, key), `count` wrapping
  every model function it calls."""
  counter = attacks.PassCounter()
  return Program(jax.jit(lambda args, batch, key: fn(args, batch["x"], batch["labels"], key,
                                                     count=counter.wrap)), counter)


def attack_points(name: str, fn: Callable[..., tuple[jax.Array, jax.Array, dict]] | Program,
                  args: Any, images: np.ndarray, labels: np.ndarray, mesh, *,
                  batch_size: int, seed: int, record: Record, progress: bool = True
                  ) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
  """`fn(args, x, labels, key, count=...)` (or a compiled `program` of it) over the points
  in batches (batch i with key fold_in(key(seed), i)), each batch's result taken from
  `record` if there, else computed and recorded: per point correct; the count of points
  with non-finite x' or logits, seconds, forward and backward passes; the attack's other
  per-point values by name."""
  compiled = fn if isinstance(fn, Program) else program(fn)
  counter = compiled.counter
  out, per_point, totals = [], [], {"non_finite_points": 0, "time_s": 0.0,
                                    "forward_passes": 0, "backward_passes": 0}
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
      correct, finite, more = jax.tree.map(parallel.to_host, compiled.step(args, batch, key))
      jax.effects_barrier()  # The pass-count callbacks of this batch have all run.
      valid = parallel.to_host(batch["mask"])
      result = BatchResult(correct[valid], finite[valid], time.time() - start,
                           counter.forward - passes[0], counter.backward - passes[1],
                           {k: v[valid] for k, v in more.items()})
      record.put(name, i, result)
    out.append(result.correct)
    per_point.append(result.per_point)
    totals["non_finite_points"] += int(np.sum(~result.finite))
    totals["time_s"] += result.seconds
    totals["forward_passes"] += result.forward
    totals["backward_passes"] += result.backward
  return (np.concatenate(out), totals,
          {k: np.concatenate([p[k] for p in per_point]) for k in per_point[0]}
          if per_point else {})


def _robust_after(per_point: dict[str, np.ndarray]) -> dict[str, float]:
  """AutoAttack's robust accuracy after each of its attacks, from "clean", in run order."""
  ran = [k.split(".", 1)[1] for k in per_point if k.startswith("robust_after.")]
  order = [a for a in auto_attack.ATTACKS if a in ran]
  return {"clean": float(np.mean(per_point["clean"])),
          **{a: float(np.mean(per_point[f"robust_after.{a}"])) for a in order}}


def autoattack_checks_of(attack: EvalAttack, model, variables, images: np.ndarray,
                         labels: np.ndarray, mesh, per_point: dict[str, np.ndarray],
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
             autoattack_checks.zero_gradients(per_point["zero_gradient"], per_point["clean"]),
             autoattack_checks.square_lowered(_robust_after(per_point)),
             autoattack_checks.classes(draws[0].shape[-1], ran, options)]
  return checks


def evaluate(config: ml_collections.ConfigDict, model, variables, images: np.ndarray,
             labels: np.ndarray, mesh, *, names: tuple[str, ...] | None = None,
             progress: bool = True, record: Record = Record(None)
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Per-attack and worst-case accuracy of `model` on (images, labels) (uint8 NHWC) under
  `names` (eval's protocol or attacks by default), `config` validated with them
  (`setup.load`), and per point whether it is robust (natural: correct) under each of
  them, by name; (attack, batch) results found in `record` are taken from it, new ones
  added."""
  e = config.eval
  defense = defenses.from_config(config)
  suite = protocols.suite(e)
  names = protocols.attack_names(e) if names is None else names
  points = lambda name, fn: attack_points(name, fn, variables, images, labels, mesh,
                                          batch_size=e.batch_size, seed=e.seed, record=record,
                                          progress=progress)
  natural, totals, _ = points("natural",
                              lambda v, x, y, k, count: (
                                  *attacks.correct_points(model, v, x, y), {}))
  results: dict[str, Any] = {
      "natural": {"title": "Natural", "accuracy": float(natural.mean()),
                  "num_points": int(natural.size),
                  "non_finite_points": totals["non_finite_points"], "time_s": totals["time_s"]}}
  worst = natural.copy()
  robust = {"natural": natural}
  for name in names:
    attack = suite[name]
    if not attack.applies(defense.name):
      results[name] = {"title": attack.title,
                       "skipped": f"not applicable to defense {defense.name!r}"}
      continue
    fn = lambda v, x, y, k, count, attack=attack: bind(
        attack, model, defense, v, eps=e.eps, norm=e.norm, count=count)(x, y, k)
    correct, totals, per_point = points(name, fn)
    correct &= natural  # Robust: correct naturally and under the attack.
    worst &= correct
    robust[name] = correct
    results[name] = {"title": attack.title, "accuracy": float(correct.mean()),
                     "num_points": int(correct.size), "eps": e.eps, "norm": e.norm,
                     "seed": e.seed, **totals, **attack.report()}
    if attack.method == "autoattack":
      checks = autoattack_checks_of(attack, model, variables, images, labels, mesh, per_point,
                                    e.batch_size, e.norm)
      results[name]["robust_after"] = {k: float(v) for k, v in _robust_after(per_point).items()}
      results[name]["checks"] = [c.report() for c in checks]
      results[name]["warnings"] = [c.warning for c in checks if not c.passed]
      for warning in results[name]["warnings"]:
        if jax.process_index() == 0:
          print(f"warning: {attack.title}: {warning}", flush=True)
  results["worst_case"] = {"title": protocols.worst_case_title(e),
                           "accuracy": float(worst.mean()), "num_points": int(worst.size),
                           "attacks": [n for n in names if "accuracy" in results[n]]}
  robust["worst_case"] = worst
  return results, robust


def points_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
  """The first 16 hex digits of the SHA-256 of the test points (uint8 images, then int64
  labels): two evaluations with the same fingerprint attacked the same points in the same
  order."""
  digest = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
  digest.update(np.ascontiguousarray(labels, np.int64).tobytes())
  return digest.hexdigest()[:16]


def outcomes_record(robust: dict[str, np.ndarray], images: np.ndarray,
                    labels: np.ndarray) -> dict[str, Any]:
  """eval.json's `outcomes`: the points' count and fingerprint, and per attack name the
  points' robust flags as hex of `np.packbits` (point i is bit i, most significant
  first; `robust_points` reads them back)."""
  return {"points": int(len(labels)), "fingerprint": points_fingerprint(images, labels),
          "robust": {name: np.packbits(np.asarray(flags, bool)).tobytes().hex()
                     for name, flags in robust.items()}}


def robust_points(report: dict[str, Any]) -> dict[str, np.ndarray] | None:
  """Per attack name the points' robust flags in an eval.json `report`; None for an
  evaluation written before eval.json held them."""
  outcomes = report.get("outcomes")
  if outcomes is None:
    return None
  n = outcomes["points"]
  return {name: np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8), count=n
                              ).astype(bool) for name, text in outcomes["robust"].items()}


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
            f"{r['loss']}{_loss_notes(r)} | {r['source']} |" if r["method"] != "autoattack" else
            f"| {r['title']} | AutoAttack ({r['version']}) | | | | {_budgets(r['options'])} | "
            f"{r['source']} |" for _, r in cols if "method" in r]
  sections = [cost, setup]
  return "\n".join([caption, "", head, rule, row, *([""] + notes if notes else []), "",
                    *[line for table in sections if len(table) > 2 for line in table + [""]]])


def _loss_notes(r: dict[str, Any]) -> str:
  """How the attack differentiates its loss beyond the plain model, for the table's cell."""
  notes = ([f"EOT over {r['eot_samples']} mask draws"] if r.get("eot_samples") else []) + (
      ["through the mask's input dependence"] if r.get("mask_gradient") else [])
  return "".join(f"; {note}" for note in notes)


def _budgets(options: dict[str, dict[str, Any]]) -> str:
  return "; ".join(f"{name} " + ", ".join(f"{k} {v}" for k, v in budget.items())
                   for name, budget in options.items())


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, which: str = "best") -> dict:
  """Restores the run in `workdir` and writes eval.json and eval.md there."""
  s = setup.load(config, workdir, which)
  e = config.eval
  # Finished batches of an interrupted evaluation of this step with this config are reused.
  progress = s.progress("eval_progress", config)
  norm_title = protocols.NORM_TITLES[e.norm]
  if jax.process_index() == 0:
    print(f"evaluating {which} checkpoint (step {s.step}) of {s.workdir} on {len(s.labels)} "
          f"{s.dataset.name} test points, eps {e.eps:.4f} {norm_title}"
          + (" (resuming: finished batches reused)" if progress.exists() else ""), flush=True)
  results, robust = evaluate(config, s.model, s.variables, s.images, s.labels, s.mesh,
                             record=Record(progress))
  report = {"config": config.name, "checkpoint": which, "step": s.step,
            "defense": config.defense.name, "arch": config.model.arch, "data": s.dataset.name,
            "eps": e.eps, "norm": e.norm, "protocol": e.protocol, "dtype": s.dtype,
            "results": results, "outcomes": outcomes_record(robust, s.images, s.labels)}
  if jax.process_index() == 0:
    paths.write_text(s.workdir / "eval.json", json.dumps(report, indent=2))
    eps = f"{255 * e.eps:g}/255" if e.norm == "linf" else f"{e.eps:g}"
    caption = (f"{config.name}: {config.model.arch} + {config.defense.name}, {s.dtype} "
               f"compute, {s.dataset.name}, {len(s.labels)} test points, eps {eps} "
               f"{norm_title}, {which} checkpoint (step {s.step}); accuracy (%)")
    table = markdown_table(results, caption)
    paths.write_text(s.workdir / "eval.md", table)
    print(table, flush=True)
    listing = robustbench_record.record(report, config)
    if listing is not None:
      paths.write_text(s.workdir / "robustbench.json", json.dumps(listing, indent=2))
      print(f"robustbench.json: RobustBench's model_info record (fill in "
            f"{', '.join(robustbench_record.TO_FILL)})"
            + "".join(f"; note: {check}" for check in listing["checks"]), flush=True)
    if progress.exists():
      progress.rmtree()
  return report
