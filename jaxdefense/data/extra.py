"""Extra (generated) labelled images mixed into every training batch, at any size.

The field's strongest recipes (DeepMind's `cifar10_ddpm.npz`, DM-Improves-AT's `1m.npz` ...
`50m_partK.npz`) train on real images plus millions of generated ones, a fixed share of
every batch. This module reads such data without holding it in host memory:

- `open_sources(patterns, image_shape=..., num_classes=...)` checks every file before
  training starts (one `errors.DataError` line naming the file and what is wrong) and joins
  them into one index space, an `ExtraSource` with `read(indices)`. A file is an `.npz`
  with `image` uint8 (N, H, W, C) and `label` integers, or a directory made by `prepare`.
  Images are read by index with positioned reads, never a file whole: from the .npz itself
  when its `image` is stored uncompressed (`np.savez`: a stored zip member is contiguous
  bytes at a known offset), from the prepared shards otherwise. Only a compressed .npz
  (`np.savez_compressed`) is read whole into memory, up to `max_npz_bytes`; beyond that it
  must be `prepare`d.
- `prepare(source, output)` (`python -m jaxdefense.data.extra prepare --source=X.npz
  --output=DIR`) streams an .npz's images, one chunk in memory at a time, into standard
  .npy shards `images-KKKKK-of-NNNNN.npy`, `labels.npy` and `meta.json`.
- `batch_plan(seed=, step=, ...)` is a global batch's indices as a pure function of (seed,
  step), so a resumed run sees the batches of an uninterrupted one: E = round(f B) extra
  images (Python's round, half to even) drawn uniformly with replacement, as
  DM-Improves-AT's sampler draws its unsupervised ones, and R = B - E real ones in the real
  set's epoch order (`data.epoch_permutation`), in that order. Process p of P reads only
  the p-th of P equal contiguous slices of the global batch.
- `batches(...)` yields a process's batches, read ahead by background threads, at most
  `buffer_batches` of them held beyond the one being consumed.

The read-ahead is a plain `concurrent.futures` thread pool, not grain's
`MapDataset.map(...).to_iter_dataset(ReadOptions(...))`: measured on the same loading
function (benchmarks/data_pipeline.py, benchmarks/RESULTS.md) grain was no faster, so the
pool's dozen lines keep its bound on held batches exact and add no dependency.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import io
import json
import math
import os
import struct
import sys
import threading
import zipfile
import zlib
from typing import IO, Callable, Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from jaxdefense import data, errors
from jaxdefense.workdir import paths

MAX_NPZ_BYTES = 2**32  # A compressed .npz's images above this must be `prepare`d (read whole).
SHARD_IMAGES = 2**20
META = "meta.json"
LABELS = "labels.npy"
FORMAT = "jaxdefense.data.extra/1"
DEFAULT_THREADS = 4
_CHUNK_BYTES = 64 * 2**20  # `prepare` holds one chunk of images at a time.
_GLOB_CHARACTERS = "*?["
_PREPARE_COMMAND = "python -m jaxdefense.data.extra prepare --source={source} --output=DIR"


def _check_labels(where: str, labels: np.ndarray, num_images: int,
                  num_classes: int | None) -> np.ndarray:
  """`labels` as int32 if integers of shape (num_images,) in [0, num_classes)."""
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise errors.DataError(f"{where}: 'label' must be integers of shape (N,); got "
                           f"{labels.dtype} {labels.shape}")
  if len(labels) != num_images:
    raise errors.DataError(f"{where}: {num_images} images but {len(labels)} labels")
  low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
  limit = np.iinfo(np.int32).max if num_classes is None else num_classes - 1
  if low < 0 or high > limit:
    what = "non-negative int32" if num_classes is None else (
        f"in [0, {num_classes}) (the real data's classes)")
    raise errors.DataError(f"{where}: labels must lie {what}; got [{low}, {high}]")
  return labels.astype(np.int32)


def _check_images(where: str, shape: tuple[int, ...], dtype: np.dtype, fortran: bool,
                  image_shape: tuple[int, int, int] | None) -> None:
  if dtype != np.uint8:
    raise errors.DataError(f"{where}: 'image' must be uint8 (pixels 0..255); got {dtype}")
  if len(shape) != 4 or (image_shape is not None and shape[1:] != tuple(image_shape)):
    expected = "(N, H, W, C)" if image_shape is None else (
        f"(N, {', '.join(map(str, image_shape))}) as the real data's images")
    raise errors.DataError(f"{where}: 'image' must have shape {expected}; got {shape}")
  if fortran:
    raise errors.DataError(f"{where}: 'image' is stored in Fortran order; save it in C "
                           f"order (numpy's default)")
  if not shape[0]:
    raise errors.DataError(f"{where}: holds no images")


def _read_npy_header(stream: IO[bytes],
                     where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of the .npy array whose header `stream` starts with."""
  try:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
      return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
  except ValueError as e:
    raise errors.DataError(f"{where}: not a readable .npy array ({e})") from e


