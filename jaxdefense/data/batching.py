"""Batches: the training batches' plan, real and extra images, as a pure function of (seed,
step), and the evaluation's batches.

Training (`Plan`, `batches`): every global batch of B images holds E = round(f B) extra
images (f = extra_fraction; Python's round, half to even), drawn uniformly with replacement
from the extra source as DM-Improves-AT's sampler draws its unsupervised ones, after R = B - E
real ones in the real set's epoch order (`epoch_permutation`). Without extra data (f = 0) a
batch is B real images, slice `step mod S` of epoch `step div S`'s permutation with S =
N_real div B, the remainder dropped. A resumed run sees the batches of an uninterrupted one.
Process p of P reads only the p-th of P equal contiguous slices of the global batch.
`batches` yields a process's batches, read ahead on threads (jaxdefense/data/read_ahead.py).

Evaluation (`eval_batches`): every point once, in order, the last batch padded and masked.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import numpy as np

from jaxdefense.data import datasets, read_ahead, sources

# How `steps_per_epoch` counts an epoch with extra data (the config's data.epoch_steps).
EPOCH_STEPS = ("real", "batch")


def check_batch(batch_size: int, extra_fraction: float, process_count: int = 1, *,
                name: str = "extra_fraction") -> tuple[int, int]:
  """(R, E): a global batch's real and extra images, E = round(extra_fraction x batch_size),
  R = batch_size - E. ValueError naming the numbers (the fraction as `name`) unless
  0 <= extra_fraction < 1, R >= 1, E >= 1 when extra_fraction > 0, and batch_size is a
  multiple of process_count (each process gets an equal slice)."""
  if not 0 <= extra_fraction < 1:
    raise ValueError(f"{name} must lie in [0, 1); got {extra_fraction}")
  if batch_size < 1 or process_count < 1:
    raise ValueError(f"batch_size and process_count must be >= 1; got batch_size={batch_size}, "
                     f"process_count={process_count}")
  extra = round(extra_fraction * batch_size)
  real = batch_size - extra
  if not real:
    raise ValueError(f"{name}={extra_fraction} leaves no real image in a batch of "
                     f"{batch_size} (round({extra_fraction} x {batch_size}) = {extra} extra)")
  if extra_fraction and not extra:
    raise ValueError(f"{name}={extra_fraction} gives no extra image in a batch of {batch_size} "
                     f"(round({extra_fraction} x {batch_size}) = 0); allowed: a fraction "
                     f"giving at least one extra image per batch, > {0.5 / batch_size:g}")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a multiple of process_count="
                     f"{process_count} (each process reads an equal slice of every batch)")
  return real, extra


def steps_per_epoch(num_real: int, batch_size: int, *, extra_fraction: float = 0.0,
                    epoch_steps: str = "real") -> int:
  """Steps per epoch: "real" is one pass over the real images at R a batch, num_real div R
  (without extra images the real set's full batches, num_real div B); "batch" is
  ceil(num_real / B) (DM-Improves-AT's count) with extra images, num_real div B without."""
  if epoch_steps not in EPOCH_STEPS:
    raise ValueError(f"unknown epoch_steps {epoch_steps!r}; allowed: {', '.join(EPOCH_STEPS)}")
  real, extra = check_batch(batch_size, extra_fraction)
  if extra and epoch_steps == "batch":
    return -(-num_real // batch_size)
  return num_real // real


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The training order of an epoch, a function of (seed, epoch) only.

  Drawn by numpy's legacy `RandomState` on a PCG64 stream seeded with (seed, epoch):
  numpy keeps both fixed across versions, so a resumed run sees the same order.
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative; got seed={seed}, epoch={epoch}")
  return np.random.RandomState(np.random.PCG64([seed, epoch])).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  order = epoch_permutation(num_examples, seed=seed, epoch=epoch)
  order.setflags(write=False)
  return order


def _process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """Process `process_index`'s contiguous share of a global batch."""
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, process_count) with process_count >= 1; "
                     f"got process_index={process_index}, process_count={process_count}")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"the global batch_size must be a positive multiple of process_count="
                     f"{process_count}; got {batch_size}")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run's global batches, checked once: `batch_size` images a step, `real` of the
  `num_real` real images then `extra` of the `num_extra` extra ones (`check_batch`); process
  `process_index` of `process_count` reads positions `local` of each."""
  seed: int
  batch_size: int
  num_real: int
  extra_fraction: float = 0.0
  num_extra: int = 0
  process_index: int = 0
  process_count: int = 1
  real: int = dataclasses.field(init=False)
  extra: int = dataclasses.field(init=False)
  local: slice = dataclasses.field(init=False)

  def __post_init__(self):
    real, extra = check_batch(self.batch_size, self.extra_fraction, self.process_count)
    local = _process_slice(self.batch_size, self.process_index, self.process_count)
    if self.seed < 0:
      raise ValueError(f"seed must be non-negative; got {self.seed}")
    if not self.num_real // real:
      raise ValueError(f"{real} real images per batch exceed the {self.num_real} real "
                       f"training images")
    if extra and self.num_extra < 1:
      raise ValueError(f"{extra} extra images per batch need extra data; got num_extra="
                       f"{self.num_extra}")
    for field, value in (("real", real), ("extra", extra), ("local", local)):
      object.__setattr__(self, field, value)


def batch_indices(plan: Plan, step: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's (real indices, extra indices) of global step `step`, a function of
  (seed, step) only.

  Real: slice step % S of R of `epoch_permutation(num_real, seed, epoch=step // S)`, S =
  num_real // R steps per real epoch. Extra: E indices uniform in [0, num_extra) with
  replacement, from numpy's legacy `RandomState` (streams fixed across numpy versions) on
  the counter-based Philox keyed by (seed, step). The process reads the global batch's
  positions `plan.local` only (its real ones, then its extra ones), so the batch, and every
  per-position random draw of the step, is the same for any number of processes.
  """
  if step < 0:
    raise ValueError(f"step must be non-negative; got {step}")
  real, begin, end = plan.real, plan.local.start, plan.local.stop
  steps = plan.num_real // real
  order = _epoch_order(plan.num_real, plan.seed, step // steps)
  within = (step % steps) * real
  real_indices = order[within + min(begin, real):within + min(end, real)].astype(np.int64)
  extra_indices = np.empty(0, np.int64)
  if plan.extra:
    generator = np.random.RandomState(np.random.Philox(key=[plan.seed, step]))
    extra_indices = generator.randint(0, plan.num_extra, size=plan.extra, dtype=np.int64)
  return real_indices, extra_indices[max(begin - real, 0):max(end - real, 0)]


def plan_for(dataset: datasets.Dataset, source: sources.ExtraSource | None, *, seed: int,
             batch_size: int, extra_fraction: float = 0.0, process_index: int = 0,
             process_count: int = 1) -> Plan:
  """The `Plan` of `dataset`'s training images and `source`'s (None: no extra data), whose
  images must have the same shape."""
  if source is not None and source.image_shape != tuple(dataset.image_shape):
    raise ValueError(f"the extra images' shape {source.image_shape} is not the real data's "
                     f"{tuple(dataset.image_shape)}")
  return Plan(seed=seed, batch_size=batch_size, num_real=len(dataset.train_labels),
              extra_fraction=extra_fraction,
              num_extra=0 if source is None else source.num_examples,
              process_index=process_index, process_count=process_count)


def load_batch(dataset: datasets.Dataset, source: sources.ExtraSource | None, plan: Plan,
               step: int) -> dict[str, np.ndarray]:
  """This process's batch of global step `step` of `plan` (`plan_for(dataset, source, ...)`):
  {"images": uint8 (B / P, H, W, C), "labels": int32, "is_extra": bool}, the real share
  first, then the extra one."""
  real_indices, extra_indices = batch_indices(plan, step)
  local_real, local = len(real_indices), plan.batch_size // plan.process_count
  images = np.empty((local, *dataset.image_shape), np.uint8)
  labels = np.empty(local, np.int32)
  images[:local_real] = dataset.train_images[real_indices]
  labels[:local_real] = dataset.train_labels[real_indices]
  if len(extra_indices):
    images[local_real:], labels[local_real:] = source.read(extra_indices)
  return {"images": images, "labels": labels, "is_extra": np.arange(local) >= local_real}


def batches(dataset: datasets.Dataset, source: sources.ExtraSource | None, *, seed: int,
            start_step: int, num_steps: int, batch_size: int, extra_fraction: float = 0.0,
            process_index: int = 0, process_count: int = 1, buffer_batches: int = 4,
            num_threads: int = read_ahead.DEFAULT_THREADS) -> Iterator[dict[str, np.ndarray]]:
  """`load_batch` of steps start_step .. start_step + num_steps - 1 of `plan_for(dataset,
  source, ...)`, in order, read ahead by `num_threads` threads, at most `buffer_batches`
  batches beyond the one being consumed: host memory is bounded by the buffer whatever the
  source's size. A DataError of a read (a damaged shard) is raised where its batch is
  consumed; the arguments are checked here."""
  if num_steps < 0 or start_step < 0:
    raise ValueError(f"num_steps and start_step must be >= 0; got {num_steps}, {start_step}")
  plan = plan_for(dataset, source, seed=seed, batch_size=batch_size,
                  extra_fraction=extra_fraction, process_index=process_index,
                  process_count=process_count)
  return read_ahead.read_ahead(functools.partial(load_batch, dataset, source, plan),
                               range(start_step, start_step + num_steps), buffer_batches,
                               num_threads)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(images, labels, mask) batches covering every point once, in order, with fixed shapes.

  The last global batch is padded with zero images and label 0, whose `mask` is False.
  Process p of P gets the p-th of P equal contiguous slices of every global batch; every
  process gets the same number of batches, ceil(len(labels) / batch_size).
  """
  local = _process_slice(batch_size, process_index, process_count)
  if len(images) != len(labels):
    raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
  return (_padded_batch(images, labels, np.arange(start, start + batch_size)[local])
          for start in range(0, len(labels), batch_size))


def _padded_batch(images: np.ndarray, labels: np.ndarray,
                  indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The points at `indices`; zeros and mask False for those past the end."""
  mask = indices < len(labels)
  valid = indices[mask]
  batch_images = np.zeros((len(indices), *images.shape[1:]), images.dtype)
  batch_labels = np.zeros(len(indices), labels.dtype)
  batch_images[:len(valid)] = images[valid]
  batch_labels[:len(valid)] = labels[valid]
  return batch_images, batch_labels, mask


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """How many batches `eval_batches` yields."""
  return math.ceil(num_examples / batch_size)
