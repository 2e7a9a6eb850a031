"""Where metrics go: `workdir/metrics.jsonl` (one JSON object per log step) and TensorBoard
event files. Only process 0 writes; the others get a writer that does nothing.

The JSON-lines file is rewritten whole and atomically at each write (through
`jaxdefense.paths`), which works on object stores such as `gs://`, where a file cannot be
appended to. TensorBoard events go through tensorboardX, which writes `gs://` with
google-cloud-storage (`pip install -e ".[gcs]"`); the writer is opened at construction, so
a workdir it cannot write fails at start-up, not at the first log step.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from jaxdefense import paths


def _tensorboard(logdir: epath.Path):
  from tensorboardX import SummaryWriter  # Imported here: only process 0 writes events.
  try:
    return SummaryWriter(str(logdir))
  except ImportError as e:
    raise ValueError(f"cannot write TensorBoard events to {logdir}: {e} (for gs:// "
                     "workdirs: pip install -e \".[gcs]\")") from e


class MetricWriter:
  def __init__(self, workdir: epath.PathLike, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._rows: list[str] = []
    self._tb = None
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      if self._path.exists():
        self._rows = self._path.read_text().splitlines()
      self._tb = _tensorboard(epath.Path(workdir) / "tensorboard")

  def write(self, step: int, metrics: Mapping[str, Any], **context: Any) -> None:
    """Adds `{"step": step, **context, **metrics}`; scalars also go to TensorBoard."""
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._rows.append(json.dumps({"step": int(step), **context, **scalars}))
    paths.write_text(self._path, "\n".join(self._rows) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