def _npy_header(shape: tuple[int, ...]) -> bytes:
  """The .npy (version 1.0) header of a C-order uint8 array of `shape`."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
               "fortran_order": False, "shape": shape})
  return buffer.getvalue()


def _stored_offset(file: IO[bytes], info: zipfile.ZipInfo) -> int | None:
  """Where an uncompressed, unencrypted zip member's bytes start in the archive `file`
  (after its local header), or None for a compressed or encrypted one."""
  if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
    return None
  file.seek(info.header_offset)
  header = file.read(30)
  if len(header) < 30 or header[:4] != b"PK\x03\x04":
    raise zipfile.BadZipFile(f"no local header for {info.filename} at {info.header_offset}")
  name_length, extra_length = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_length + extra_length


def _open_npz(path: epath.Path, stack: contextlib.ExitStack,
              image_shape: tuple[int, int, int] | None, num_classes: int | None,
              max_bytes: int | None = None
              ) -> tuple[IO[bytes], tuple[int, ...], np.ndarray, int | None]:
  """A checked .npz: its `image` member's stream positioned at the pixels, the images'
  shape, the int32 labels and, if the member is stored uncompressed (`np.savez`), the
  pixels' offset in the file (read by index, never whole). `max_bytes` bounds the
  (uncompressed) size of a compressed member's images, which are read whole."""
  try:
    file = stack.enter_context(path.open("rb"))
    archive = stack.enter_context(zipfile.ZipFile(file))
    names = archive.namelist()
    keys = sorted(n[:-len(".npy")] for n in names if n.endswith(".npy"))
    for key in ("image", "label"):
      if f"{key}.npy" not in names:
        raise errors.DataError(f"{path}: no {key!r} array (it holds {', '.join(keys) or 'none'}"
                               f"); extra data needs 'image' uint8 (N, H, W, C) and 'label' "
                               f"integers")
    stream = stack.enter_context(archive.open("image.npy"))
    shape, fortran, dtype = _read_npy_header(stream, f"{path} ('image')")
    _check_images(str(path), shape, dtype, fortran, image_shape)
    info = archive.getinfo("image.npy")
    start = _stored_offset(file, info)
    pixels = None if start is None else start + stream.tell()
    if max_bytes is not None and pixels is None and info.file_size > max_bytes:
      raise errors.DataError(
          f"{path}: {info.file_size / 1e9:.2f} GB of compressed images, over max_npz_bytes="
          f"{max_bytes} for a compressed .npz (read whole into memory); make it a prepared "
          f"directory, read by index, and list that instead: "
          f"{_PREPARE_COMMAND.format(source=path)}")
    with archive.open("label.npy") as member:
      labels = np.lib.format.read_array(member)
  except errors.DataError:
    raise
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    raise errors.DataError(f"{path}: not a readable .npz file ({e})") from e
  return stream, shape, _check_labels(str(path), labels, shape[0], num_classes), pixels


