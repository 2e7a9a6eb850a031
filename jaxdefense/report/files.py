"""The report's files in its output directory (local or gs://): report.md, report.csv,
report.tex, robust_accuracy.png (one per section: robust_accuracy_N.png when there are
several) and training_curves.png (where the runs logged in-training evaluations)."""
from __future__ import annotations

from etils import epath

from jaxdefense.evaluation import plotting
from jaxdefense.report import figures, tables
from jaxdefense.report.summary import Report
from jaxdefense.workdir import paths


def write(report: Report, output: epath.PathLike) -> list[epath.Path]:
  """Writes `report` into `output`; the paths written."""
  output = paths.resolve(output)
  written = [output / name for name in ("report.md", "report.csv", "report.tex")]
  for path, text in zip(written, (tables.markdown(report), tables.csv_text(report),
                                  tables.latex(report))):
    paths.write_text(path, text)
  if not plotting.available("report plots"):
    return written
  for i, section in enumerate(report.sections):
    name = ("robust_accuracy.png" if len(report.sections) == 1
            else f"robust_accuracy_{i + 1}.png")
    written.append(plotting.write_png(figures.robust_accuracy(section), output / name))
  curves = figures.training_curves(report.sections)
  if curves is not None:
    written.append(plotting.write_png(curves, output / "training_curves.png"))
  return written
