"""Images/s per host of the extra-data pipeline (`jaxdefense.data.batching.batches`).

```
python benchmarks/data_pipeline.py                        # 1M extra images, as in RESULTS.md
python benchmarks/data_pipeline.py --num_extra=100000 --seconds=3   # a quick look
python benchmarks/data_pipeline.py --modes=gcs_npz,gcs_prepared,gcs_copying,gcs_copied \
    --loaders=threads --batch_sizes=512                  # from a bucket, as in RESULTS.md
```

A synthetic source of `--num_extra` CIFAR-sized (32x32x3 uint8) images is written once, in
chunks, as an uncompressed .npz (zip members streamed, never one array in memory) under
`--dir` (a new temporary directory by default, deleted at the end unless --keep), then made
a prepared directory by `writer.prepare` (timed). The real set is `--num_real` synthetic
images in memory. Each batch size runs with extra_fraction `--extra_fraction`, the source:

- `memory`: the extra images held in host memory (an array), the baseline;
- `npz`: the .npz read by index at its stored member's offset (page cache warm);
- `prepared`: the prepared directory on local disk, read by index (page cache warm);
- `prepared_cold`: the same, its shards dropped from the page cache first
  (`posix_fadvise(DONTNEED)`), so reads come from the disk until cached again,

and each loader: `threads` (`batching.batches`, a `concurrent.futures` pool) and `grain`
(`grain.MapDataset.range(...).map(batching.load_batch).to_iter_dataset(ReadOptions(...))`,
the same loading function, if grain is installed). Images/s counts real and extra images
of the batches consumed in `--seconds` after a warm-up of `--warmup` batches.

Then the data wait of a training loop: `batching.batches` feeding a simulated host whose
accelerators consume `--device_rate` images/s (default 8 x 1,300: eight H100s in the
WRN-34-10 PGD-10 step), each step's compute a sleep (an accelerator leaves the host's cores
free), the time blocked in `next()` summed over `--wait_steps` steps after the warm-up.

From a bucket (`--modes=gcs_npz,gcs_copying,gcs_copied`, and `gcs_prepared`):
fake-gcs-server, started on a loopback port (tests/storage_server.py), is given the .npz (and
the prepared directory for `gcs_prepared`) once, straight; the reads then go through a
loopback proxy (tests/latency_proxy.py, a process of its own) that delays every request by
`--latency_s` (30 ms) and caps the server's bytes at `--bandwidth` (200 MB/s, one host's
link), pointed at by STORAGE_EMULATOR_HOST. `gcs_npz` and `gcs_prepared` read by index from
the bucket, `--read_concurrency` requests in flight; `gcs_copying` reads the .npz with a
new `cache_dir`, measured while the local copy is made; `gcs_copied` is measured once it
is complete (its time reported).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Iterator

import numpy as np
from etils import epath

from jaxdefense import data
from jaxdefense.data import batching, read_ahead, sources, writer

IMAGE_SHAPE = (32, 32, 3)
CHUNK_IMAGES = 65536
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET_MODES = ("gcs_npz", "gcs_prepared", "gcs_copying", "gcs_copied")
UPLOAD_PART_BYTES = 512 * 2**20


def write_npz(path: epath.Path, num: int, seed: int) -> None:
  """An .npz of `num` random images and labels, its `image` member written in chunks."""
  rng = np.random.default_rng(seed)
  with path.open("wb") as file, zipfile.ZipFile(file, "w") as archive:
    with archive.open("label.npy", "w") as member:
      np.lib.format.write_array(member, rng.integers(0, 10, num).astype(np.int64))
    with archive.open("image.npy", "w", force_zip64=True) as member:
      np.lib.format.write_array_header_1_0(
          member, {"descr": "|u1", "fortran_order": False, "shape": (num, *IMAGE_SHAPE)})
      for start in range(0, num, CHUNK_IMAGES):
        count = min(CHUNK_IMAGES, num - start)
        member.write(rng.bytes(count * int(np.prod(IMAGE_SHAPE))))


def drop_page_cache(directory: epath.Path) -> None:
  """Asks the kernel to drop the shards' pages from its cache (after writing them out)."""
  for shard in directory.glob("images-*.npy"):
    fd = os.open(os.fspath(shard), os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def grain_batches(dataset: data.Dataset, source: sources.ExtraSource, *, seed: int,
                  start_step: int, num_steps: int, batch_size: int, extra_fraction: float,
                  buffer_batches: int, num_threads: int) -> Iterator[dict[str, np.ndarray]]:
  """`batching.batches` through grain: the same `load_batch`, grain's threads and buffer."""
  import grain  # noqa: PLC0415 (optional)

  plan = batching.plan_for(dataset, source, seed=seed, batch_size=batch_size,
                           extra_fraction=extra_fraction)
  load = functools.partial(batching.load_batch, dataset, source, plan)
  steps = grain.MapDataset.range(start_step, start_step + num_steps).map(load)
  return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=buffer_batches)))


