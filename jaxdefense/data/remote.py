"""Byte ranges of objects in a bucket, many at once: the reads of a remote extra source.

An image read by index is one small range request; an object store answers each after tens
of milliseconds whatever its size, so a batch's reads must be in flight together, not one
after another. `RangeReader.read` hands all of them to fsspec's asynchronous `cat_ranges`
on its event loop, at most `concurrency` in flight: for gs://, gcsfs (with its retries of
transient errors) on a connection pool of that size. The reads always go through gcsfs,
even where TensorFlow is installed and etils.epath serves gs:// through tf.io.gfile, which
has no batch of concurrent reads.
"""
from __future__ import annotations

from typing import Sequence

from jaxdefense import errors

REQUEST_TIMEOUT_S = 60.0  # One request's limit: a connection that stops answering fails.


def _filesystem(protocol: str, concurrency: int):
  """(a fresh fsspec filesystem for `protocol`, its connection pool or None): for gs://,
  gcsfs on a pool of `concurrency` connections (aiohttp's default is 100)."""
  try:
    import fsspec  # noqa: PLC0415 (the `gcs` extra)
    import fsspec.asyn  # noqa: PLC0415
    cls = fsspec.get_filesystem_class(protocol)
  except (ImportError, ValueError) as e:
    raise errors.DataError(f"reading {protocol}:// extra data needs fsspec's filesystem for it "
                           f"(gs://: pip install gcsfs, the `gcs` extra): {e}") from e
  if protocol not in ("gs", "gcs"):
    return cls(skip_instance_cache=True), None
  import aiohttp  # noqa: PLC0415 (gcsfs's)

  async def connector():
    return aiohttp.TCPConnector(limit=concurrency)

  pool = fsspec.asyn.sync(fsspec.asyn.get_loop(), connector)
  return cls(skip_instance_cache=True, requests_timeout=REQUEST_TIMEOUT_S,
             session_kwargs={"connector": pool}), pool


class RangeReader:
  """Reads byte ranges of a protocol's objects (URLs `protocol://...`), all of a call's at
  once, at most `concurrency` requests in flight over all calls."""

  def __init__(self, protocol: str, concurrency: int):
    if concurrency < 1:
      raise ValueError(f"concurrency must be >= 1; got {concurrency}")
    self.fs, self._pool = _filesystem(protocol, concurrency)
    self.concurrency = concurrency

  def read(self, reads: Sequence[tuple[str, int, memoryview]]) -> None:
    """Fills each (url, offset, buffer) with the url's bytes at offset; one DataError naming
    the object (and the offset) if a read fails after the filesystem's retries, or if the
    object ends first."""
    if not reads:
      return
    urls = [url for url, _, _ in reads]
    starts = [offset for _, offset, _ in reads]
    ends = [offset + len(buffer) for _, offset, buffer in reads]
    try:
      results = self.fs.cat_ranges(urls, starts, ends, on_error="return",
                                   batch_size=self.concurrency)
    except (OSError, RuntimeError) as e:  # fsspec's own timeout, a closed loop.
      raise errors.DataError(f"{urls[0]}: reading {len(reads)} ranges failed ({e!r})") from e
    for (url, offset, buffer), result in zip(reads, results, strict=True):
      if isinstance(result, FileNotFoundError):
        raise errors.DataError(f"{url}: missing (deleted or replaced while reading?)")
      if isinstance(result, BaseException):
        raise errors.DataError(f"{url}: read failed at offset {offset} ({result!r})")
      if len(result) != len(buffer):
        raise errors.DataError(f"{url}: short read, {len(result)} of {len(buffer)} bytes at "
                               f"offset {offset} (the object is truncated or was replaced)")
      buffer[:] = result

  def size(self, url: str) -> tuple[int, str]:
    """(the object's size, its version: generation, else ETag, else modification time)."""
    info = self.fs.info(url)
    version = info.get("generation") or info.get("etag") or info.get("mtime") or ""
    return int(info["size"]), str(version)

  def close(self) -> None:
    """Closes the connection pool (gs://)."""
    if self._pool is not None and not self._pool.closed:
      import fsspec.asyn  # noqa: PLC0415
      fsspec.asyn.sync(self.fs.loop, self._pool.close)
