"""The prepared format's writer: an extra source as a directory of standard .npy shards,
read by index (jaxdefense/data/sources.py).

`prepare(source, output)` (`python -m jaxdefense.data.prepare --source=X.npz --output=DIR`)
streams an .npz's images, one chunk in memory at a time, into shards
`images-KKKKK-of-NNNNN.npy`, `labels.npy` and `meta.json`.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import zipfile
import zlib
from typing import IO, Iterable, Iterator

import numpy as np
from etils import epath

from jaxdefense import errors
from jaxdefense.data import sources
from jaxdefense.workdir import paths

SHARD_IMAGES = 2**20
FORMAT = "jaxdefense.extra/1"  # meta.json's "format": the format's name since its version 1.
_CHUNK_BYTES = 64 * 2**20  # `prepare` holds one chunk of images at a time.


def _npy_header(shape: tuple[int, ...]) -> bytes:
  """The .npy (version 1.0) header of a C-order uint8 array of `shape`."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
               "fortran_order": False, "shape": shape})
  return buffer.getvalue()


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
  labels = sources.check_labels(source, np.asarray(labels), len(labels), None)
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
  paths.write_bytes(output / sources.LABELS, buffer.getvalue())
  meta = {"format": FORMAT, "num_examples": num, "image_shape": list(image_shape),
          "source": source, "shards": shards}
  paths.write_text(output / sources.META, json.dumps(meta, indent=1) + "\n")


def prepare(source: str, output: str, *, shard_images: int = SHARD_IMAGES) -> None:
  """Streams the .npz `source`'s images into the prepared directory `output`, one chunk of
  about 64 MiB in memory at a time (see `write_prepared`); the source's CRC-32 is checked."""
  path = epath.Path(source if paths.is_remote(source) else os.path.expanduser(source))
  if not path.exists():
    raise errors.DataError(f"extra data file {source} does not exist")
  with contextlib.ExitStack() as stack:
    stream, shape, labels, _ = sources.open_npz(path, stack, None, None)
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
