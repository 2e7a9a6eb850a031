"""Read-ahead: batches computed on background threads, a bounded number ahead of the one
being consumed, so host memory is bounded by the buffer whatever the data's size.

A plain `concurrent.futures` thread pool, not grain's
`MapDataset.map(...).to_iter_dataset(ReadOptions(...))`: measured on the same loading
function (benchmarks/data_pipeline.py, benchmarks/RESULTS.md) grain was no faster, so the
pool's dozen lines keep its bound on held batches exact and add no dependency.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterator, TypeVar

DEFAULT_THREADS = 4

T = TypeVar("T")


def read_ahead(load: Callable[[int], T], steps: range, buffer_batches: int,
               num_threads: int = DEFAULT_THREADS) -> Iterator[T]:
  """load(step) for each step, in order, computed by `num_threads` threads at most
  `buffer_batches` steps ahead of the one last yielded. An exception of `load` is raised
  where its step is consumed."""
  if buffer_batches < 1 or num_threads < 1:
    raise ValueError(f"buffer_batches and num_threads must be >= 1; got {buffer_batches}, "
                     f"{num_threads}")
  return _read_ahead(load, steps, buffer_batches, num_threads)


def _read_ahead(load: Callable[[int], T], steps: range, buffer_batches: int,
                num_threads: int) -> Iterator[T]:
  pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="read-ahead")
  pending: collections.deque[concurrent.futures.Future] = collections.deque()
  upcoming = iter(steps)
  try:
    for step in upcoming:
      pending.append(pool.submit(load, step))
      if len(pending) == buffer_batches:
        break
    while pending:
      batch = pending.popleft().result()
      step = next(upcoming, None)
      if step is not None:
        pending.append(pool.submit(load, step))
      yield batch
      del batch
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
