"""Extra (generated) labelled images, checked and read by index, at any size.

The field's strongest recipes (DeepMind's `cifar10_ddpm.npz`, DM-Improves-AT's `1m.npz` ...
`50m_partK.npz`) train on real images plus millions of generated ones. `open_sources(patterns,
image_shape=..., num_classes=...)` checks every file before training starts (one
`errors.DataError` line naming the file and what is wrong) and joins them into one index
space, an `ExtraSource` with `read(indices)`. A file is an `.npz` with `image` uint8 (N, H, W,
C) and `label` integers, or a directory of `.npy` shards made by `python -m
jaxdefense.data.prepare` (jaxdefense/data/writer.py). Images are read by index with
positioned reads, never a file whole: from the .npz itself when its `image` is stored
uncompressed (`np.savez`: a stored zip member is contiguous bytes at a known offset), from
the prepared shards otherwise. Only a compressed .npz (`np.savez_compressed`) is read whole
into memory, up to `max_npz_bytes`; beyond that it must be prepared. A remote file's reads of
a batch are all in flight at once (`remote.py`), and may be served from a local copy made in
the background (`cache.py`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
import zipfile
import zlib
from typing import IO, Sequence

import numpy as np
from etils import epath

from jaxdefense import errors
from jaxdefense.data import cache, datasets, remote
from jaxdefense.workdir import paths

MAX_NPZ_BYTES = 2**32  # A compressed .npz's images above this must be prepared (read whole).
# A prepared directory: shards `images-KKKKK-of-NNNNN.npy`, LABELS and, written last, META.
META = "meta.json"
LABELS = "labels.npy"
PREPARE_COMMAND = "python -m jaxdefense.data.prepare"
READ_CONCURRENCY = 256  # Remote range requests in flight per source (data.read_concurrency).
_GLOB_CHARACTERS = "*?["


def check_labels(where: str, labels: np.ndarray, num_images: int,
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


def open_npz(path: epath.Path, stack: contextlib.ExitStack,
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
          f"{PREPARE_COMMAND} --source={path} --output=DIR")
    with archive.open("label.npy") as member:
      labels = np.lib.format.read_array(member)
  except errors.DataError:
    raise
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    raise errors.DataError(f"{path}: not a readable .npz file ({e})") from e
  return stream, shape, check_labels(str(path), labels, shape[0], num_classes), pixels


class _Remote:
  """The remote files of one source: their `remote.RangeReader` (one a protocol) and, with
  a `cache_dir`, their local copies (`cache.Copier`, started by `start`)."""

  def __init__(self, concurrency: int, cache_dir: str | None):
    self.concurrency, self.cache_dir = concurrency, cache_dir
    self.readers: dict[str, remote.RangeReader] = {}
    self.copies: list[cache.LocalCopy] = []
    self.copier: cache.Copier | None = None

  def open(self, path: epath.Path) -> tuple[remote.RangeReader, cache.LocalCopy | None]:
    """The reader of `path`'s protocol and, with a cache_dir, its local copy."""
    url = str(path)
    protocol = _protocol(url)
    if protocol not in self.readers:
      self.readers[protocol] = remote.RangeReader(protocol, self.concurrency)
    reader = self.readers[protocol]
    if self.cache_dir is None:
      return reader, None
    try:
      self.copies.append(cache.LocalCopy(url, reader, self.cache_dir))
    except OSError as e:
      raise errors.DataError(f"{url}: cannot be copied to {self.cache_dir} ({e})") from e
    return reader, self.copies[-1]

  def start(self) -> None:
    """Starts copying (with a cache_dir); DataError if its disk has not the room."""
    if self.copies:
      self.copier = cache.Copier(self.copies, self.cache_dir)
      self.copier.start()

  def close(self) -> None:
    """Stops the copying, closes the copies and the readers' connections."""
    if self.copier is not None:
      self.copier.close()
    for copy in self.copies:
      copy.close()
    for reader in self.readers.values():
      reader.close()


def _protocol(url: str) -> str:
  return url.split("://", 1)[0]


class _PositionedFile:
  """Reads at an offset without a shared file position: `os.preadv` on a local file (one
  descriptor, any number of threads); a remote file's through its source's reader, all of a
  batch's at once (`_read_all`), or from its local copy once that holds them."""

  def __init__(self, path: epath.Path, remotes: _Remote):
    self.path = path
    self._fd, self.reader, self.copy = None, None, None
    if paths.is_remote(path):
      self.reader, self.copy = remotes.open(path)
    else:
      self._fd = os.open(os.fspath(path), os.O_RDONLY)

  def read_local(self, buffer: memoryview, offset: int) -> bool:
    """Fills `buffer` with the bytes at `offset` if they are local (a local file, or the part
    of a remote one copied); DataError naming the file if it ends first."""
    if self._fd is None:
      return self.copy is not None and self.copy.read_into(buffer, offset)
    done = 0
    try:
      while done < len(buffer):
        count = os.preadv(self._fd, [buffer[done:]], offset + done)
        if not count:
          raise errors.DataError(
              f"{self.path}: short read, {done} of {len(buffer)} bytes at offset {offset} (the "
              f"shard is truncated or damaged: prepare it again)")
        done += count
    except OSError as e:
      raise errors.DataError(f"{self.path}: read failed at offset {offset} ({e})") from e
    return True

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


