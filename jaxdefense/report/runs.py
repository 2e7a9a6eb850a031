"""The runs a report reads: one per workdir, from what training and evaluation wrote there
(`config.json`, `results.json`, `eval.json`, `audit.json`, `metrics.jsonl`). A workdir that
cannot be reported is a `LeftOut`, one line naming it and the reason; a run with a part
that cannot be read (its audit, its curves) is kept, with a note.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath

from jaxdefense.evaluation import evaluate
from jaxdefense.workdir import paths, run_config

EVAL_FIELDS = ("results", "eps", "norm", "protocol", "checkpoint", "data")  # eval.json's own.
PATTERN = set("*?[")  # An argument holding one names the directories it matches.


@dataclasses.dataclass(frozen=True)
class LeftOut:
  """A workdir, or a run, the report leaves out, and why (one line)."""
  workdir: str
  reason: str

  def line(self) -> str:
    return f"{self.workdir}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  config: dict[str, Any]                # config.json's config, flattened to dotted fields.
  evaluation: dict[str, Any]            # eval.json.
  robust: dict[str, np.ndarray] | None  # Per attack, per point robust; None: an old eval.json.
  training: dict[str, Any] | None       # results.json (None: training never finished).
  audit: dict[str, Any] | None          # audit.json, where the run was audited.
  curves: list[dict[str, Any]]          # metrics.jsonl's in-training evaluation rows.
  notes: tuple[str, ...] = ()           # What was read only in part, one line each.

  @property
  def seed(self) -> int:
    return int(self.config.get("seed", 0))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested dict as {"a.b.c": leaf}; lists become tuples (values compare and hash)."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = _frozen(value)
  return out


def _frozen(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
  return value


def _json(path: epath.Path, what: str) -> tuple[dict[str, Any] | None, str | None]:
  """(the file's JSON object, None), (None, None) if there is no file, or (None, why)."""
  if not path.exists():
    return None, None
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return None, f"{path.name} is unreadable ({type(e).__name__}: {e}); {what}"
  if not isinstance(value, dict):
    return None, f"{path.name} is not a JSON object; {what}"
  return value, None


def _curves(path: epath.Path) -> tuple[list[dict[str, Any]], list[str]]:
  """metrics.jsonl's in-training evaluation rows; a line that does not parse (a write cut
  short) is skipped, with a note."""
  if not path.exists():
    return [], []
  rows, skipped = [], 0
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      skipped += 1
      continue
    if isinstance(row, dict) and "eval/natural_accuracy" in row:
      rows.append(row)
  notes = [f"metrics.jsonl: {skipped} line(s) that do not parse skipped"] if skipped else []
  return rows, notes


def read(workdir: str) -> Run | LeftOut:
  """The run in `workdir` (a path or gs:// URL), or why it is left out."""
  root = paths.resolve(workdir)
  if not root.exists():
    return LeftOut(workdir, "no such directory")
  recorded, why = _json(root / run_config.CONFIG, "left out")
  if recorded is None or not isinstance(recorded.get("config"), dict):
    return LeftOut(workdir, why or f"no readable {run_config.CONFIG}: not a workdir that "
                   "main.py trained (or that the converter imported)")
  evaluation, why = _json(root / "eval.json", "left out")
  if evaluation is None:
    return LeftOut(workdir, why or "no evaluation (eval.json): run `python main.py "
                   "--mode=eval --config=... --workdir=...` on it first")
  missing = [k for k in EVAL_FIELDS if k not in evaluation]
  results = evaluation.get("results")
  if not missing and not (isinstance(results, dict) and "num_points" in results.get("natural", {})
                          and all(isinstance(r, dict) and "title" in r
                                  for r in results.values())):
    missing = ["results per column (natural's num_points, each column's title)"]
  if missing:
    return LeftOut(workdir, f"eval.json lacks {', '.join(missing)}: not written by "
                   "`main.py --mode=eval`")
  try:
    robust = evaluate.robust_points(evaluation)
  except (KeyError, TypeError, ValueError) as e:
    return LeftOut(workdir, f"eval.json's per-point outcomes are unreadable ({e!r})")
  notes = []
  training, why = _json(root / "results.json", "its training columns are left empty")
  audit, why_audit = _json(root / "audit.json", "its audit is left out")
  notes += [w for w in (why, why_audit) if w]
  curves, curve_notes = _curves(root / "metrics.jsonl")
  return Run(workdir=workdir, config=flatten(recorded["config"]), evaluation=evaluation,
             robust=robust, training=training, audit=audit, curves=curves,
             notes=tuple(notes + curve_notes))


def expand(argument: str) -> list[str] | LeftOut:
  """The workdirs an argument names: itself, or the directories its pattern matches (for
  buckets, which no shell expands)."""
  if not PATTERN & set(argument):
    return [argument]
  cut = argument[:min(argument.index(c) for c in PATTERN if c in argument)].rfind("/")
  base, pattern = (argument[:cut], argument[cut + 1:]) if cut >= 0 else (".", argument)
  root = paths.resolve(base)
  found = sorted(str(p) for p in root.glob(pattern) if p.is_dir()) if root.exists() else []
  return found or LeftOut(argument, "the pattern matches no directory")


def read_all(arguments: list[str]) -> tuple[list[Run], list[LeftOut]]:
  """The runs the arguments name (each once, patterns expanded), and what is left out."""
  found: list[Run] = []
  left_out: list[LeftOut] = []
  for argument in dict.fromkeys(arguments):
    expanded = expand(argument)
    if isinstance(expanded, LeftOut):
      left_out.append(expanded)
      continue
    for workdir in expanded:
      run = read(workdir)
      (left_out if isinstance(run, LeftOut) else found).append(run)
  return found, left_out
