"""metrics.jsonl: appended row by row on a local disk, rewritten whole where a file cannot be
appended to (object stores); a resumed run keeps the rows through its checkpoint's step and
drops the rest, a last row cut short by a kill included."""
import json

import pytest

from jaxdefense.workdir import metrics, paths


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_rows_are_appended_without_rewriting_the_file(tmp_path, monkeypatch):
  writer = metrics.MetricWriter(tmp_path, enabled=True)
  monkeypatch.setattr(paths, "write_text", lambda *a, **k: pytest.fail("rewrote the file"))
  for step in range(1, 6):
    writer.write(step, {"loss": step / 10}, epoch=0)
  writer.close()
  assert _rows(tmp_path / "metrics.jsonl") == [{"step": s, "epoch": 0, "loss": s / 10}
                                               for s in range(1, 6)]


def test_object_store_rows_are_rewritten_whole_at_each_row(tmp_path, monkeypatch):
  monkeypatch.setattr(paths, "is_remote", lambda path: True)
  written = []
  real_write_text = paths.write_text
  monkeypatch.setattr(paths, "write_text",
                      lambda path, text: (written.append(text), real_write_text(path, text)))
  writer = metrics.MetricWriter(tmp_path, enabled=True)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0})
  writer.close()
  assert [[json.loads(r)["step"] for r in text.splitlines()] for text in written] == [
      [1], [1, 2], [1, 2, 3]]


@pytest.mark.parametrize("remote", [False, True])
def test_resume_keeps_the_rows_through_its_step_and_drops_a_torn_row(tmp_path, monkeypatch,
                                                                     remote):
  monkeypatch.setattr(paths, "is_remote", lambda path: remote)
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6, 8))
                  + '{"step": 10, "lo')
  writer = metrics.MetricWriter(tmp_path, enabled=True, resume_step=4)
  assert [r["step"] for r in _rows(path)] == [2, 4]
  writer.write(6, {"loss": 0.5})
  writer.close()
  assert _rows(path) == [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 1.0},
                         {"step": 6, "loss": 0.5}]
