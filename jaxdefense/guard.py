"""A workdir's guards: who is training there, and with what.

- `lock.json`: a training run holds the workdir for as long as it runs (host, process id,
  start time), so that a second training on the same workdir refuses to start instead of
  interleaving checkpoints and logs. A lock whose process is gone (same host) is taken
  over with a message; one from another host is reported with how to remove it. Evaluation
  and analysis take no lock: they only read finished checkpoints.
- `config.json`: the config the workdir was first trained with. Resuming, evaluating or
  analysing with a config that builds other parameters (architecture, widths, defense and
  its sites, classes, EMA) is one error naming each differing field and both values.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any

import ml_collections
from etils import epath

from jaxdefense import errors, paths

LOCK = "lock.json"
CONFIG = "config.json"


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


def _plain(value: Any) -> Any:
  """JSON's view of a config value: ConfigDicts as dicts, tuples as lists."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def parameter_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields that decide the checkpoint's parameter and state trees."""
  fields = {"model.arch": config.model.arch, "model.kwargs": config.model.kwargs,
            "defense.name": config.defense.name, "defense.sites": config.defense.sites,
            "data.name": config.data.name, "data.image_size": config.data.image_size,
            "train.ema_decay > 0": config.train.ema_decay > 0}
  if config.defense.name == "fsr":
    fields["defense.hidden"] = config.defense.hidden
  if config.defense.name == "cifs":
    fields["defense.probe_hidden"] = config.defense.probe_hidden
    fields["defense.linear_sites"] = config.defense.linear_sites
  return {k: _plain(v) for k, v in fields.items()}


def record_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Writes `config.json` on a workdir's first training (later runs `check_config`)."""
  path = workdir / CONFIG
  if path.exists():
    return
  paths.write_text(path, json.dumps({"parameter_fields": parameter_fields(config),
                                     "config": json.loads(config.to_json_best_effort())},
                                    indent=2))


def _read_json(path: epath.Path, what: str) -> dict:
  """A workdir's JSON file, or WorkdirError naming it and what to do if it is damaged."""
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.WorkdirError(f"{path} is damaged ({e}); {what}") from e
  if not isinstance(value, dict):
    raise errors.WorkdirError(f"{path} is damaged (not a JSON object); {what}")
  return value


def check_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """ConfigMismatch naming every field that differs from the workdir's `config.json` in
  the parameters it builds (nothing to check in a workdir without one)."""
  path = workdir / CONFIG
  if not path.exists():
    return
  recorded = _read_json(path, "restore it from a copy, or delete it if you are sure the "
                              "config builds the model trained there (it is rewritten on "
                              "the next training)").get("parameter_fields")
  if not isinstance(recorded, dict):
    raise errors.WorkdirError(f"{path} is damaged (no parameter_fields); restore it from a "
                              "copy, or delete it to have the next training rewrite it")
  current = parameter_fields(config)
  differing = [f"{k}: {recorded.get(k)!r} in the workdir, {current.get(k)!r} now"
               for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
  if differing:
    raise errors.ConfigMismatch(
        f"the config does not match the model trained in {workdir}: "
        + "; ".join(differing)
        + f". Use the config it was trained with (saved in {path}), or another --workdir.")


def check_trained(workdir: epath.Path, config: ml_collections.ConfigDict,
                  flag: str = "--workdir") -> None:
  """Before any data is loaded: `workdir` (given as `flag`) has checkpoints, of a model
  that `config` builds."""
  directory = workdir / "checkpoints"
  if not directory.exists():
    given = "" if flag == "--workdir" else f" ({flag}={workdir})"
    raise errors.NoCheckpoint(f"no checkpoint in {directory}{given}: train first with "
                              f"--mode=train --workdir={workdir}")
  check_config(workdir, config)


def _tuples(value: Any) -> Any:
  """JSON's lists back to the tuples configs hold."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def recorded_config(workdir: epath.Path, flag: str) -> ml_collections.ConfigDict:
  """The config a workdir (given as `flag`) was trained with, from its `config.json`; a
  workdir without checkpoints or without that file is an error naming `flag`."""
  if not (workdir / "checkpoints").exists():
    raise errors.NoCheckpoint(f"{flag}={workdir}: no checkpoint in {workdir / 'checkpoints'}; "
                              "give a trained workdir")
  path = workdir / CONFIG
  if not path.exists():
    raise errors.WorkdirError(f"{flag}={workdir}: no {CONFIG} there, so the model it holds "
                              "is unknown; give a workdir jaxdefense trained")
  recorded = _read_json(path, "restore it from a copy").get("config")
  if not isinstance(recorded, dict):
    raise errors.WorkdirError(f"{path} is damaged (no config); restore it from a copy")
  return ml_collections.ConfigDict(_tuples(recorded))