class _PositionedFile:
  """Reads at an offset without a shared file position: `os.preadv` on a local file (one
  descriptor, any number of threads), seek + readinto on a per-thread epath file object
  for a remote one."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._fd = None if paths.is_remote(path) else os.open(os.fspath(path), os.O_RDONLY)
    self._per_thread = threading.local()

  def _read_some(self, buffer: memoryview, offset: int) -> int:
    if self._fd is not None:
      return os.preadv(self._fd, [buffer], offset)
    file = getattr(self._per_thread, "file", None)
    if file is None:
      file = self._per_thread.file = self.path.open("rb")
    file.seek(offset)
    return file.readinto(buffer)

  def read_into(self, buffer: memoryview, offset: int) -> None:
    """Fills `buffer` with the bytes at `offset`; DataError naming the file if it ends first."""
    done = 0
    try:
      while done < len(buffer):
        count = self._read_some(buffer[done:], offset + done)
        if not count:
          raise errors.DataError(
              f"{self.path}: short read, {done} of {len(buffer)} bytes at offset {offset} (the "
              f"shard is truncated or damaged: prepare it again)")
        done += count
    except OSError as e:
      raise errors.DataError(f"{self.path}: read failed at offset {offset} ({e})") from e

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def _read_indexed(files: Sequence[_PositionedFile], offsets: Sequence[int], starts: np.ndarray,
                  image_shape: tuple[int, ...], indices: np.ndarray) -> np.ndarray:
  """Images at `indices`, in order, from contiguous uint8 images: file k's at offsets[k],
  holding indices starts[k] .. starts[k + 1] - 1. A run of consecutive sorted indices in one
  file is one positioned read."""
  unique, inverse = np.unique(indices, return_inverse=True)
  images = np.empty((len(unique), *image_shape), np.uint8)
  which = np.searchsorted(starts, unique, side="right") - 1
  breaks = np.flatnonzero((np.diff(unique) != 1) | (np.diff(which) != 0)) + 1
  begins = np.concatenate([[0], breaks]).tolist()
  ends = np.concatenate([breaks, [len(unique)]]).tolist()
  buffer = memoryview(images.reshape(-1))
  size = math.prod(image_shape)
  for begin, end in zip(begins, ends):
    k = int(which[begin])
    offset = offsets[k] + (int(unique[begin]) - int(starts[k])) * size
    files[k].read_into(buffer[begin * size:end * size], offset)
  return images[inverse]


class _Npz:
  """An .npz's images: read by index from the file when `image` is stored uncompressed
  (`np.savez`, as the released sets are), else read whole into memory on first use (under
  a lock), up to `max_npz_bytes`."""

  def __init__(self, path: epath.Path, image_shape: tuple[int, int, int], num_classes: int,
               max_npz_bytes: int):
    self.path = path
    with contextlib.ExitStack() as stack:
      _, shape, self.labels, pixels = _open_npz(path, stack, image_shape, num_classes,
                                                max_npz_bytes)
    self.num_examples = shape[0]
    self._image_shape = tuple(shape[1:])
    self._pixels = pixels
    self._file: _PositionedFile | None = None
    if pixels is not None:
      end = pixels + self.num_examples * math.prod(self._image_shape)
      try:
        length = path.stat().length
      except OSError as e:
        raise errors.DataError(f"{path}: cannot be read ({e})") from e
      if length < end:
        raise errors.DataError(f"{path}: {length} bytes, its 'image' needs {end} (a truncated "
                               f"file)")
      self._file = _PositionedFile(path)
    self._images: np.ndarray | None = None
    self._lock = threading.Lock()

  def read_images(self, indices: np.ndarray) -> np.ndarray:
    if self._file is not None:
      return _read_indexed([self._file], [self._pixels], np.array([0, self.num_examples]),
                           self._image_shape, indices)
    images = self._images
    if images is None:
      with self._lock:
        if self._images is None:
          with self.path.open("rb") as file, np.load(file) as archive:
            self._images = archive["image"]
        images = self._images
    return images[indices]

  def close(self) -> None:
    self._images = None
    if self._file is not None:
      self._file.close()


class _Prepared:
  """A directory made by `prepare`: each image read by index from its shard."""

  def __init__(self, path: epath.Path, image_shape: tuple[int, int, int], num_classes: int):
    self.path = path
    meta_path = path / META
    if not meta_path.exists():
      raise errors.DataError(f"{path}: a directory without {META}: not made by `python -m "
                             f"jaxdefense.data.extra prepare`, or its prepare did not finish (for "
                             f"a directory of .npz files, give DIR/*.npz)")
    try:
      meta = json.loads(meta_path.read_text())
      self.num_examples = int(meta["num_examples"])
      shape = tuple(meta["image_shape"])
      shards = [(s["file"], int(s["num_images"]), int(s["offset"]), int(s["bytes"]))
                for s in meta["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise errors.DataError(f"{meta_path}: not a readable {META} of a prepared directory "
                             f"({e!r})") from e
    if shape != tuple(image_shape):
      raise errors.DataError(f"{path}: images of shape {shape}, not the real data's "
                             f"{tuple(image_shape)}")
    self._image_shape = shape
    self._image_bytes = math.prod(shape)
    if sum(s[1] for s in shards) != self.num_examples:
      raise errors.DataError(f"{meta_path}: its shards hold {sum(s[1] for s in shards)} "
                             f"images, not num_examples={self.num_examples}")
    labels_path = path / LABELS
    try:
      with labels_path.open("rb") as file:
        labels = np.lib.format.read_array(file)
    except (OSError, ValueError, EOFError) as e:
      raise errors.DataError(f"{labels_path}: not a readable .npy array ({e})") from e
    self.labels = _check_labels(str(labels_path), labels, self.num_examples, num_classes)
    self._files: list[_PositionedFile] = []
    self._offsets = [offset for _, _, offset, _ in shards]
    try:
      for name, count, offset, size in shards:
        self._files.append(self._open_shard(path / name, count, offset, size))
    except BaseException:
      self.close()
      raise
    self._starts = np.cumsum([0] + [s[1] for s in shards])

  def _open_shard(self, shard: epath.Path, count: int, offset: int,
                  size: int) -> _PositionedFile:
    try:
      actual = shard.stat().length
      if actual != size or size != offset + count * self._image_bytes:
        raise errors.DataError(f"{shard}: {actual} bytes, {META} says {size} for {count} "
                               f"images (truncated or damaged: prepare it again)")
      return _PositionedFile(shard)
    except FileNotFoundError as e:
      raise errors.DataError(f"{shard}: missing (listed in {self.path / META})") from e
    except OSError as e:
      raise errors.DataError(f"{shard}: cannot be read ({e})") from e

  def read_images(self, indices: np.ndarray) -> np.ndarray:
    return _read_indexed(self._files, self._offsets, self._starts, self._image_shape, indices)

  def close(self) -> None:
    for file in getattr(self, "_files", []):
      file.close()


class ExtraSource:
  """Extra images of several files as one index space: file k holds indices starts[k] ..
  starts[k + 1] - 1, in the order of the patterns (a glob's matches sorted)."""

  def __init__(self, files: Sequence[_Npz | _Prepared], image_shape: tuple[int, int, int]):
    self._files = list(files)
    self.image_shape = tuple(image_shape)
    self.paths = tuple(str(f.path) for f in self._files)
    self._starts = np.cumsum([0] + [f.num_examples for f in self._files])
    self.num_examples = int(self._starts[-1])
    self._labels = np.concatenate([f.labels for f in self._files])

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, H, W, C), labels int32 (n,)) at `indices`, in their order."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
      raise ValueError(f"indices must be a 1-D integer array; got {indices.dtype} "
                       f"{indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"indices must lie in [0, {self.num_examples}); got "
                       f"[{indices.min()}, {indices.max()}]")
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    which = np.searchsorted(self._starts, indices, side="right") - 1
    for k in np.unique(which).tolist():
      selected = which == k
      images[selected] = self._files[k].read_images(indices[selected] - self._starts[k])
    return images, self._labels[indices]

  def close(self) -> None:
    """Closes the shards' files and drops the images read from .npz files."""
    for file in self._files:
      file.close()

  def __enter__(self) -> ExtraSource:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _expand(pattern: str) -> list[epath.Path]:
  """The paths a file name or glob (local or remote) stands for; DataError if none."""
  if not paths.is_remote(pattern):
    pattern = os.path.expanduser(pattern)
  first = min((pattern.find(c) for c in _GLOB_CHARACTERS if c in pattern), default=-1)
  if first < 0:
    path = epath.Path(pattern)
    if not path.exists():
      raise errors.DataError(f"extra data file {pattern} does not exist")
    return [path]
  cut = pattern.rfind("/", 0, first)
  root = pattern[:cut] if cut > 0 else ("/" if cut == 0 else ".")
  matches = sorted(epath.Path(root).glob(pattern[cut + 1:]))
  if not matches:
    raise errors.DataError(f"extra data pattern {pattern} matches no file")
  return matches


