"""Training checkpoints: orbax save/restore of a train-state pytree plus a JSON metadata dict.

One `ocp.CheckpointManager` holds every step as `<directory>/<step>/{state,metadata}`. It
keeps the last `keep` steps and, if `best_metric` is set, the best step by that metric: orbax
0.12 expresses both at once as
`AnyPreservationPolicy([LatestN(keep), BestN(n=1, keep_checkpoints_without_metrics=False)])`,
so no second manager is needed. Saves are asynchronous (`wait`/`close` make them durable) and
atomic: orbax writes into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a
process killed mid-save leaves the earlier steps intact; the stray directory is ignored and a
new `Checkpointer` on the directory removes it before its first save.

Any pytree of arrays works, typed PRNG keys (`jax.random.key`) included: orbax 0.12 saves
their key data and implementation and restores typed keys. On restore each leaf takes the
sharding of the matching leaf of the target (a `jax.Array` or a `jax.ShapeDtypeStruct` with a
sharding), otherwise the sharding it was saved with. In multi-process runs every process calls
`save`/`restore` (orbax writes collectively; the JSON items are written by process 0 only).

Preemption: `preemption_guard()` turns SIGTERM into a flag instead of death. Single process,
the handler only sets the flag; the loop polls `reached_preemption(step)` (or `preempted`),
saves with `force=True` and exits. With several processes a flag seen by one process alone
would make the collective save hang, so SIGTERM is left to JAX's preemption service (on by
default under `jax.distributed`; it catches SIGTERM on any process) and
`reached_preemption(step)` is orbax's `CheckpointManager.reached_preemption(step)`: JAX's
preemption sync point, which becomes true on all processes at the same step (false, not an
error, where the preemption service is off). It must then be called at every step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxdefense import errors
from jaxdefense.workdir import paths

BEST_MODES = ("max", "min")


class _DropUntrackedMetricWarning(logging.Filter):
  """Orbax warns at every save that carries no best-metric value; most saves (periodic
  ones, between evaluations) carry none by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


class _DropReadOnlyDirectoryWarning(logging.Filter):
  """Orbax warns that the directory is read only whenever a read-only manager opens,
  however it is configured; an evaluation restores read-only by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only=")


logging.getLogger("absl").addFilter(_DropUntrackedMetricWarning())
logging.getLogger("absl").addFilter(_DropReadOnlyDirectoryWarning())
_STATE = "state"
_METADATA = "metadata"


def _one_line(error: BaseException, limit: int = 300) -> str:
  """The error's type and first line, shortened: TensorStore's messages run to pages."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _abstract_leaf(x: Any) -> Any:
  """A target leaf as orbax restores into it: arrays become shape/dtype/sharding structs."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


def _to_json(x: Any) -> Any:
  """json.dumps fallback for numpy/jax scalars and small arrays."""
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"checkpoint metadata must be JSON-serializable; got {type(x).__name__}: {x!r}")


def _nbytes(x: Any) -> int:
  """An array's size in bytes (a typed PRNG key's: its key data's)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


