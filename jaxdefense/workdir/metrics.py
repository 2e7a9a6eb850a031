"""Where metrics go: `workdir/metrics.jsonl` (one JSON object per log step) and TensorBoard
event files. Only process 0 writes; the others get a writer that does nothing.

On a local filesystem each row is appended to the JSON-lines file and flushed, so logging
costs the same at any step of a run. An object store such as `gs://` cannot append to an
object: there the file is rewritten whole, atomically (`jaxdefense.workdir.paths`), at
each row. TensorBoard events go through tensorboardX, which writes `gs://` with
google-cloud-storage (`pip install -e ".[gcs]"`); `check_supported`, called where a run
starts, fails for a remote workdir it cannot write, not at the first log step. A resumed
run drops what a killed run logged after its checkpoint: JSON rows past `resume_step`
(and a last row cut short by the kill), rewritten once at the start, and TensorBoard
events through tensorboardX's purge step.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from jaxdefense import errors
from jaxdefense.workdir import paths


def check_supported(workdir: epath.PathLike) -> None:
  """RunError unless tensorboardX can write events under `workdir` (local paths always;
  gs:// with google-cloud-storage, s3:// with boto3)."""
  if not paths.is_remote(workdir):
    return
  from tensorboardX import record_writer
  scheme = str(workdir).split("://", 1)[0]
  factory = record_writer.REGISTERED_FACTORIES.get(scheme)
  missing = {record_writer.GCSRecordWriterFactory: ("google-cloud-storage",
                                                    record_writer.GCS_ENABLED),
             record_writer.S3RecordWriterFactory: ("boto3", record_writer.S3_ENABLED)}
  package, enabled = missing.get(type(factory), (None, True))
  if factory is None or not enabled:
    need = f"; install {package} (gs://: pip install -e \".[gcs]\")" if package else ""
    raise errors.RunError(f"cannot write TensorBoard events to {workdir}: tensorboardX has "
                          f"no usable writer for {scheme}://{need}")


def _rows_through(text: str, resume_step: int) -> list[str]:
  """The rows of a metrics.jsonl up to `resume_step`; a last row cut short is dropped."""
  rows = []
  for line in text.splitlines():
    try:
      step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
      continue  # A row a kill cut short (appends are not atomic).
    if step <= resume_step:
      rows.append(line)
  return rows


class MetricWriter:
  def __init__(self, workdir: epath.PathLike, *, enabled: bool | None = None,
               resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._append = not paths.is_remote(workdir)
    self._rows: list[str] = []  # The whole file, kept only where it is rewritten at each row.
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Imported here: only process 0 writes events.
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      if self._path.exists():
        text = self._path.read_text()
        rows = text.splitlines() if resume_step is None else _rows_through(text, resume_step)
        if resume_step is not None:
          paths.write_text(self._path, "".join(r + "\n" for r in rows))
        if not self._append:
          self._rows = rows
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any], **context: Any) -> None:
    """Adds `{"step": step, **context, **metrics}`; scalars also go to TensorBoard."""
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    row = json.dumps({"step": int(step), **context, **scalars})
    if self._append:
      with self._path.open("a") as f:
        f.write(row + "\n")
    else:
      self._rows.append(row)
      paths.write_text(self._path, "".join(r + "\n" for r in self._rows))
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