def _open_file(path: epath.Path, image_shape: tuple[int, int, int], num_classes: int,
               max_npz_bytes: int) -> _Npz | _Prepared:
  try:
    is_dir = path.is_dir()
  except OSError as e:
    raise errors.DataError(f"{path}: cannot be read ({e})") from e
  if is_dir:
    return _Prepared(path, image_shape, num_classes)
  if path.name.endswith(".npz"):
    return _Npz(path, image_shape, num_classes, max_npz_bytes)
  raise errors.DataError(f"{path}: neither an .npz file nor a directory made by `python -m "
                         f"jaxdefense.data.extra prepare`")


def open_sources(patterns: Sequence[str], *, image_shape: tuple[int, int, int],
                 num_classes: int, max_npz_bytes: int = MAX_NPZ_BYTES) -> ExtraSource:
  """Checks the extra data files (files or globs, local or remote; .npz or prepared
  directories) against the real data's image shape and classes, and joins them.

  Every fault is one `errors.DataError` naming the file: missing, unreadable, without
  `image` or `label`, images not uint8 of shape (N, *image_shape), labels not integers in
  [0, num_classes), unequal counts, an .npz's images over `max_npz_bytes`, a prepared shard
  of another size than its meta.json says.
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  if not patterns:
    raise ValueError("open_sources needs at least one extra data file or pattern")
  files: list[_Npz | _Prepared] = []
  try:
    for pattern in patterns:
      for path in _expand(str(pattern)):
        files.append(_open_file(path, tuple(image_shape), num_classes, max_npz_bytes))
  except BaseException:
    for file in files:
      file.close()
    raise
  return ExtraSource(files, image_shape)


def write_prepared(output: epath.PathLike, images: Iterable[np.ndarray], labels: np.ndarray, *,
                   image_shape: tuple[int, int, int], source: str,
                   shard_images: int = SHARD_IMAGES) -> None:
  """Writes the prepared format into the new (or empty) directory `output` from chunks of
  uint8 images (k, H, W, C), which must add up to len(labels): shards `images-KKKKK-of-
  NNNNN.npy` of `shard_images` images each (the last one fewer), standard .npy files,
  `labels.npy` (int32) and, last, `meta.json`, so a directory with one is complete."""
  if shard_images < 1:
    raise errors.ConfigError(f"shard_images must be >= 1; got {shard_images}")
  output = epath.Path(output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise errors.DataError(f"{output} already exists and is not an empty directory: prepare "
                           f"writes a new one")
  labels = _check_labels(source, np.asarray(labels), len(labels), None)
  if not len(labels):
    raise errors.DataError(f"{source}: holds no images")
  output.mkdir(parents=True, exist_ok=True)
  num, image_bytes = len(labels), math.prod(image_shape)
  num_shards = -(-num // shard_images)
  chunks, pending = iter(images), np.empty((0, *image_shape), np.uint8)
  shards = []
  for k in range(num_shards):
    count = min(shard_images, num - k * shard_images)
    name = f"images-{k:05d}-of-{num_shards:05d}.npy"
    header = _npy_header((count, *image_shape))
    with (output / name).open("wb") as file:
      file.write(header)
      left = count
      while left:
        if not len(pending):
          pending = next(chunks, None)
          if pending is None:
            raise ValueError(f"{source}: the images end after {k * shard_images + count - left} "
                             f"of {num}")
          if pending.dtype != np.uint8 or pending.shape[1:] != tuple(image_shape):
            raise ValueError(f"{source}: image chunks must be uint8 (k, "
                             f"{', '.join(map(str, image_shape))}); got {pending.dtype} "
                             f"{pending.shape}")
        part, pending = pending[:left], pending[left:]
        file.write(np.ascontiguousarray(part).reshape(-1).data)
        left -= len(part)
    shards.append({"file": name, "num_images": count, "offset": len(header),
                   "bytes": len(header) + count * image_bytes})
  if len(pending) or next(chunks, None) is not None:
    raise ValueError(f"{source}: more images than its {num} labels")
  buffer = io.BytesIO()
  np.save(buffer, labels)
  paths.write_bytes(output / LABELS, buffer.getvalue())
  meta = {"format": FORMAT, "num_examples": num, "image_shape": list(image_shape),
          "source": source, "shards": shards}
  paths.write_text(output / META, json.dumps(meta, indent=1) + "\n")


def prepare(source: str, output: str, *, shard_images: int = SHARD_IMAGES) -> None:
  """Streams the .npz `source`'s images into the prepared directory `output`, one chunk of
  about 64 MiB in memory at a time (see `write_prepared`); the source's CRC-32 is checked."""
  path = epath.Path(source if paths.is_remote(source) else os.path.expanduser(source))
  if not path.exists():
    raise errors.DataError(f"extra data file {source} does not exist")
  with contextlib.ExitStack() as stack:
    stream, shape, labels, _ = _open_npz(path, stack, None, None)
    image_bytes = math.prod(shape[1:])
    per_chunk = max(1, _CHUNK_BYTES // image_bytes)

    def chunks() -> Iterator[np.ndarray]:
      try:
        for start in range(0, shape[0], per_chunk):
          count = min(per_chunk, shape[0] - start)
          pixels = _read_exact(stream, count * image_bytes)
          if len(pixels) < count * image_bytes:
            raise errors.DataError(f"{path}: 'image' ends after "
                                   f"{start + len(pixels) // image_bytes} of {shape[0]} images "
                                   f"(a truncated file)")
          yield np.frombuffer(pixels, np.uint8).reshape(count, *shape[1:])
        stream.read(1)  # Reaching the member's end makes zipfile check its CRC-32.
      except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise errors.DataError(f"{path}: 'image' cannot be read ({e})") from e

    write_prepared(output, chunks(), labels, image_shape=shape[1:],
                   source=str(paths.resolve(path)),
                   shard_images=shard_images)


def _read_exact(stream: IO[bytes], size: int) -> bytes:
  """`size` bytes of `stream`, fewer only where it ends."""
  parts = []
  while size:
    part = stream.read(size)
    if not part:
      break
    parts.append(part)
    size -= len(part)
  return b"".join(parts)


def check_batch(batch_size: int, extra_fraction: float,
                process_count: int = 1) -> tuple[int, int]:
  """(R, E): a global batch's real and extra images, E = round(extra_fraction x batch_size),
  R = batch_size - E. ValueError naming the numbers unless 0 <= extra_fraction < 1, R >= 1,
  and batch_size is a multiple of process_count (each process gets an equal slice)."""
  if not 0 <= extra_fraction < 1:
    raise ValueError(f"extra_fraction must lie in [0, 1); got {extra_fraction}")
  if batch_size < 1 or process_count < 1:
    raise ValueError(f"batch_size and process_count must be >= 1; got batch_size={batch_size}, "
                     f"process_count={process_count}")
  extra = round(extra_fraction * batch_size)
  real = batch_size - extra
  if not real:
    raise ValueError(f"extra_fraction={extra_fraction} leaves no real image in a batch of "
                     f"{batch_size} (round({extra_fraction} x {batch_size}) = {extra} extra)")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a multiple of process_count="
                     f"{process_count} (each process reads an equal slice of every batch)")
  return real, extra


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  order = data.epoch_permutation(num_examples, seed=seed, epoch=epoch)
  order.setflags(write=False)
  return order


