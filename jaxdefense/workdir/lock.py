"""`lock.json`: a training run holds its workdir for as long as it runs (host, process id,
start time), so that a second training on the same workdir refuses to start instead of
interleaving checkpoints and logs. A lock whose process is gone (same host) is taken over
with a message; one from another host is reported with how to remove it. Evaluation and
analysis take no lock: they only read finished checkpoints.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any

from etils import epath

from jaxdefense import errors
from jaxdefense.workdir import paths

LOCK = "lock.json"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process.
    return True
  return True


class Lock:
  """`workdir/lock.json`, held from `acquire()` to `release()` (or the `with` block)."""

  def __init__(self, workdir: epath.PathLike):
    self.path = epath.Path(workdir) / LOCK
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds")}
    self._held = False

  def _create(self) -> bool:
    """Writes the lock if there is none; False if one exists. Exclusive on local disks;
    on object stores (gs://) a check, then a write."""
    text = json.dumps(self.holder)
    if paths.is_remote(self.path):
      if self.path.exists():
        return False
      paths.write_text(self.path, text)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def acquire(self) -> Lock:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
      if self._create():
        self._held = True
        return self
      try:
        other = json.loads(self.path.read_text())
      except FileNotFoundError:
        continue  # Released meanwhile: try again.
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise errors.WorkdirBusy(
            f"{self.path} is damaged, so its holder is unknown; if no training runs on "
            f"{self.path.parent}, delete {self.path} and run again") from None
      if not isinstance(other, dict):
        raise errors.WorkdirBusy(f"{self.path} is damaged (not a JSON object), so its "
                                 f"holder is unknown; if no training runs on "
                                 f"{self.path.parent}, delete {self.path} and run again")
      if other.get("host") == self.holder["host"] and other.get("pid") is not None \
          and not _pid_alive(int(other["pid"])):
        print(f"taking over {self.path}: its process {other['pid']} on {other['host']} "
              f"(started {other.get('started')}) is gone", flush=True)
        self.path.unlink(missing_ok=True)
        continue
      raise errors.WorkdirBusy(
          f"workdir {self.path.parent} is in use by a training run on host "
          f"{other.get('host', '?')}, process {other.get('pid', '?')}, started "
          f"{other.get('started', '?')}; wait for it to end or use another --workdir (if "
          f"that run is gone, delete {self.path})")
    raise errors.WorkdirBusy(f"could not take {self.path}: another run took it meanwhile")

  def release(self) -> None:
    if not self._held:
      return
    try:
      if json.loads(self.path.read_text()).get("pid") == self.holder["pid"]:
        self.path.unlink(missing_ok=True)
    except (FileNotFoundError, json.JSONDecodeError):
      pass
    self._held = False

  def __enter__(self) -> Lock:
    return self.acquire()

  def __exit__(self, *exc_info: Any) -> None:
    self.release()
