"""Adversarial training: the loop around the pure `steps.train_step`, with in-training
evaluation, checkpoints and logs. Imported by `main.py` alone.

The loop is resumable at any step: data order is a function of (seed, epoch), every
step's randomness is `fold_in(seed key, step)`, and the checkpoint holds the whole state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath

from jaxdefense import checkpoint, data, defenses, errors, models, parallel
from jaxdefense.config import validation
from jaxdefense.data import batching, sources
from jaxdefense.training import objectives, optim, steps, train_state
from jaxdefense.workdir import lock, metrics, paths, run_config
from jaxdefense.training.train_state import TrainState
from jaxdefense.workdir.metrics import MetricWriter


def evaluate_accuracy(eval_fn: Callable[..., dict], variables: dict, images: np.ndarray,
                      labels: np.ndarray, mesh, batch_size: int, seed: int) -> dict[str, Any]:
  """Natural and PGD accuracy over all given points (last batch padded and masked)."""
  totals = {"natural": 0, "pgd": 0, "count": 0}
  key = jax.random.key(seed)
  for i, (x, y, mask) in enumerate(data.eval_batches(
      images, labels, batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())):
    batch = parallel.shard_batch(mesh, {"images": x, "labels": y, "mask": mask})
    counts = eval_fn(variables, batch, jax.random.fold_in(key, i))
    for k in totals:
      totals[k] += int(counts[k])
  n = max(totals["count"], 1)
  return {"natural_accuracy": totals["natural"] / n, "pgd_accuracy": totals["pgd"] / n,
          "num_examples": totals["count"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
  """Trains (resuming from the workdir's latest checkpoint), evaluates, writes results.

  Before anything is loaded, the config must be valid (`validation.validate`), the extra
  data files (if any) well-formed (`sources.open_from_config`), the workdir writable, free
  (`lock.Lease`: one training per workdir) and, if trained before, trained with a config
  that builds the same model (`run_config.check_config`). Returns the
  results, or `{"preempted": True, "step": ...}` after SIGTERM; raises `errors.Diverged` at
  a non-finite loss or gradient norm, having saved nothing from that step on."""
  workdir = paths.resolve(workdir)
  mesh = parallel.make_mesh()
  validation.validate(config, mesh)
  if config.init_from is not None:
    run_config.check_trained(paths.resolve(config.init_from), config, "config.init_from")
  is_main = jax.process_index() == 0
  run_config.check_config(workdir, config)
  source = sources.open_from_config(config)
  lease = lock.Lease(workdir, config.train.lease_timeout_s)  # Held by process 0 only.
  try:
    if is_main:
      paths.check_writable(workdir)
      metrics.check_supported(workdir)
      lease.acquire()
    try:
      if is_main:
        run_config.record_config(workdir, config)
      return _train(config, workdir, mesh, source, lease)
    finally:
      lease.release()
  finally:
    if source is not None:
      source.close()


@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed while the loop runs."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Any
  dataset: data.Dataset
  source: sources.ExtraSource | None
  steps_per_epoch: int
  total_steps: int
  step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_fn: Callable[..., dict]
  ckpt: checkpoint.Checkpointer
  writer: MetricWriter
  is_main: bool
  lease: lock.Lease


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, mesh,
           source: sources.ExtraSource | None, lease: lock.Lease) -> dict:
  is_main = jax.process_index() == 0
  dataset = data.from_config(config)
  model = models.from_config(config, dataset.num_classes)
  batch_size = config.train.batch_size
  steps_per_epoch = batching.steps_per_epoch(
      len(dataset.train_labels), batch_size, extra_fraction=config.data.extra_fraction,
      epoch_steps=config.data.epoch_steps)
  if steps_per_epoch == 0:
    raise errors.ConfigError(f"train.batch_size={batch_size} exceeds the "
                             f"{len(dataset.train_labels)} training points of {dataset.name}")
  total_steps = config.train.epochs * steps_per_epoch
  if is_main:
    print(f"config:\n{config}", flush=True)
    mixed = "" if source is None else (
        f"; extra data: {source.num_examples} images of {len(source.paths)} file(s), "
        f"{batching.check_batch(batch_size, config.data.extra_fraction)[1]} of every batch "
        f"of {batch_size}")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
          f"({jax.process_count()} process(es)); data set {dataset.name}: "
          f"{len(dataset.train_labels)} train / {len(dataset.test_labels)} test, "
          f"{dataset.num_classes} classes, images {dataset.image_shape}{mixed}; "
          f"{config.train.epochs} epochs x {steps_per_epoch} steps = {total_steps} steps",
          flush=True)

  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  state = train_state.create(model, tx, jax.random.key(config.seed), dataset.image_shape,
                                   ema=train_state.uses_ema(config))
  state = parallel.replicate(mesh, state)
  objective = objectives.make(config.objective.name, model, defenses.from_config(config),
                              objectives.attack_config(config), beta=config.objective.beta,
                              label_smoothing=config.objective.label_smoothing)
  augment = functools.partial(data.augment, **data.augmentation_for(dataset.name))
  step_fn = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx,
                                      schedule=schedule, augment=augment,
                                      recipe=steps.Recipe.from_config(config, steps_per_epoch)),
                    donate_argnums=0)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model, pgd=config.eval_pgd,
                                      loss=steps.in_training_pgd_loss(config)))
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints",
                                 save_every_steps=config.train.checkpoint_every_steps,
                                 keep=config.train.keep_checkpoints,
                                 best_metric=train_state.BEST_METRIC)
  writer = None
  try:
    ckpt.check_space(state)
    restored = ckpt.restore(state)
    if restored is not None:
      state, _, _ = restored
      if is_main:
        print(f"resumed from step {int(state.step)} in {workdir}", flush=True)
    elif config.init_from is not None:
      state = train_state.initialize_from(config, state, model, dataset.image_shape, mesh)
    # Rows and events logged after the checkpoint (by a run killed later) are dropped.
    writer = MetricWriter(workdir, resume_step=int(state.step) if restored else None)
    run = _Run(config=config, workdir=workdir, mesh=mesh, dataset=dataset, source=source,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, step_fn=step_fn,
               eval_fn=eval_fn, ckpt=ckpt, writer=writer, is_main=is_main, lease=lease)
    return _loop(run, state)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


class _PendingMetrics:
  """Step metrics still on the device, brought to the host in batches (at logging and
  before every save, so that no saved state ever follows a non-finite step)."""

  def __init__(self):
    self.rows: list[tuple[int, Any]] = []

  def add(self, step: int, metrics: dict) -> None:
    self.rows.append((step, metrics))

  def fetch(self, run: _Run) -> None:
    """Brings the rows to the host; raises Diverged at the first non-finite one."""
    self.rows = jax.device_get(self.rows)
    for step, m in self.rows:
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        run.ckpt.wait()
        newest = run.ckpt.latest_step()
        kept = (f"newest checkpoint in {run.workdir}: step {newest}" if newest is not None
                else "no checkpoint was saved")
        raise errors.Diverged(
            f"training diverged at step {step}: loss {float(m['loss'])}, gradient norm "
            f"{float(m['grad_norm'])}; nothing from that step on was saved ({kept}). Lower "
            "optim.lr or check the data.")

  def pop_mean(self, run: _Run) -> dict[str, float]:
    """The mean of each metric over the rows (fetched and checked), which are cleared."""
    self.fetch(run)
    fetched = [m for _, m in self.rows]
    self.rows = []
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


class _DataWait:
  """Seconds the loop spent blocked on the input pipeline, since the last `take`."""

  def __init__(self):
    self.seconds = 0.0

  def timed(self, batches: Iterator[dict]) -> Iterator[dict]:
    """`batches`, each `next` timed."""
    while True:
      start = time.perf_counter()
      batch = next(batches, None)
      self.seconds += time.perf_counter() - start
      if batch is None:
        return
      yield batch

  def take(self) -> float:
    seconds, self.seconds = self.seconds, 0.0
    return seconds


def _log_train(run: _Run, pending: _PendingMetrics, *, step: int, epoch: int,
               elapsed_s: float, data_wait: _DataWait, bar: tqdm.tqdm) -> None:
  """The mean of the step metrics since the last row, with `data_wait_s`: the seconds the
  loop waited for batches meanwhile (near 0 when the read-ahead keeps up)."""
  if not pending.rows:
    return
  summary = pending.pop_mean(run)
  run.writer.write(step, {f"train/{k}": v for k, v in summary.items()}, epoch=epoch,
                   elapsed_s=elapsed_s, data_wait_s=round(data_wait.take(), 6))
  bar.set_postfix({k: f"{v:.3f}" for k, v in summary.items()
                   if k in ("loss", "accuracy", "adv_accuracy")})


def _evaluate(run: _Run, state: TrainState, *, step: int, epoch: int) -> dict:
  """The in-training evaluation (on the EMA when the run keeps one), logged."""
  c = run.config
  images, labels = run.dataset.test_images, run.dataset.test_labels
  if c.train.eval_examples:
    images, labels = images[:c.train.eval_examples], labels[:c.train.eval_examples]
  result = evaluate_accuracy(run.eval_fn, state.variables(train_state.uses_ema(c)), images, labels,
                             run.mesh, c.train.eval_batch_size, c.seed + 1)
  run.writer.write(step, {f"eval/{k}": v for k, v in result.items()}, epoch=epoch)
  if run.is_main:
    print(f"step {step} (epoch {epoch}): natural {100 * result['natural_accuracy']:.2f}%  "
          f"{steps.in_training_pgd_title(c)} {100 * result['pgd_accuracy']:.2f}% "
          f"on {result['num_examples']} test points", flush=True)
  return result


def _batches(run: _Run, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of the global batches of steps start_step .. total_steps - 1, a
  function of (seed, step) (`batching.batches`: the real set's epochs in seeded order, extra
  images mixed into every batch with the mask `"is_extra"`, read ahead on threads)."""
  c = run.config
  return batching.batches(run.dataset, run.source, seed=c.seed, start_step=start_step,
                          num_steps=run.total_steps - start_step,
                          batch_size=c.train.batch_size, extra_fraction=c.data.extra_fraction,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          buffer_batches=c.data.buffer_batches)


def _save(run: _Run, step: int, state: TrainState, **kwargs: Any) -> None:
  """`run.ckpt.save`, the workdir's lease renewed first: a run whose lease was taken over
  (it stalled past its timeout) stops there instead of writing beside the new holder."""
  run.lease.renew()
  run.ckpt.save(step, state, **kwargs)


def _loop(run: _Run, state: TrainState) -> dict:
  """Steps from `state.step` to the end: logs, evaluations and saves on their schedules;
  saves and returns `{"preempted": True, ...}` at a preemption notice."""
  c = run.config
  step = int(state.step)
  pending = _PendingMetrics()
  last_eval = None
  start_time = time.time()
  data_wait = _DataWait()
  with (run.ckpt.preemption_guard(),
        tqdm.tqdm(total=run.total_steps, initial=step, disable=not run.is_main, desc=c.name,
                  unit="step") as bar,
        contextlib.closing(_batches(run, step)) as batches):
    for local in data_wait.timed(batches):
      batch = parallel.shard_batch(run.mesh, local)
      state, metrics = run.step_fn(state, batch)
      del batch, local
      epoch = step // run.steps_per_epoch
      step += 1
      pending.add(step, metrics)
      if step % c.train.log_every_steps == 0 or step == run.total_steps:
        _log_train(run, pending, step=step, epoch=epoch, elapsed_s=time.time() - start_time,
                   data_wait=data_wait, bar=bar)
      bar.update(1)
      end_of_epoch = step % run.steps_per_epoch == 0
      completed = step // run.steps_per_epoch
      metadata = {"epoch": completed, "config": c.name}
      if end_of_epoch and (completed % c.train.eval_every_epochs == 0
                           or step == run.total_steps):
        pending.fetch(run)
        last_eval = _evaluate(run, state, step=step, epoch=completed)
        _save(run, step, state, force=True, metadata=metadata,
              metrics={train_state.BEST_METRIC: last_eval["pgd_accuracy"]})
      elif step % c.train.checkpoint_every_steps == 0:
        pending.fetch(run)
        _save(run, step, state, metadata=metadata)
      # The last step finishes the run (results below) even if SIGTERM came meanwhile.
      if run.ckpt.reached_preemption(step) and step < run.total_steps:
        _log_train(run, pending, step=step, epoch=epoch, elapsed_s=time.time() - start_time,
                   data_wait=data_wait, bar=bar)
        _save(run, step, state, force=True, metadata=dict(metadata, preempted=True))
        if run.is_main:
          print(f"preempted: saved step {step} to {run.workdir}; rerun the same command "
                "to resume", flush=True)
        return {"preempted": True, "step": step}

  if last_eval is None:  # Resumed a finished run: evaluate its final state again.
    last_eval = _evaluate(run, state, step=step, epoch=c.train.epochs)
  _save(run, step, state, force=True, metrics={train_state.BEST_METRIC: last_eval["pgd_accuracy"]},
        metadata={"epoch": c.train.epochs, "config": c.name})
  run.ckpt.wait()
  results = {"config": c.name, "epochs": c.train.epochs, "steps": step,
             "natural_accuracy": last_eval["natural_accuracy"],
             "robust_accuracy": last_eval["pgd_accuracy"],
             "robust_attack": steps.in_training_pgd_title(c),
             "num_examples": last_eval["num_examples"], "ema": train_state.uses_ema(c)}
  if run.is_main:
    paths.write_text(run.workdir / "results.json", json.dumps(results, indent=2))
  return results