def batch_plan(*, seed: int, step: int, batch_size: int, extra_fraction: float, num_real: int,
               num_extra: int, process_index: int = 0,
               process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """This process's (real indices, extra indices) of global step `step`, a function of
  (seed, step) only.

  The global batch is R real images then E extra ones. Real: slice step % S of R of
  `data.epoch_permutation(num_real, seed, epoch=step // S)`, S = num_real // R steps per
  real epoch. Extra: E indices uniform in [0, num_extra) with replacement, from numpy's
  legacy `RandomState` (streams fixed across numpy versions) on the counter-based Philox
  keyed by (seed, step). Process p of P reads positions p B / P .. (p + 1) B / P - 1 of
  the global batch only (its real ones, then its extra ones), so the batch, and every
  per-position random draw of the step, is the same for any number of processes.
  """
  real, extra = check_batch(batch_size, extra_fraction, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}); got {process_index}")
  if seed < 0 or step < 0:
    raise ValueError(f"seed and step must be non-negative; got seed={seed}, step={step}")
  steps = num_real // real
  if not steps:
    raise ValueError(f"{real} real images per batch exceed the {num_real} real training images")
  if extra and num_extra < 1:
    raise ValueError(f"{extra} extra images per batch need extra data; got num_extra="
                     f"{num_extra}")
  local = batch_size // process_count
  begin, end = process_index * local, (process_index + 1) * local
  order = _epoch_order(num_real, seed, step // steps)
  within = (step % steps) * real
  real_indices = order[within + min(begin, real):within + min(end, real)].astype(np.int64)
  extra_indices = np.empty(0, np.int64)
  if extra:
    generator = np.random.RandomState(np.random.Philox(key=[seed, step]))
    extra_indices = generator.randint(0, num_extra, size=extra, dtype=np.int64)
  return real_indices, extra_indices[max(begin - real, 0):max(end - real, 0)]


def _read_ahead(load: Callable[[int], dict], steps: range, buffer_batches: int,
                num_threads: int) -> Iterator[dict]:
  """load(step) for each step, in order, computed by `num_threads` threads at most
  `buffer_batches` steps ahead of the one last yielded."""
  pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="extra-read")
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