class InMemorySource:
  """Extra images held in host memory, as `sources.ExtraSource` reads them (the baseline)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels.astype(np.int32)
    self.image_shape, self.num_examples = images.shape[1:], len(labels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]

  def close(self) -> None:
    pass


@contextlib.contextmanager
def bucket(args: argparse.Namespace, npz: epath.Path, prepared: epath.Path,
           modes: list[str]) -> Iterator[str]:
  """A loopback fake-gcs-server given the source, behind the latency proxy, which
  STORAGE_EMULATOR_HOST names for the block; yields the bucket's gs:// root."""
  import fsspec  # noqa: PLC0415 (gcsfs: the `gcs` extra)
  sys.path.insert(0, ROOT)
  from tests import latency_proxy, storage_server  # noqa: PLC0415

  with storage_server.running() as url:
    root = f"gs://{storage_server.BUCKET}"
    start = time.perf_counter()
    fs = fsspec.filesystem("gcs", endpoint_url=url, skip_instance_cache=True)
    uploads = [(npz, f"{root}/extra.npz")]
    if "gcs_prepared" in modes:
      uploads += [(f, f"{root}/prepared/{f.name}") for f in sorted(prepared.iterdir())]
    for local, remote in uploads:  # In few big parts: the server rewrites the object per part.
      fs.put_file(os.fspath(local), remote, chunksize=UPLOAD_PART_BYTES)
    print(f"uploaded to fake-gcs-server in {time.perf_counter() - start:.1f} s; reads through "
          f"a proxy adding {1e3 * args.latency_s:g} ms a request, {args.bandwidth / 1e6:g} MB/s")
    with latency_proxy.process(int(url.rsplit(":", 1)[1]), latency_s=args.latency_s,
                               bandwidth=args.bandwidth) as proxy:
      os.environ["STORAGE_EMULATOR_HOST"] = proxy
      fsspec.get_filesystem_class("gcs").clear_instance_cache()
      yield root


def open_source(mode: str, npz: epath.Path, prepared: epath.Path, args: argparse.Namespace,
                bucket_root: str | None):
  if mode == "memory":
    with npz.open("rb") as file, np.load(file) as archive:
      return InMemorySource(archive["image"], archive["label"])
  if mode not in BUCKET_MODES:
    return sources.open_sources([os.fspath(npz if mode == "npz" else prepared)],
                                image_shape=IMAGE_SHAPE, num_classes=10)
  path = f"{bucket_root}/{'prepared' if mode == 'gcs_prepared' else 'extra.npz'}"
  cache = None
  if mode == "gcs_copied":  # Copied once, by the first open: the second reuses it.
    cache = os.fspath(npz.parent / "cache")
  elif mode == "gcs_copying":  # A new copy at each open.
    cache = os.fspath(npz.parent / "cache-copying")
    shutil.rmtree(cache, ignore_errors=True)
  source = sources.open_sources([path], image_shape=IMAGE_SHAPE, num_classes=10,
                                read_concurrency=args.read_concurrency, cache_dir=cache)
  if mode == "gcs_copied":
    start = time.perf_counter()
    while source.copied_fraction() < 1 and time.perf_counter() - start < args.copy_timeout:
      time.sleep(0.1)
    print(f"local copy: {time.perf_counter() - start:.1f} s ({source.copied_fraction():.0%})",
          flush=True)
  return source


def measure_wait(dataset: data.Dataset, source, args: argparse.Namespace,
                 batch_size: int) -> tuple[float, float]:
  """(total seconds blocked on data, seconds of simulated compute) over `args.wait_steps`
  steps of `batching.batches` consumed at `args.device_rate` images/s."""
  iterator = batching.batches(dataset, source, seed=0, start_step=0, num_steps=10**9,
                              batch_size=batch_size, extra_fraction=args.extra_fraction,
                              buffer_batches=args.buffer_batches, num_threads=args.num_threads)
  compute = batch_size / args.device_rate
  waited = 0.0
  with contextlib.closing(iterator):
    for _ in range(args.warmup):
      next(iterator)
    for _ in range(args.wait_steps):
      start = time.perf_counter()
      next(iterator)
      waited += time.perf_counter() - start
      time.sleep(compute)
  return waited, compute * args.wait_steps


