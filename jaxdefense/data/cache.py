"""A local copy of remote extra data (`data.extra_cache_dir`), made in the background while
training reads from the bucket.

Reading by index from a bucket costs a request per image, each tens of milliseconds away
and a share of a core; a local disk serves the same reads at a fraction of the cost.
`Copier` copies each remote file in order, on one thread, into a file of the directory
named after its URL, CHUNK_BYTES at a time (PARTS range requests in flight);
`LocalCopy.read_into` serves a read from the copy once the copied prefix holds it, so reads
move from the bucket to the disk as the copy grows, and the batches stay the same. A
finished copy is recorded beside it (URL, size, version), so a later run (a resume) reads
from it at once; another version of the object is copied again. Processes of one host
share the directory: one copies a file (under a lock), the others read from the bucket
until it is done, then from the copy.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from typing import Sequence

from jaxdefense import errors
from jaxdefense.data import remote
from jaxdefense.workdir import paths

CHUNK_BYTES = 32 * 2**20  # The copy's one buffer, filled by PARTS range requests at once.
PARTS = 4
_LOCK_POLL_S = 0.5


class LocalCopy:
  """The local copy in `directory` of the object `url`, read through `reader`."""

  def __init__(self, url: str, reader: remote.RangeReader, directory: str):
    self.url, self.reader = url, reader
    self.size, version = reader.size(url)
    name = os.path.basename(url.rstrip("/")) or "object"
    self.path = os.path.join(directory, f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
    self._record = {"url": url, "size": self.size, "version": version}
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    self.copied = self.size if self._recorded() else 0  # Bytes from the start held locally.

  def _recorded(self) -> bool:
    try:
      with open(self.path + ".json") as file:
        return json.load(file) == self._record
    except (OSError, ValueError):
      return False

  def read_into(self, buffer: memoryview, offset: int) -> bool:
    """Fills `buffer` from the copy if it holds bytes offset .. offset + len - 1."""
    if offset + len(buffer) > self.copied:
      return False
    done = 0
    while done < len(buffer):
      count = os.preadv(self._fd, [buffer[done:]], offset + done)
      if not count:
        raise errors.DataError(f"{self.path} (the local copy of {self.url}): short read at "
                               f"{offset + done}; delete it to copy it again")
      done += count
    return True

  def fill(self, stop: threading.Event) -> None:
    """Copies the object unless recorded, under the lock `path`.lock; returns early if
    `stop` is set."""
    with open(self.path + ".lock", "w") as lock:
      while True:
        try:
          fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          if stop.wait(_LOCK_POLL_S):
            return
      if self._recorded():
        self.copied = self.size
        return
      os.ftruncate(self._fd, self.size)
      buffer, part = memoryview(bytearray(CHUNK_BYTES)), CHUNK_BYTES // PARTS
      for start in range(0, self.size, CHUNK_BYTES):
        if stop.is_set():
          return
        end = min(start + CHUNK_BYTES, self.size)
        data = buffer[:end - start]
        self.reader.read([(self.url, start + offset, data[offset:offset + part])
                          for offset in range(0, end - start, part)])
        while data:
          written = os.pwrite(self._fd, data, start)
          data, start = data[written:], start + written
        self.copied = end
      os.fsync(self._fd)
      paths.write_text(self.path + ".json", json.dumps(self._record))

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class Copier:
  """Copies `copies` one after another on a thread of its own, started by `start`; a failure
  ends the copying with a warning (the reads go on from the bucket)."""

  def __init__(self, copies: Sequence[LocalCopy], directory: str):
    missing = sum(c.size for c in copies if c.copied < c.size)
    free = shutil.disk_usage(directory).free
    if missing > free:
      raise errors.DataError(f"data.extra_cache_dir={directory}: {free / 1e9:.1f} GB free, the "
                             f"local copy of the extra data needs {missing / 1e9:.1f} GB more")
    self.copies = list(copies)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="extra-copy", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def _run(self) -> None:
    for copy in self.copies:
      try:
        copy.fill(self._stop)
      except (OSError, errors.DataError) as e:
        logging.warning("the local copy of %s stopped (%s): reading it from the bucket",
                        copy.url, e)
        return
      if self._stop.is_set():
        return

  def fraction(self) -> float:
    """The share of the bytes held locally."""
    total = sum(c.size for c in self.copies)
    return sum(c.copied for c in self.copies) / total if total else 1.0

  def close(self) -> None:
    """Stops the copying, after the chunk in flight."""
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()
