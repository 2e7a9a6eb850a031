"""`lock.json`: the lease a training run holds on its workdir while it runs, so that a second
training on the same workdir refuses to start instead of interleaving checkpoints and logs,
while a run that died (SIGKILL, a spot preemption, a VM, pod or SLURM node requeued under
another hostname) is resumed by running the same command again, with no file deleted by hand.

The holder writes its host, process id, start time, timeout (`train.lease_timeout_s`) and
renewal time, and renews the lease at every checkpoint save and every timeout / 4 seconds on a
daemon thread. Another run takes the lease over at once when it has expired (not renewed for
its holder's timeout) or its process is gone on this host, and refuses at once while that
process lives on this host. A lease from another host that has not expired is watched: a
renewal (a live run) refuses, expiry takes it over; so a run requeued elsewhere waits at most
the timeout. A holder whose lease was taken over (it stalled past its timeout) stops at its
next checkpoint save instead of writing beside the new holder.

Every change is a compare-and-swap, so of several runs racing for one lease exactly one wins:
on a bucket (gs://) an upload with a generation precondition (ifGenerationMatch: 0 to create,
the generation read to renew, take over or delete); on a disk, local or shared, a read, a
compare and an atomic rename under an exclusive flock of `.lock.json.guard` beside it. Ages
compare the holder's clock with the reader's: hosts' clocks must agree to well within the
timeout (NTP does). Evaluation and analysis take no lease: they read finished checkpoints.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from etils import epath

from jaxdefense import errors
from jaxdefense.workdir import paths

LEASE = "lock.json"
_UNSEEN = object()  # No lease version watched yet.


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process.
    return True
  return True


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


class _Changed(Exception):
  """The lease is no longer at the version a swap expected."""


class _Disk:
  """The lease file on a disk; its version is its content."""

  def __init__(self, path: epath.Path):
    self.path = path
    self.guard = path.parent / f".{path.name}.guard"

  def read(self) -> tuple[bytes, bytes] | None:
    try:
      data = self.path.read_bytes()
    except FileNotFoundError:
      return None
    return data, data

  @contextlib.contextmanager
  def _guarded(self) -> Iterator[None]:
    """An exclusive flock of the guard file (the kernel drops it if the process dies)."""
    fd = os.open(os.fspath(self.guard), os.O_CREAT | os.O_RDWR, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except OSError as e:
        raise errors.WorkdirError(
            f"cannot lock {self.guard} ({e.strerror}): the workdir's disk must support file "
            "locks (flock; Lustre: mount with -o flock), or use a gs:// workdir") from e
      yield
    finally:
      os.close(fd)

  def swap(self, version: bytes | None, data: bytes | None) -> bytes | None:
    """Writes `data` (None: deletes) if the file is at `version` (None: absent), else
    raises _Changed; the new version."""
    with self._guarded():
      current = self.read()
      if (None if current is None else current[1]) != version:
        raise _Changed
      if data is None:
        self.path.unlink()
      else:
        paths.write_bytes(self.path, data)
      return data


class _Bucket:
  """The lease object in a gs:// bucket; its version is its generation."""

  def __init__(self, path: epath.Path):
    try:
      from google.cloud import storage
    except ImportError as e:
      raise errors.RunError(f"training on {path.parent} needs google-cloud-storage for its "
                            "lease: pip install -e \".[gcs]\"") from e
    bucket, _, self._name = os.fspath(path).removeprefix("gs://").partition("/")
    self._bucket = storage.Client().bucket(bucket)

  def read(self) -> tuple[bytes, int] | None:
    from google.api_core import exceptions
    blob = self._bucket.blob(self._name)
    try:
      data = blob.download_as_bytes()
    except exceptions.NotFound:
      return None
    return data, blob.generation  # The generation of the content read.

  def swap(self, version: int | None, data: bytes | None) -> int | None:
    """Uploads `data` (None: deletes) if the object is at generation `version` (None:
    absent), else raises _Changed; the new generation."""
    from google.api_core import exceptions
    blob = self._bucket.blob(self._name)
    try:
      if data is None:
        blob.delete(if_generation_match=version)
        return None
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=0 if version is None else version)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      raise _Changed from None
    return blob.generation


def _store(path: epath.Path) -> _Disk | _Bucket:
  if not paths.is_remote(path):
    return _Disk(path)
  if os.fspath(path).startswith("gs://"):
    return _Bucket(path)
  raise errors.RunError(f"cannot train in {path.parent}: a workdir's lease needs atomic "
                        "conditional writes, which jaxdefense does on disks and gs:// only")


