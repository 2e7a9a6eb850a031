"""The report's content, before any formatting (`build`): per section (an evaluation) and
group (an experiment, its seeds as replicates) every column's per-run accuracies, the
paired comparison of each column with the group's baseline, and the warnings of the
evaluation and the audit attached to the columns they qualify.

Columns: the training run's final in-training evaluation (results.json: natural and its
PGD), then eval.json's natural accuracy, each attack in run order and the worst case.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxdefense.report import grouping, significance
from jaxdefense.report.grouping import Group, Section
from jaxdefense.report.runs import LeftOut, Run

TRAINING_COLUMNS = ("training_natural", "training_robust")
NO_OUTCOMES = ("evaluated before eval.json held per-point outcomes: rerun `main.py "
               "--mode=eval` on it to compare it point by point")


@dataclasses.dataclass(frozen=True)
class Cell:
  """A column of a group: the accuracy of each run (None where it did not run)."""
  values: tuple[float | None, ...]

  @property
  def present(self) -> list[float]:
    return [v for v in self.values if v is not None]

  @property
  def mean(self) -> float | None:
    return float(np.mean(self.present)) if self.present else None

  @property
  def std(self) -> float | None:
    """The sample standard deviation (n - 1) over the runs; None for fewer than two."""
    return float(np.std(self.present, ddof=1)) if len(self.present) > 1 else None


@dataclasses.dataclass
class Row:
  group: Group
  cells: dict[str, Cell]
  comparisons: dict[str, significance.Comparison | str]  # Column -> result or why none.
  baseline: Group | None
  warnings: dict[str, list[str]]  # Column -> "seed S: ..." lines.
  audit: str                      # The audit's verdict over the group's runs.


@dataclasses.dataclass
class SectionReport:
  section: Section
  titles: dict[str, str]          # Column -> title, training columns first.
  rows: list[Row]
  pairing: dict[str, str]         # Group label -> how its runs pair with the baseline's.


@dataclasses.dataclass
class Report:
  sections: list[SectionReport]
  fields: list[str]               # The differing config fields that define the groups.
  left_out: list[LeftOut]
  baseline: dict[str, str]        # --baseline, parsed ({} if not given).
  baseline_problem: str | None    # Why no group could be compared, if so.
  confidence: float
  notes: list[str]                # Runs read in part, one line each.
  not_compared: list[str]         # Groups not compared with a baseline: "label (workdirs): why".


def _training_titles(runs: Sequence[Run]) -> dict[str, str]:
  """"Natural (training, N)" and the in-training attack's title; where the runs' differ
  (PGD-20, and PGD-20 on the CAS loss), what they share and "defense's loss"."""
  trained = [r.training for r in runs if r.training]
  points = "/".join(sorted({str(t.get("num_examples", "?")) for t in trained})) or "?"
  titles = {t.get("robust_attack", "PGD") for t in trained} or {"PGD"}
  robust = (titles.pop() if len(titles) == 1 else
            "/".join(sorted({t.split(" on ")[0] for t in titles})) + ", defense's loss")
  return {"training_natural": f"Natural (training, {points})",
          "training_robust": f"{robust} (training, {points})"}


def _cells(group: Group, columns: Sequence[str]) -> dict[str, Cell]:
  def value(run: Run, column: str) -> float | None:
    if column in TRAINING_COLUMNS:
      key = "natural_accuracy" if column == "training_natural" else "robust_accuracy"
      return None if run.training is None else run.training.get(key)
    return run.evaluation["results"].get(column, {}).get("accuracy")
  return {c: Cell(tuple(value(r, c) for r in group.runs)) for c in columns}


def pair_runs(model: Group, baseline: Group) -> tuple[list[tuple[Run, Run]], str]:
  """Runs paired by seed where both have it, the others in seed order; how they paired."""
  theirs = {r.seed: r for r in baseline.runs}
  pairs = [(r, theirs[r.seed]) for r in model.runs if r.seed in theirs]
  rest_model = [r for r in model.runs if r.seed not in theirs]
  rest_base = [r for r in baseline.runs if r.seed not in {m.seed for m in model.runs}]
  pairs += list(zip(rest_model, rest_base))
  how = ", ".join(f"{a.seed}-{b.seed}" for a, b in pairs)
  unpaired = len(model.runs) + len(baseline.runs) - 2 * len(pairs)
  return pairs, f"seed pairs {how}" + (f"; {unpaired} run(s) without a partner left out of "
                                       "the paired test" if unpaired else "")


def _comparisons(group: Group, baseline: Group, columns: Sequence[str], confidence: float
                 ) -> tuple[dict[str, significance.Comparison | str], str]:
  pairs, how = pair_runs(group, baseline)
  if any(a.robust is None or b.robust is None for a, b in pairs):
    return {c: NO_OUTCOMES for c in columns}, how
  out: dict[str, significance.Comparison | str] = {}
  for column in columns:
    if any(column not in a.robust or column not in b.robust for a, b in pairs):
      out[column] = "not run on both"
      continue
    out[column] = significance.compare([a.robust[column] for a, _ in pairs],
                                       [b.robust[column] for _, b in pairs], confidence)
  return out, how


def _warnings(group: Group, section: Section) -> tuple[dict[str, list[str]], str]:
  """Column -> the evaluation's and the audit's warnings on it, per run; the audit verdict.
  An audit of another checkpoint, eps, norm or point count than the evaluation's is
  not attached (the verdict says so)."""
  out: dict[str, list[str]] = {}
  audited, signs, elsewhere = 0, 0, 0
  e = section.evaluation
  for run in group.runs:
    results = run.evaluation["results"]
    for column, r in results.items():
      for warning in r.get("warnings", ()):
        out.setdefault(column, []).append(f"seed {run.seed}: {warning}")
      if r.get("non_finite_points"):
        out.setdefault(column, []).append(
            f"seed {run.seed}: {r['non_finite_points']} point(s) with non-finite x' or "
            "logits, counted as not robust")
    a = run.audit
    if a is None:
      continue
    same = (a.get("checkpoint"), a.get("step"), a.get("eps"), a.get("norm"), a.get("points")
            ) == (run.evaluation["checkpoint"], run.evaluation.get("step"), e.eps, e.norm,
                  e.points)
    if not same:
      elsewhere += 1
      continue
    audited += 1
    found = [("autoattack", f"AutoAttack check {c['check']}: {c['warning']}")
             for c in a.get("autoattack", {}).get("checks", ()) if not c.get("passed", True)]
    attack = a.get("attack", {}).get("name", "")
    found += [(attack, f"audit: {i['title']} triggered ({i['value']:.4f} > "
               f"{i['threshold']:g})") for i in a.get("indicators", {}).values()
              if i.get("triggered")]
    found += [(attack, f"audit: robust accuracy against {k}: {c['verdict']}")
              for k, c in a.get("curves", {}).items() if not c.get("passed", True)]
    signs += bool(found)
    for column, text in found:
      out.setdefault(column if column in section.titles else "worst_case", []).append(
          f"seed {run.seed}: {text}")
  n = len(group.runs)
  verdict = ("not audited" if audited == 0 else
             f"no sign ({audited}/{n} audited)" if signs == 0 else
             f"signs in {signs} of {audited} audited (of {n})")
  if elsewhere:
    verdict += f"; {elsewhere} audit(s) of another evaluation not used"
  return out, verdict


def build(runs: Sequence[Run], left_out: Sequence[LeftOut], baseline: str | None,
          confidence: float = 0.95) -> Report:
  """The report of `runs` (`left_out`: what reading left out) against `baseline`
  (`--baseline`'s text, or None)."""
  spec = grouping.parse_baseline(baseline) if baseline else {}
  problem = grouping.baseline_problem(spec, runs) if spec and runs else None
  found, fields, dropped = grouping.sections(runs)
  out, not_compared = [], []
  for section in found:
    members = [r for g in section.groups for r in g.runs]
    titles = {**_training_titles(members), **section.titles}
    rows, pairing = [], {}
    baselines_first = sorted(section.groups,
                             key=lambda g: not (spec and grouping.is_baseline(g, spec)))
    for group in baselines_first:
      warnings, verdict = _warnings(group, section)
      row = Row(group, _cells(group, list(titles)), {}, None, warnings, verdict)
      if spec and problem is None and not grouping.is_baseline(group, spec):
        row.baseline, why = grouping.baseline_of(group, section, spec, found)
        if row.baseline is None:
          row.comparisons = {c: why for c in section.titles}
        else:
          row.comparisons, pairing[group.label] = _comparisons(
              group, row.baseline, list(section.titles), confidence)
          why = NO_OUTCOMES if row.comparisons["worst_case"] == NO_OUTCOMES else ""
        if why:
          not_compared.append(f"{group.label} ({', '.join(r.workdir for r in group.runs)}): "
                              f"{why}")
      rows.append(row)
    out.append(SectionReport(section, titles, rows, pairing))
  notes = [f"{r.workdir}: {n}" for r in runs for n in r.notes]
  return Report(out, fields, [*left_out, *dropped], spec, problem, confidence, notes,
                not_compared)


def summary_line(comparison: significance.Comparison | str | None) -> str:
  """"+1.67 [-0.83, +4.17], p = 0.27" (points of accuracy); a reason as it is."""
  if comparison is None or isinstance(comparison, str):
    return comparison or ""
  c = comparison
  p = format_p(c.p_value)
  return (f"{100 * c.difference:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}], "
          + (f"p {p}" if p.startswith("<") else f"p = {p}"))


def format_p(p: float) -> str:
  """Two significant digits; "< 1e-4" below."""
  return "1" if p >= 1 else f"{p:.2g}" if p >= 1e-4 else "< 1e-4"


def mean_std(cell: Cell) -> str:
  """"90.28 ± 0.48" (%), the mean alone for one run, "n/a" for none."""
  if cell.mean is None:
    return "n/a"
  return (f"{100 * cell.mean:.2f}" if cell.std is None
          else f"{100 * cell.mean:.2f} ± {100 * cell.std:.2f}")