class Checkpointer:
  """Periodic, asynchronous checkpoints keeping the last `keep` steps plus the best one.

  Args:
    directory: where the step directories go (created if missing).
    save_every_steps: `save` writes when `step % save_every_steps == 0` (or `force=True`).
    keep: how many most recent checkpoints to keep.
    best_metric: metric (passed to `save`) whose best checkpoint is kept beyond `keep`;
      None keeps only the most recent ones. Steps saved without a finite value of it never
      count as best.
    best_mode: "max" or "min": which value of `best_metric` is best.
    read_only: only restore (evaluation beside a running training): never save, delete,
      clean up the writer's temporary directories or move damaged steps aside.
  """

  def __init__(self, directory: str | epath.PathLike, *, save_every_steps: int, keep: int,
               best_metric: str | None = None, best_mode: str = "max",
               read_only: bool = False):
    if save_every_steps < 1:
      raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    if best_mode not in BEST_MODES:
      raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
    self.directory = epath.Path(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies: list[ocp.checkpoint_managers.PreservationPolicy] = [
        ocp.checkpoint_managers.LatestN(n=keep)]
    if best_metric is not None:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._score, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=self._score if best_metric is not None else None,
        best_mode=best_mode,
        cleanup_tmp_directories=not read_only,
        # Read-only: the values orbax would otherwise replace, each with a warning.
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=True)
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._preempted = False
    self._previous_handler: Any = None
    self._handler_installed = False

  def _score(self, metrics: Mapping[str, float]) -> float:
    """The ranking value; the worst possible for a step saved under another metric name."""
    if self.best_metric not in metrics:
      return -math.inf if self.best_mode == "max" else math.inf
    return float(metrics[self.best_metric])

  def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None,
           metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving `state` at `step` if it is a save step (or `force`); True if it did.

    `metrics` rank checkpoints for `best_metric`; `metadata` is a small JSON-able dict
    restored with the state. A step already on disk is not rewritten (returns False).
    """
    step = int(step)
    if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
      return False
    self.check_space(state, step)
    tracked = None
    if metrics is not None and self.best_metric in metrics:
      value = float(np.asarray(metrics[self.best_metric]))
      if math.isfinite(value):
        tracked = {self.best_metric: value}
    meta = json.loads(json.dumps(dict(metadata or {}), default=_to_json))
    return self._manager.save(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                         _METADATA: ocp.args.JsonSave(meta)}),
        metrics=tracked, force=True)

  def check_space(self, state: Any, step: int | None = None) -> None:
    """WorkdirError, before anything is written, when the directory's disk (local paths)
    has less free space than the state's arrays take, instead of a save that fails half
    way in orbax's background threads."""
    if paths.is_remote(self.directory):
      return
    needed = sum(_nbytes(x) for x in jax.tree.leaves(state))
    existing = os.fspath(self.directory)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed:
      newest = self.latest_step()
      resume = (f"it resumes from step {newest}" if newest is not None
                else "nothing was saved yet")
      what = "a checkpoint" if step is None else f"checkpoint step {step}"
      raise errors.WorkdirError(
          f"no space left for {what} in {self.directory}: it needs {needed / 2**20:.1f} MiB, "
          f"{free / 2**20:.1f} MiB are free; free space there and rerun the same command "
          f"({resume})")

  def all_steps(self) -> list[int]:
    """The saved steps, ascending (including one still being written asynchronously)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The most recent saved step, or None if there is none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best `best_metric`, or None if no step was saved with it."""
    if self.best_metric is None:
      raise ValueError(f"checkpoints in {self.directory} are not ranked: best_metric is None")
    return self._manager.best_step()

  def restore(self, target: Any, which: str | int = "latest") -> tuple[Any, int, dict] | None:
    """Restores a checkpoint into the structure and shardings of `target`.

    `which` is "latest", "best" or a step number. Returns `(state, step, metadata)`; None
    when `which="latest"` and nothing is saved yet (a fresh run), FileNotFoundError naming
    the directory when the best or the given step does not exist. A leaf of `target` that
    is `ocp.PLACEHOLDER` is not read and comes back as the placeholder (e.g. the optimizer
    state, where only the weights are wanted); the structure is checked all the same.

    A step that fails to restore is skipped for the next older one (for "best": the best,
    then the others from the newest), with one line saying which step and why. Once another
    step restores, the failed ones are damaged (the same target restored from another
    step) and are moved to `<directory>_damaged/`, not deleted. If none restores,
    nothing is moved (the cause may be the target, e.g. another model) and NoIntactCheckpoint
    lists every step tried and why.
    """
    self.wait()
    if which == "latest":
      first = self.latest_step()
      if first is None:
        return None
    elif which == "best":
      first = self.best_step()
      if first is None:
        raise FileNotFoundError(f"no checkpoint with metric {self.best_metric!r} in "
                                f"{self.directory} (steps saved: {self.all_steps()})")
    elif isinstance(which, (int, np.integer)) and not isinstance(which, bool):
      first = int(which)
      if first not in self.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {first} in {self.directory} "
                                f"(steps saved: {self.all_steps()})")
    else:
      raise ValueError(f"which must be 'latest', 'best' or a step number, got {which!r}")
    candidates = [first]
    if not isinstance(which, (int, np.integer)):
      candidates += [s for s in sorted(self.all_steps(), reverse=True) if s != first]
    abstract = jax.tree.map(_abstract_leaf, target)
    # The standard handler refuses placeholders; the PyTree one, which it wraps, takes them.
    state_args = (ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
        if any(leaf is ocp.PLACEHOLDER for leaf in jax.tree.leaves(abstract))
        else ocp.args.StandardRestore(abstract))
    failed: list[tuple[int, str]] = []
    for step in candidates:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: state_args, _METADATA: ocp.args.JsonRestore()}))
      except Exception as e:  # noqa: BLE001  (TensorStore, orbax and tree errors alike)
        failed.append((step, _one_line(e)))
        if jax.process_index() == 0:
          print(f"checkpoint step {step} in {self.directory} does not restore: "
                f"{failed[-1][1]}", flush=True)
        continue
      if failed and not self.read_only:
        self._move_aside([s for s, _ in failed])
      return restored[_STATE], step, dict(restored[_METADATA] or {})
    raise errors.NoIntactCheckpoint(
        f"no checkpoint in {self.directory} restores; tried "
        + "; ".join(f"step {s}: {reason}" for s, reason in failed)
        + ". If the run was made with another config or code version, restore with that; "
        "else move the damaged steps away and start again.")

  def _move_aside(self, steps: list[int]) -> None:
    """Moves damaged steps to `<directory>_damaged/<step>` (renamed if taken), so that
    orbax no longer lists them; process 0 moves, every process waits for it."""
    if jax.process_index() == 0:
      aside = self.directory.parent / f"{self.directory.name}_damaged"
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        destination = aside / str(step)
        n = 1
        while destination.exists():
          destination, n = aside / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(destination)
        print(f"moved damaged checkpoint step {step} to {destination}", flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxdefense_checkpoint_move_aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves (and old-step deletions) are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, releases orbax's resources and the SIGTERM handler."""
    self.uninstall_sigterm_handler()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  @property
  def preempted(self) -> bool:
    """Single process: whether SIGTERM arrived. Several: whether `reached_preemption` fired."""
    return self._preempted

  def reached_preemption(self, step: int) -> bool:
    """True when the loop should save at `step` and exit because of a preemption.

    Single process: whether SIGTERM arrived. Several processes: JAX's preemption sync point
    through the CheckpointManager (false where the preemption service is off), true on every
    process at the same step, so it must be called at every step.
    """
    if jax.process_count() > 1 and self._manager.reached_preemption(int(step)):
      self._preempted = True
    return self._preempted

  def install_sigterm_handler(self) -> None:
    """Makes SIGTERM set the preemption flag instead of killing the process (main thread).

    With several processes this does nothing: JAX's preemption service handles SIGTERM.
    """
    if self._handler_installed or jax.process_count() > 1:
      return
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._handler_installed = True

  def uninstall_sigterm_handler(self) -> None:
    """Puts back the SIGTERM handler that `install_sigterm_handler` replaced."""
    if not self._handler_installed:
      return
    previous = self._previous_handler
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    self._handler_installed = False
    self._previous_handler = None

  @contextlib.contextmanager
  def preemption_guard(self) -> Iterator[Checkpointer]:
    """Installs the SIGTERM handler for the duration of the block."""
    self.install_sigterm_handler()
    try:
      yield self
    finally:
      self.uninstall_sigterm_handler()

  def _on_sigterm(self, signum: int, frame: Any) -> None:
    del signum, frame
    self._preempted = True
