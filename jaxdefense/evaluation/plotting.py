"""The evaluation modes' figures, written as PNG files (`pip install -e ".[plot]"`): the
audit's three curves (`audit_curves`) and the activation analysis' sorted channel bars
(`analysis_figures`). Each is a `matplotlib.figure.Figure` on its own Agg canvas, never
through pyplot, so that writing one neither changes the process's backend nor keeps the
figure alive.
"""
from __future__ import annotations

import importlib.util
import io
from typing import Any

import numpy as np
from etils import epath

from jaxdefense.workdir import paths


def available(what: str) -> bool:
  """Whether matplotlib is installed; if not, one line saying that `what` is not written."""
  if importlib.util.find_spec("matplotlib") is None:
    print(f"matplotlib is not installed: no {what} (pip install -e '.[plot]')", flush=True)
    return False
  return True


def new_figure(width: float, height: float, columns: int = 1):
  """A figure of `columns` axes side by side, on an Agg canvas; (figure, axes)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(width, height))
  FigureCanvasAgg(figure)
  return figure, figure.subplots(1, columns)


def write_png(figure, path: epath.PathLike) -> epath.Path:
  """`figure`, laid out, written as a PNG at 100 dpi through epath (gs:// included)."""
  figure.tight_layout()
  png = io.BytesIO()
  figure.savefig(png, format="png", dpi=100)
  paths.write_bytes(path, png.getvalue())
  return epath.Path(path)


def audit_curves(curves: dict[str, Any], title: str, autoattack: float):
  """Robust accuracy (%) against eps, iterations and restarts side by side, the counts run
  as the ticks of the two log-scaled count axes, and AutoAttack's robust accuracy
  (`autoattack`, a fraction) a labelled reference line on those two panels."""
  figure, axes = new_figure(12, 3.4, columns=3)
  for ax, (key, label) in zip(axes, (("eps", "eps"), ("iterations", "attack iterations"),
                                     ("restarts", "random restarts"))):
    entry = curves[key]
    ax.plot(entry[key], [100 * a for a in entry["accuracy"]], marker="o")
    if key != "eps":
      ax.set_xscale("log")
      ax.set_xticks(entry[key], [f"{count:g}" for count in entry[key]])
      ax.set_xticks([], minor=True)
      ax.axhline(100 * autoattack, color="tab:red", linestyle="--",
                 label=f"AutoAttack {100 * autoattack:.2f}%")
      ax.legend(fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(entry["verdict"][:48], fontsize=8)
    ax.grid(alpha=0.3)
  figure.suptitle(title, fontsize=9)
  return figure


def _sorted_bars(natural: np.ndarray, adversarial: np.ndarray, attack: str, *, xlabel: str,
                 ylabel: str, title: str, colors: tuple[str | None, str | None] = (None, None),
                 alphas: tuple[float, float] = (0.7, 0.7)):
  """Natural and adversarial bars per channel, channels sorted by the natural value."""
  figure, ax = new_figure(8, 3)
  order = np.argsort(-natural, kind="stable")
  for values, name, color, alpha in zip((natural, adversarial), ("natural", attack), colors,
                                        alphas):
    ax.bar(np.arange(len(values)), values[order], width=1.0, color=color, alpha=alpha,
           label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  return figure, ax


def analysis_figures(report: dict[str, Any]) -> dict[str, Any]:
  """The analysis' figures by file name: per analysed site the mean |activation| per channel
  (analysis_<site>.png), per CIFS module its mean channel importance
  (analysis_<module>.png), per site the CAS paper's activation frequency
  (analysis_frequency_<site>.png); natural vs adversarial, channels sorted by natural."""
  figures = {}
  for site, entry in report["sites"].items():
    figures[f"analysis_{site}.png"], _ = _sorted_bars(
        np.asarray(entry["natural"]["channel_magnitude"]),
        np.asarray(entry["adversarial"]["channel_magnitude"]), report["attack"],
        xlabel="channel (sorted by natural magnitude)", ylabel="mean |activation|",
        title=f"{site}: uniformity natural {entry['natural']['uniformity']:.3f}, "
              f"adversarial {entry['adversarial']['uniformity']:.3f}")
  for name, entry in report.get("cifs_masks", {}).items():
    figures[f"analysis_{name.split('/')[-1]}.png"], _ = _sorted_bars(
        np.asarray(entry["natural"]["channel_importance"]),
        np.asarray(entry["adversarial"]["channel_importance"]), report["attack"],
        xlabel="channel (sorted by natural importance)", ylabel="mean CIFS mask",
        title=f"{name}: top-10 channels shared {entry['top10_shared']}/10")
  frequency = report.get("activation_frequency") or {}
  for site, entry in frequency.get("sites", {}).items():
    figure, ax = _sorted_bars(
        np.asarray(entry["natural"]), np.asarray(entry["adversarial"]), frequency["attack"],
        xlabel="channel (sorted by natural frequency)", ylabel="number of activations",
        title=f"{site} (before the mask), class {frequency['class_index']}, "
              f"{frequency['num_images']} images",
        colors=("royalblue", "indianred"), alphas=(1.0, 0.7))
    ax.set_ylim(0, max(frequency["num_images"], 1))
    figures[f"analysis_frequency_{site}.png"] = figure
  return figures
