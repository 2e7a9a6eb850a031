"""The report as text: `markdown` (report.md), `csv_text` (report.csv: one row per group
and column, every number) and `latex` (report.tex: a table per section a paper can
\\input, plain tabular, no package needed)."""
from __future__ import annotations

import csv
import io
from typing import Iterator

from jaxdefense.report import grouping
from jaxdefense.report.summary import Report, Row, SectionReport, format_p, mean_std, \
    summary_line

MARK = "†"  # A cell that a warning below the table qualifies.


def _baseline_title(report: Report) -> str:
  return ", ".join(f"{grouping.short_name(f)}={v}" for f, v in report.baseline.items())


def _cell(row: Row, column: str) -> str:
  return mean_std(row.cells[column]) + (f" {MARK}" if row.warnings.get(column) else "")


def _significance(report: Report, row: Row) -> str:
  if not report.baseline or report.baseline_problem:
    return ""
  if row.baseline is None and not row.comparisons:
    return "baseline"
  return summary_line(row.comparisons.get("worst_case"))


def main_table(report: Report, s: SectionReport) -> list[str]:
  """A section's table: a row per group, a column per accuracy, the worst case's paired
  comparison with the baseline, the audit's verdict."""
  compare = bool(report.baseline) and report.baseline_problem is None
  head = ["group", "seeds", *s.titles.values()]
  head += [f"Worst case vs {_baseline_title(report)} (points, "
           f"{100 * report.confidence:g}% interval, McNemar p)"] if compare else []
  head += ["audit"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in s.rows:
    cells = [row.group.label, ", ".join(map(str, row.group.seeds)),
             *(_cell(row, c) for c in s.titles)]
    cells += [_significance(report, row)] if compare else []
    cells += [row.audit]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _comparison_table(report: Report, s: SectionReport) -> list[str]:
  rows = [r for r in s.rows if r.comparisons]
  if not rows:
    return []
  lines = [f"Paired with the baseline ({_baseline_title(report)}), each point of each seed "
           "pair one pair: difference in robust accuracy (points), its exact "
           f"{100 * report.confidence:g}% interval given the discordant pairs, McNemar's "
           "exact p; better / worse: point pairs robust under the group only / under the "
           "baseline only.", "",
           "| group | column | difference | interval | p | better | worse | point pairs |",
           "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    for column, title in s.section.titles.items():
      c = row.comparisons.get(column)
      if isinstance(c, str) or c is None:
        lines.append(f"| {row.group.label} | {title} | {c or ''} | | | | | |")
      else:
        lines.append(f"| {row.group.label} | {title} | {100 * c.difference:+.2f} | "
                     f"[{100 * c.low:+.2f}, {100 * c.high:+.2f}] | {format_p(c.p_value)} | "
                     f"{c.better} | {c.worse} | {c.pairs} |")
  lines += [""] + [f"- {label}: {how}" for label, how in s.pairing.items()]
  return lines


def _warning_lines(s: SectionReport) -> list[str]:
  return [f"- {MARK} {row.group.label}, {s.titles[column]}: {text}"
          for row in s.rows for column in s.titles for text in row.warnings.get(column, ())]


def _run_table(s: SectionReport) -> list[str]:
  columns = list(s.titles)
  lines = ["| group | seed | workdir | " + " | ".join(s.titles.values()) + " |",
           "|" + "---|" * (len(columns) + 3)]
  for row in s.rows:
    for i, run in enumerate(row.group.runs):
      values = [row.cells[c].values[i] for c in columns]
      lines.append(f"| {row.group.label} | {run.seed} | {run.workdir} | " + " | ".join(
          "n/a" if v is None else f"{100 * v:.2f}" for v in values) + " |")
  return lines


def markdown(report: Report) -> str:
  """report.md: per section the table (mean ± sample std over the seeds, %), the paired
  comparisons, the warnings and the runs; then what was left out and why."""
  lines = ["# Report", ""]
  if report.fields:
    lines += ["Groups differ in " + ", ".join(f"`{f}`" for f in report.fields)
              + "; runs of a group differ only in the seed (replicates).", ""]
  if report.baseline_problem:
    lines += [f"No paired comparison: {report.baseline_problem}.", ""]
  for i, s in enumerate(report.sections):
    lines += [f"## {s.section.evaluation.title()}", "",
              "Accuracy (%), mean ± sample standard deviation over the seeds; "
              f"{s.section.evaluation.points} points per run. \"(training, N)\": each "
              "training's final in-training evaluation (results.json) on N test points; "
              "the other columns are eval.json's.", ""]
    lines += main_table(report, s) + [""]
    warnings = _warning_lines(s)
    if warnings:
      lines += [f"{MARK}: qualified by warnings of the evaluation or the audit:", "",
                *warnings, ""]
    comparison = _comparison_table(report, s)
    if comparison:
      lines += ["### Paired comparisons", "", *comparison, ""]
    lines += ["### Runs", "", *_run_table(s), ""]
  if len(report.sections) > 1:
    lines += ["Runs in different sections were evaluated differently (points, eps, norm, "
              "protocol or dtype) and are never compared.", ""]
  if report.left_out or report.notes or report.not_compared:
    lines += ["## Left out", ""]
    lines += [f"- {item.line()}" for item in report.left_out]
    lines += [f"- not compared: {line}" for line in report.not_compared]
    lines += [f"- read in part: {note}" for note in report.notes]
    lines.append("")
  return "\n".join(lines)


CSV_HEADER = ("section", "group", "column", "title", "seeds", "points", "mean", "std", "min",
              "max", "baseline", "difference", "interval_low", "interval_high", "p_value",
              "better", "worse", "point_pairs", "comparison_note", "warnings", "audit")


def _csv_rows(report: Report) -> Iterator[list]:
  for s in report.sections:
    for row in s.rows:
      for column, title in s.titles.items():
        cell = row.cells[column]
        c = row.comparisons.get(column)
        numbers = ([""] * 7 if c is None or isinstance(c, str) else
                   [c.difference, c.low, c.high, c.p_value, c.better, c.worse, c.pairs])
        present = cell.present
        yield [s.section.evaluation.title(), row.group.label, column, title,
               " ".join(map(str, row.group.seeds)), s.section.evaluation.points,
               "" if cell.mean is None else cell.mean, "" if cell.std is None else cell.std,
               min(present) if present else "", max(present) if present else "",
               row.baseline.label if row.baseline else "", *numbers,
               c if isinstance(c, str) else "", " | ".join(row.warnings.get(column, ())),
               row.audit]


def csv_text(report: Report) -> str:
  """report.csv: accuracies as fractions, one row per section, group and column."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_HEADER)
  writer.writerows(_csv_rows(report))
  return out.getvalue()


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$"}


def latex_escape(text: str) -> str:
  return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(row: Row, column: str) -> str:
  cell = row.cells[column]
  if cell.mean is None:
    return "n/a"
  text = f"{100 * cell.mean:.2f}" + ("" if cell.std is None else
                                     rf" \pm {100 * cell.std:.2f}")
  return f"${text}" + (r"^\dagger" if row.warnings.get(column) else "") + "$"


def latex(report: Report) -> str:
  """report.tex: per section a table, one row per group (mean ± std, %), the worst case's
  difference from the baseline with its interval and p where compared."""
  compare = bool(report.baseline) and report.baseline_problem is None
  parts = ["% jaxdefense report: \\input{report.tex}; one table per evaluation."]
  for s in report.sections:
    columns = [c for c in s.titles if c not in ("training_natural", "training_robust")]
    head = [latex_escape(h) for h in ("Group", "Seeds", *(s.titles[c] for c in columns))]
    head += [f"$\\Delta$ worst case vs {latex_escape(_baseline_title(report))}"] * compare
    rows = []
    for row in s.rows:
      cells = [latex_escape(row.group.label), str(len(row.group.runs)),
               *(_latex_cell(row, c) for c in columns)]
      if compare:
        cells.append(latex_escape(_significance(report, row)))
      rows.append(" & ".join(cells) + r" \\")
    caption = (f"Accuracy (\\%), mean $\\pm$ sample standard deviation over the seeds: "
               f"{latex_escape(s.section.evaluation.title())}.")
    parts += [r"\begin{table}[t]", r"\centering", f"\\caption{{{caption}}}",
              r"\begin{tabular}{l" + "c" * (len(head) - 1) + "}", r"\hline",
              " & ".join(head) + r" \\", r"\hline", *rows, r"\hline", r"\end{tabular}",
              r"\end{table}", ""]
  return "\n".join(parts)
