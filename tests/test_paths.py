"""Workdir paths: local ones made absolute (relative, ~, symlinks), URLs kept; atomic writes,
also to a (mocked) gs:// bucket."""
import os

from etils import epath
from etils.epath import testing as epath_testing

from jaxdefense.workdir import paths


def test_relative_home_and_symlinked_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("workdirs/run") == epath.Path(tmp_path / "workdirs" / "run")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.resolve("~/run") == epath.Path(tmp_path / "home" / "run")
  (tmp_path / "real").mkdir()
  os.symlink(tmp_path / "real", tmp_path / "link")
  assert paths.resolve("link/run") == epath.Path(tmp_path / "real" / "run")
  assert os.path.isabs(str(paths.resolve(".")))


def test_urls_are_kept_as_given():
  for url in ("gs://bucket/run", "gs://bucket/a/../run", "s3://b/x"):
    assert str(paths.resolve(url)) == url
    assert paths.is_remote(url)
  assert not paths.is_remote("workdirs/gs:run")


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
  target = tmp_path / "deep" / "eval.json"
  paths.write_text(target, "first")
  paths.write_text(target, "second")
  paths.write_bytes(tmp_path / "plot.png", b"\x89PNG")
  assert target.read_text() == "second"
  assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
  assert sorted(os.listdir(tmp_path / "deep")) == ["eval.json"]


def test_writes_reach_a_gs_bucket(tmp_path, monkeypatch):
  """Under etils' gs:// mock (a local folder `gs:/bucket` in the working directory)."""
  monkeypatch.chdir(tmp_path)
  with epath_testing.mock_epath():
    workdir = paths.resolve("gs://bucket/run")
    paths.write_text(workdir / "eval.json", "{}")
    assert (workdir / "eval.json").read_text() == "{}"
    assert [p.name for p in workdir.iterdir()] == ["eval.json"]
  assert (tmp_path / "gs:" / "bucket" / "run" / "eval.json").read_text() == "{}"
