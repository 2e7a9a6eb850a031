"""`config.json`: the config the workdir was first trained with. Resuming, evaluating or
analysing with a config that builds other parameters (architecture, widths, defense and its
sites, classes, EMA) is one error naming each differing field and both values.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections
from etils import epath

from jaxdefense import errors
from jaxdefense.workdir import paths

CONFIG = "config.json"


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