_Read = tuple[_PositionedFile, int, memoryview]  # Fill the buffer with the file's bytes there.


def _read_all(reads: Sequence[_Read]) -> None:
  """Performs `reads`: the local ones one by one, the rest all at once, per reader."""
  pending: dict[remote.RangeReader, list[tuple[str, int, memoryview]]] = {}
  for file, offset, buffer in reads:
    if not file.read_local(buffer, offset):
      pending.setdefault(file.reader, []).append((str(file.path), offset, buffer))
  for reader, group in pending.items():
    reader.read(group)


def _plan_indexed(files: Sequence[_PositionedFile], offsets: Sequence[int], starts: np.ndarray,
                  image_shape: tuple[int, ...],
                  indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[_Read]]:
  """(distinct images, inverse, reads): once `reads` are done, distinct[inverse] are the
  images at `indices`, in order, from contiguous uint8 images: file k's at offsets[k],
  holding indices starts[k] .. starts[k + 1] - 1. A run of consecutive sorted indices in one
  file is one read."""
  unique, inverse = np.unique(indices, return_inverse=True)
  images = np.empty((len(unique), *image_shape), np.uint8)
  which = np.searchsorted(starts, unique, side="right") - 1
  breaks = np.flatnonzero((np.diff(unique) != 1) | (np.diff(which) != 0)) + 1
  begins = np.concatenate([[0], breaks]).tolist()
  ends = np.concatenate([breaks, [len(unique)]]).tolist()
  buffer = memoryview(images.reshape(-1))
  size = math.prod(image_shape)
  reads = []
  for begin, end in zip(begins, ends):
    k = int(which[begin])
    offset = offsets[k] + (int(unique[begin]) - int(starts[k])) * size
    reads.append((files[k], offset, buffer[begin * size:end * size]))
  return images, inverse, reads