class Lease:
  """`workdir/lock.json`, held from `acquire()` to `release()` (or the `with` block) and
  renewed meanwhile; `timeout_s` is `train.lease_timeout_s`, `holder` what it writes."""

  def __init__(self, workdir: epath.PathLike, timeout_s: float):
    self.path = epath.Path(workdir) / LEASE
    self.timeout_s = float(timeout_s)
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": None,
                   "timeout_s": self.timeout_s, "token": uuid.uuid4().hex}
    self._store: _Disk | _Bucket | None = None
    self._version: Any = None
    self._held = False
    self._lost: str | None = None
    self._mutex = threading.Lock()  # Renewals on the thread and at saves, and release.
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _data(self) -> bytes:
    return json.dumps(dict(self.holder, renewed=_now().isoformat())).encode()

  def _parse(self, data: bytes) -> tuple[dict, float]:
    """The holder written in `data` and its age in seconds; WorkdirBusy if damaged."""
    try:
      other = json.loads(data.decode("utf-8"))
      if isinstance(other, dict) and "renewed" not in other and {"host", "pid"} <= set(other):
        return dict(other, timeout_s=math.inf), 0.0  # A lock of an earlier version: no lease.
      age = (_now() - datetime.datetime.fromisoformat(other["renewed"])).total_seconds()
      float(other["timeout_s"])
    except (ValueError, TypeError, KeyError) as e:  # JSON and Unicode errors included.
      raise errors.WorkdirBusy(
          f"{self.path} is damaged ({type(e).__name__}: {e}), so its holder is unknown; if no "
          f"training runs on {self.path.parent}, delete {self.path} and run again") from None
    return other, age

  def _busy(self, other: dict, why: str) -> errors.WorkdirBusy:
    return errors.WorkdirBusy(
        f"workdir {self.path.parent} is in use by a training run on host {other.get('host')}, "
        f"process {other.get('pid')}, started {other.get('started')} ({why}); wait for it to "
        "end or use another --workdir")

  def _takeover(self, other: dict, age: float) -> str | None:
    """The line saying whose lease is taken over, if it may be now; None while it has not
    expired and its holder may live on another host; WorkdirBusy if it lives on this one."""
    who = (f"the lease of process {other.get('pid')} on host {other.get('host')} (started "
           f"{other.get('started')})")
    same_host = other.get("host") == self.holder["host"]
    pid = other.get("pid")
    if same_host and isinstance(pid, int) and not _pid_alive(pid):
      return f"taking over {self.path}: {who}: that process is gone"
    timeout = float(other["timeout_s"])
    if math.isinf(timeout) and not same_host:
      raise errors.WorkdirBusy(
          f"workdir {self.path.parent} is held by {self.path} of an earlier jaxdefense (a lock "
          f"without a lease) for process {pid} on host {other.get('host')}; if that run is "
          f"gone, delete {self.path} and run again")
    if age > timeout:
      return (f"taking over {self.path}: {who} was last renewed {age:.1f} s ago (timeout "
              f"{timeout:g} s)")
    if same_host:
      raise self._busy(other, f"that process is running; {LEASE} renewed {age:.1f} s ago")
    return None

  def _swap(self, version: Any, data: bytes) -> bool:
    """Writes `data` if the lease is at `version`; whether it did. A write whose reply was
    lost, retried against its own result, reads back as this run's."""
    try:
      self._version = self._store.swap(version, data)
      return True
    except _Changed:
      current = self._store.read()
      if current is None or current[0] != data:
        return False
      self._version = current[1]
      return True

  def acquire(self) -> Lease:
    """Takes the lease, or raises WorkdirBusy naming its live holder (module docstring)."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._store = self._store or _store(self.path)
    self.holder["started"] = _now().isoformat(timespec="seconds")
    watched: Any = _UNSEEN
    while True:
      seen = self._store.read()
      version, line = None, None
      if seen is not None:
        other, age = self._parse(seen[0])
        version, line = seen[1], self._takeover(other, age)
        if line is None:
          if watched is not _UNSEEN and watched != version:
            raise self._busy(other, f"{LEASE} renewed {age:.1f} s ago, while this run waited")
          left = float(other["timeout_s"]) - age
          if watched is _UNSEEN:
            print(f"{self.path} is held by process {other.get('pid')} on host "
                  f"{other.get('host')}, renewed {age:.1f} s ago: waiting up to {left:.1f} s "
                  "for it to renew (this run then stops) or expire (this run then takes it "
                  "over)", flush=True)
          watched = version
          time.sleep(max(0.01, min(left, float(other["timeout_s"]) / 20, 5.0)))
          continue
      if self._swap(version, self._data()):
        break
      watched = version  # Another run won the race: a new version, refused unless expired.
    if line is not None:
      print(line, flush=True)
    self._held, self._lost = True, None
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew_periodically, daemon=True,
                                    name=f"lease {self.path}")
    self._thread.start()
    return self

  def renew(self) -> None:
    """Writes a new renewal time (the loop calls it before every checkpoint save); raises
    WorkdirBusy if another run took the lease over meanwhile. Does nothing unless held."""
    with self._mutex:
      if self._held and self._lost is None and not self._swap(self._version, self._data()):
        current = self._store.read()
        self._lost = (f"this run stops: its lease {self.path} was deleted (by a run that took "
                      "it over, or by hand); rerun the same command to resume")
        if current is not None:
          other, _ = self._parse(current[0])
          self._lost = (
              f"this run stops: a training run on host {other.get('host')}, process "
              f"{other.get('pid')} (started {other.get('started')}) took over {self.path}, "
              f"which this run had not renewed within {self.timeout_s:g} s (stalled or cut "
              "off); that run goes on in the workdir")
    if self._lost is not None:
      raise errors.WorkdirBusy(self._lost)

  def _renew_periodically(self) -> None:
    interval = self.timeout_s / 4
    while not self._stop.wait(interval):
      try:
        self.renew()
      except errors.WorkdirBusy:
        return  # Lost: the loop raises it at its next save.
      except Exception as e:  # noqa: BLE001  (a disk or network hiccup: the next try may pass)
        print(f"could not renew {self.path} ({type(e).__name__}: {e}); trying again in "
              f"{interval:g} s", flush=True)

  def release(self) -> None:
    """Stops renewing and deletes the lease if it is still this run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    with self._mutex:
      if self._held and self._lost is None:
        with contextlib.suppress(_Changed):  # Taken over meanwhile: no longer this run's.
          self._store.swap(self._version, None)
      self._held = False

  def __enter__(self) -> Lease:
    return self.acquire()

  def __exit__(self, *exc_info: Any) -> None:
    self.release()
