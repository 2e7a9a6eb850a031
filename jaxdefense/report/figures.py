"""The report's pictures (PNG, beside report.md; matplotlib through `evaluation.plotting`):
`robust_accuracy` (per section: each column's accuracy per group, every seed a dot, the
mean a bar with the sample standard deviation) and `training_curves` (natural and
in-training robust accuracy against epoch from metrics.jsonl, each group a colour, each
seed a thin line, the mean over the seeds a thick one)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxdefense.evaluation import plotting
from jaxdefense.report.summary import SectionReport, TRAINING_COLUMNS

CURVES = (("eval/natural_accuracy", "natural"), ("eval/pgd_accuracy", "in-training robust"))


def robust_accuracy(s: SectionReport):
  """Accuracy (%) per column of `s`, groups side by side."""
  columns = [c for c in s.titles if c not in TRAINING_COLUMNS]
  figure, ax = plotting.new_figure(max(6.0, 0.9 * len(columns) + 2) + 3.0, 4.0)
  width = 0.8 / max(len(s.rows), 1)
  for g, row in enumerate(s.rows):
    x = np.arange(len(columns)) + (g - (len(s.rows) - 1) / 2) * width
    means = [row.cells[c].mean for c in columns]
    stds = [row.cells[c].std or 0.0 for c in columns]
    color = f"C{g % 10}"
    ax.bar(x, [100 * (m if m is not None else np.nan) for m in means], width * 0.9,
           yerr=[100 * s_ for s_ in stds], color=color, alpha=0.35, label=row.group.label,
           capsize=2)
    for i, c in enumerate(columns):
      values = row.cells[c].present
      ax.plot([x[i]] * len(values), [100 * v for v in values], "o", color=color,
              markersize=3)
  ax.set_xticks(np.arange(len(columns)), [s.titles[c] for c in columns], rotation=45,
                ha="right", fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(s.section.evaluation.title(), fontsize=9)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  return figure


def _by_epoch(rows: Sequence[dict], key: str) -> dict[int, float]:
  """Epoch -> the value of its last row (a resumed run may log an epoch twice)."""
  return {int(r.get("epoch", r["step"])): float(r[key]) for r in rows if key in r}


def training_curves(sections: Sequence[SectionReport]):
  """Natural and in-training robust accuracy against epoch, per group (a group evaluated
  in several sections is drawn once). None if no run logged an in-training evaluation."""
  groups, seen = [], set()
  for s in sections:
    for row in s.rows:
      if row.group.label not in seen and any(r.curves for r in row.group.runs):
        seen.add(row.group.label)
        groups.append(row.group)
  if not groups:
    return None
  figure, axes = plotting.new_figure(10.0, 4.0, columns=len(CURVES))
  for (key, name), ax in zip(CURVES, axes):
    for g, group in enumerate(groups):
      color = f"C{g % 10}"
      runs = [_by_epoch(r.curves, key) for r in group.runs if r.curves]
      for curve in runs:
        ax.plot(list(curve), [100 * v for v in curve.values()], color=color, alpha=0.3,
                linewidth=0.8)
      epochs = sorted(set.intersection(*(set(c) for c in runs)))
      ax.plot(epochs, [100 * np.mean([c[e] for c in runs]) for e in epochs], color=color,
              linewidth=2, marker="o", markersize=3, label=f"{group.label} ({len(runs)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{name} accuracy (%)")
    ax.legend(fontsize=8)
  return figure