class _Npz:
  """An .npz's images: read by index from the file when `image` is stored uncompressed
  (`np.savez`, as the released sets are), else read whole into memory on first use (under
  a lock), up to `max_npz_bytes`."""

  def __init__(self, path: epath.Path, image_shape: tuple[int, int, int], num_classes: int,
               max_npz_bytes: int, remotes: _Remote):
    self.path = path
    with contextlib.ExitStack() as stack:
      _, shape, self.labels, pixels = open_npz(path, stack, image_shape, num_classes,
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
      self._file = _PositionedFile(path, remotes)
    self._images: np.ndarray | None = None
    self._lock = threading.Lock()

  def plan(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[_Read]]:
    """The images at `indices` as `_plan_indexed` gives them."""
    if self._file is not None:
      return _plan_indexed([self._file], [self._pixels], np.array([0, self.num_examples]),
                           self._image_shape, indices)
    images = self._images
    if images is None:
      with self._lock:
        if self._images is None:
          with self.path.open("rb") as file, np.load(file) as archive:
            self._images = archive["image"]
        images = self._images
    return images[indices], np.arange(len(indices)), []

  def close(self) -> None:
    self._images = None
    if self._file is not None:
      self._file.close()


class _Prepared:
  """A directory made by `writer.prepare`: each image read by index from its shard."""

  def __init__(self, path: epath.Path, image_shape: tuple[int, int, int], num_classes: int,
               remotes: _Remote):
    self.path = path
    meta_path = path / META
    if not meta_path.exists():
      raise errors.DataError(f"{path}: a directory without {META}: not made by "
                             f"`{PREPARE_COMMAND}`, or its prepare did not finish (for a "
                             f"directory of .npz files, give DIR/*.npz)")
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
    self.labels = check_labels(str(labels_path), labels, self.num_examples, num_classes)
    self._files: list[_PositionedFile] = []
    self._offsets = [offset for _, _, offset, _ in shards]
    try:
      for name, count, offset, size in shards:
        self._files.append(self._open_shard(path / name, count, offset, size, remotes))
    except BaseException:
      self.close()
      raise
    self._starts = np.cumsum([0] + [s[1] for s in shards])

  def _open_shard(self, shard: epath.Path, count: int, offset: int, size: int,
                  remotes: _Remote) -> _PositionedFile:
    try:
      actual = shard.stat().length
      if actual != size or size != offset + count * self._image_bytes:
        raise errors.DataError(f"{shard}: {actual} bytes, {META} says {size} for {count} "
                               f"images (truncated or damaged: prepare it again)")
      return _PositionedFile(shard, remotes)
    except FileNotFoundError as e:
      raise errors.DataError(f"{shard}: missing (listed in {self.path / META})") from e
    except OSError as e:
      raise errors.DataError(f"{shard}: cannot be read ({e})") from e

  def plan(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[_Read]]:
    """The images at `indices` as `_plan_indexed` gives them."""
    return _plan_indexed(self._files, self._offsets, self._starts, self._image_shape, indices)

  def close(self) -> None:
    for file in getattr(self, "_files", []):
      file.close()


class ExtraSource:
  """Extra images of several files as one index space: file k holds indices starts[k] ..
  starts[k + 1] - 1, in the order of the patterns (a glob's matches sorted)."""

  def __init__(self, files: Sequence[_Npz | _Prepared], image_shape: tuple[int, int, int],
               remotes: _Remote):
    self._files, self._remotes = list(files), remotes
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
    plans, reads = [], []
    for k in np.unique(which).tolist():
      selected = which == k
      distinct, inverse, file_reads = self._files[k].plan(indices[selected] - self._starts[k])
      plans.append((selected, distinct, inverse))
      reads += file_reads
    _read_all(reads)
    for selected, distinct, inverse in plans:
      images[selected] = distinct[inverse]
    return images, self._labels[indices]

  def copied_fraction(self) -> float:
    """The share of the remote files' bytes copied locally (cache_dir; 1 without)."""
    copier = self._remotes.copier
    return 1.0 if copier is None else copier.fraction()

  def close(self) -> None:
    """Stops the local copy, closes the files and connections, drops the images read from
    .npz files."""
    for file in self._files:
      file.close()
    self._remotes.close()

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
               max_npz_bytes: int, remotes: _Remote) -> _Npz | _Prepared:
  try:
    is_dir = path.is_dir()
  except OSError as e:
    raise errors.DataError(f"{path}: cannot be read ({e})") from e
  if is_dir:
    return _Prepared(path, image_shape, num_classes, remotes)
  if path.name.endswith(".npz"):
    return _Npz(path, image_shape, num_classes, max_npz_bytes, remotes)
  raise errors.DataError(f"{path}: neither an .npz file nor a directory made by "
                         f"`{PREPARE_COMMAND}`")


def open_sources(patterns: Sequence[str], *, image_shape: tuple[int, int, int],
                 num_classes: int, max_npz_bytes: int = MAX_NPZ_BYTES,
                 read_concurrency: int = READ_CONCURRENCY,
                 cache_dir: str | None = None) -> ExtraSource:
  """Checks the extra data files (files or globs, local or remote; .npz or prepared
  directories) against the real data's image shape and classes, and joins them. Remote files
  are read with `read_concurrency` requests in flight and, with a local `cache_dir`, copied
  there in the background (`cache.py`).

  Every fault is one `errors.DataError` naming the file: missing, unreadable, without
  `image` or `label`, images not uint8 of shape (N, *image_shape), labels not integers in
  [0, num_classes), unequal counts, an .npz's images over `max_npz_bytes`, a prepared shard
  of another size than its meta.json says, a `cache_dir` without room for the copy.
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  if not patterns:
    raise ValueError("open_sources needs at least one extra data file or pattern")
  if read_concurrency < 1:
    raise ValueError(f"read_concurrency must be >= 1; got {read_concurrency}")
  if cache_dir is not None:
    if paths.is_remote(cache_dir):
      raise errors.DataError(f"cache_dir={cache_dir} must be a local directory")
    cache_dir = paths.resolve(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = os.fspath(cache_dir)
  files: list[_Npz | _Prepared] = []
  remotes = _Remote(read_concurrency, cache_dir)
  try:
    for pattern in patterns:
      for path in _expand(str(pattern)):
        files.append(_open_file(path, tuple(image_shape), num_classes, max_npz_bytes, remotes))
    remotes.start()
  except BaseException:
    for file in files:
      file.close()
    remotes.close()
    raise
  return ExtraSource(files, image_shape, remotes)


def open_from_config(config) -> ExtraSource | None:
  """The extra (generated) images of `data.extra`, checked against the real data's image
  shape and classes without loading it (one `errors.DataError` line naming a faulty file);
  None without extra data."""
  d = config.data
  if not d.extra:
    return None
  return open_sources(tuple(d.extra), image_shape=datasets.image_shape(d.name, d.image_size),
                      num_classes=datasets.NUM_CLASSES[d.name],
                      read_concurrency=d.read_concurrency, cache_dir=d.extra_cache_dir)
