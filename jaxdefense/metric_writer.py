"""Where metrics go: `workdir/metrics.jsonl` (one JSON object per log step) and TensorBoard
event files. Only process 0 writes; the others get a writer that does nothing."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Imported here: only process 0 writes events.
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], **context: Any) -> None:
    """Appends `{"step": step, **context, **metrics}`; scalars also go to TensorBoard."""
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **context, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