def load_batch(dataset: data.Dataset, source: ExtraSource | None, *, seed: int, step: int,
               batch_size: int, extra_fraction: float, process_index: int = 0,
               process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's batch of global step `step` of `batch_plan`: {"images": uint8 (B / P, H,
  W, C), "labels": int32, "extra": bool}, the real share first, then the extra one (from
  `source`; None only if E = 0)."""
  check_batch(batch_size, extra_fraction, process_count)
  if source is not None and source.image_shape != tuple(dataset.image_shape):
    raise ValueError(f"the extra images' shape {source.image_shape} is not the real data's "
                     f"{tuple(dataset.image_shape)}")
  real_indices, extra_indices = batch_plan(
      seed=seed, step=step, batch_size=batch_size, extra_fraction=extra_fraction,
      num_real=len(dataset.train_labels), num_extra=0 if source is None else source.num_examples,
      process_index=process_index, process_count=process_count)
  local_real, local = len(real_indices), batch_size // process_count
  images = np.empty((local, *dataset.image_shape), np.uint8)
  labels = np.empty(local, np.int32)
  images[:local_real] = dataset.train_images[real_indices]
  labels[:local_real] = dataset.train_labels[real_indices]
  if len(extra_indices):
    images[local_real:], labels[local_real:] = source.read(extra_indices)
  return {"images": images, "labels": labels, "extra": np.arange(local) >= local_real}


def batches(dataset: data.Dataset, source: ExtraSource | None, *, seed: int, start_step: int,
            num_steps: int, batch_size: int, extra_fraction: float, process_index: int = 0,
            process_count: int = 1, buffer_batches: int = 4,
            num_threads: int = DEFAULT_THREADS) -> Iterator[dict[str, np.ndarray]]:
  """`load_batch` of steps start_step .. start_step + num_steps - 1, in order, read ahead by
  `num_threads` threads, at most `buffer_batches` batches beyond the one being consumed:
  host memory is bounded by the buffer whatever the source's size. A DataError of a read
  (a damaged shard) is raised where its batch is consumed; the arguments are checked here.
  """
  if buffer_batches < 1 or num_threads < 1 or num_steps < 0 or start_step < 0:
    raise ValueError(f"buffer_batches and num_threads must be >= 1, num_steps and start_step "
                     f">= 0; got {buffer_batches}, {num_threads}, {num_steps}, {start_step}")
  options = dict(seed=seed, batch_size=batch_size, extra_fraction=extra_fraction,
                 process_index=process_index, process_count=process_count)
  if source is not None and source.image_shape != tuple(dataset.image_shape):
    raise ValueError(f"the extra images' shape {source.image_shape} is not the real data's "
                     f"{tuple(dataset.image_shape)}")
  batch_plan(step=start_step, num_real=len(dataset.train_labels),  # Checks the rest.
             num_extra=0 if source is None else source.num_examples, **options)
  return _read_ahead(lambda step: load_batch(dataset, source, step=step, **options),
                     range(start_step, start_step + num_steps), buffer_batches, num_threads)


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error:` line, exit 2 (errors.ConfigError's code)."""

  def error(self, message: str):
    print(f"error: {message} (--help lists the flags)", file=sys.stderr, flush=True)
    sys.exit(errors.ConfigError.exit_code)


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m jaxdefense.data.extra prepare --source=X.npz --output=DIR [--shard_images=N]`."""
  from jaxdefense import cli  # noqa: PLC0415 (absl and ml_collections: the command only)
  parser = _ArgumentParser(prog="python -m jaxdefense.data.extra",
                           description="Extra (generated) training data.")
  commands = parser.add_subparsers(dest="command", required=True)
  command = commands.add_parser(
      "prepare", help="an .npz (local or gs://) as a directory of .npy shards read by index")
  command.add_argument("--source", required=True, help="the .npz with 'image' and 'label'")
  command.add_argument("--output", required=True, help="the new directory (local or gs://)")
  command.add_argument("--shard_images", type=int, default=SHARD_IMAGES,
                       help=f"images per shard (default {SHARD_IMAGES})")
  args = parser.parse_args(argv)
  with cli.faults_as_one_line():
    prepare(args.source, args.output, shard_images=args.shard_images)
    meta = json.loads((epath.Path(args.output) / META).read_text())
  print(f"prepared {meta['num_examples']} images of {args.source} in {args.output} "
        f"({len(meta['shards'])} shards)")



def open_from_config(config) -> ExtraSource | None:
  """The extra (generated) images of `data.extra`, checked against the real data's image
  shape and classes without loading it (one `errors.DataError` line naming a faulty file);
  None without extra data."""
  d = config.data
  if not d.extra:
    return None
  return open_sources(tuple(d.extra), image_shape=data.image_shape(d.name, d.image_size),
                            num_classes=data.NUM_CLASSES[d.name])


def steps_per_epoch(config, num_real: int) -> int:
  """Steps per epoch: full batches of the real set (num_real // B) without extra data;
  with it, by `data.epoch_steps`: "real", one pass over the real images at R real ones a
  batch (num_real // R), or "batch", ceil(num_real / B) steps (DM-Improves-AT's count)."""
  batch_size = config.train.batch_size
  if not config.data.extra:
    return data.steps_per_epoch(num_real, batch_size)
  if config.data.epoch_steps == "real":
    real, _ = check_batch(batch_size, config.data.extra_fraction)
    return num_real // real
  return -(-num_real // batch_size)


if __name__ == "__main__":
  main()