def measure(loader: str, dataset: data.Dataset, source: sources.ExtraSource,
            args: argparse.Namespace, batch_size: int) -> tuple[float, float]:
  """(images/s, this process's CPU seconds per image) of the batches consumed in
  `args.seconds` after `args.warmup` batches."""
  options = dict(seed=0, start_step=0, num_steps=10**9, batch_size=batch_size,
                 extra_fraction=args.extra_fraction, buffer_batches=args.buffer_batches,
                 num_threads=args.num_threads)
  make = batching.batches if loader == "threads" else grain_batches
  iterator = make(dataset, source, **options)
  with contextlib.closing(iterator) if hasattr(iterator, "close") else contextlib.nullcontext():
    for _ in range(args.warmup):
      next(iterator)
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < args.seconds:
      batch = next(iterator)
      count += len(batch["labels"])
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_extra", type=int, default=1_000_000)
  parser.add_argument("--num_real", type=int, default=50_000)
  parser.add_argument("--batch_sizes", default="512,128")
  parser.add_argument("--extra_fraction", type=float, default=0.7)
  parser.add_argument("--modes", default="memory,npz,prepared,prepared_cold",
                      help=f"also {', '.join(BUCKET_MODES)}: from fake-gcs-server")
  parser.add_argument("--latency_s", type=float, default=0.03,
                      help="bucket modes: added to every request")
  parser.add_argument("--bandwidth", type=float, default=2e8,
                      help="bucket modes: bytes/s from the server, all connections together")
  parser.add_argument("--read_concurrency", type=int, default=sources.READ_CONCURRENCY,
                      help="bucket modes: range requests in flight")
  parser.add_argument("--copy_timeout", type=float, default=600.0,
                      help="gcs_copied: the most seconds to wait for the local copy")
  parser.add_argument("--device_rate", type=float, default=8 * 1300,
                      help="images/s the simulated accelerators of a host consume")
  parser.add_argument("--wait_steps", type=int, default=200)
  parser.add_argument("--loaders", default="threads,grain")
  parser.add_argument("--buffer_batches", type=int, default=4)
  parser.add_argument("--num_threads", type=int, default=read_ahead.DEFAULT_THREADS)
  parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
  parser.add_argument("--warmup", type=int, default=20, help="batches before timing")
  parser.add_argument("--dir", default=None, help="where the source goes (default: a new "
                                                  "temporary directory)")
  parser.add_argument("--keep", action="store_true", help="keep the source files")
  args = parser.parse_args()
  loaders = args.loaders.split(",")
  if "grain" in loaders:
    if importlib.util.find_spec("grain") is None:
      print("grain is not installed: measuring the thread pool only")
      loaders.remove("grain")
  root = epath.Path(args.dir or tempfile.mkdtemp(prefix="extra-benchmark-"))
  root.mkdir(parents=True, exist_ok=True)
  npz, prepared = root / "extra.npz", root / "prepared"
  try:
    start = time.perf_counter()
    write_npz(npz, args.num_extra, seed=1)
    print(f"wrote {npz} ({npz.stat().length / 1e9:.2f} GB) in "
          f"{time.perf_counter() - start:.1f} s")
    modes = args.modes.split(",")
    if any("prepared" in mode for mode in modes):
      start = time.perf_counter()
      writer.prepare(os.fspath(npz), os.fspath(prepared))
      seconds = time.perf_counter() - start
      print(f"prepare: {args.num_extra / seconds:,.0f} images/s "
            f"({npz.stat().length / 1e6 / seconds:,.0f} MB/s), {seconds:.1f} s")
    with (bucket(args, npz, prepared, modes) if set(modes) & set(BUCKET_MODES)
          else contextlib.nullcontext()) as bucket_root:
      measure_all(args, loaders, modes, npz, prepared, bucket_root)
  finally:
    if args.keep:
      print(f"kept {root}")
    else:
      shutil.rmtree(os.fspath(root), ignore_errors=True)


def measure_all(args: argparse.Namespace, loaders: list[str], modes: list[str],
                npz: epath.Path, prepared: epath.Path, bucket_root: str | None) -> None:
  """The images/s table, then the data wait table, of every mode."""
  dataset = data.synthetic(num_train=args.num_real, num_test=1, seed=0)
  print(f"cpu: {_cpu()}; load: {os.getloadavg()[0]:.2f}; extra_fraction "
        f"{args.extra_fraction}; buffer_batches {args.buffer_batches}; num_threads "
        f"{args.num_threads}")
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  print("| source | loader | " + " | ".join(f"batch {b} img/s" for b in batch_sizes) + " |")
  for mode in modes:
    with contextlib.closing(open_source(mode, npz, prepared, args, bucket_root)) as source:
      for loader in loaders:
        rates = []
        for batch_size in batch_sizes:
          if mode == "prepared_cold":
            drop_page_cache(prepared)
          rates.append(measure(loader, dataset, source, args, batch_size))
        print(f"| {mode} | {loader} | " + " | ".join(f"{r:,.0f}" for r, _ in rates) + " |",
              flush=True)
        if mode in BUCKET_MODES:
          print("  this process's CPU per image: " + ", ".join(
              f"{1e6 * c:.0f} us at batch {b}" for (_, c), b in zip(rates, batch_sizes))
              + f"; copied locally: {source.copied_fraction():.0%}", flush=True)
  print(f"data wait at {args.device_rate:,.0f} images/s of simulated accelerators, "
        f"{args.wait_steps} steps (threads loader):")
  print("| source | batch | wait per step (ms) | wait / step time |")
  for mode in modes:
    with contextlib.closing(open_source(mode, npz, prepared, args, bucket_root)) as source:
      for batch_size in batch_sizes:
        if mode == "prepared_cold":
          drop_page_cache(prepared)
        waited, computed = measure_wait(dataset, source, args, batch_size)
        print(f"| {mode} | {batch_size} | {1e3 * waited / args.wait_steps:.2f} | "
              f"{100 * waited / (waited + computed):.1f}% |", flush=True)


def _cpu() -> str:
  lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  name = next((l.split(":", 1)[1].strip() for l in lines.splitlines()
               if l.startswith("Model name")), "unknown")
  return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
  main()
