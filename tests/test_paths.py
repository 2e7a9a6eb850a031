"""Workdir paths: local ones made absolute (relative, ~, symlinks), URLs kept; atomic writes
and the writable check, on a disk and in a bucket (the loopback storage server)."""
import os
import subprocess
import sys

import pytest
from etils import epath

from jaxdefense import errors
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


def test_a_bucket_workdir_is_checked_and_written_in_place(gcs_bucket):
  """Against the storage server: a new prefix, where nothing exists yet (an object store has
  no directories), passes the writable check and is left empty; files are written whole,
  in place (no temporary objects); a prefix that is an object, or a bucket that does not
  exist, is one line naming the workdir."""
  workdir = paths.resolve(f"{gcs_bucket}/run")
  paths.check_writable(workdir)
  assert not workdir.exists()
  paths.write_text(workdir / "eval.json", "first")
  paths.write_text(workdir / "eval.json", "second")
  assert (workdir / "eval.json").read_text() == "second"
  assert [p.name for p in workdir.iterdir()] == ["eval.json"]
  paths.check_writable(workdir)
  with pytest.raises(errors.RunError, match=rf"^workdir {workdir}/eval.json is not a writable "
                     rf"directory: {workdir}/eval.json is a file$"):
    paths.check_writable(workdir / "eval.json")
  with pytest.raises(errors.RunError, match=r"^workdir gs://no-such-bucket/run is not a writable "
                     r"directory: its bucket does not exist; create it or use another --workdir$"):
    paths.check_writable("gs://no-such-bucket/run")


def test_gcsfs_is_its_plain_filesystem_unless_the_environment_asks_otherwise():
  """Importing jaxdefense's paths makes gcsfs (imported later, as epath does) its plain
  GCSFileSystem, which does not look up each bucket's storage layout; a user's own
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is kept."""
  script = ("import jaxdefense.workdir.paths, fsspec; "
            "print(fsspec.get_filesystem_class('gs').__module__)")
  env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
  for setting, module in ((None, "gcsfs.core"), ("true", "gcsfs.extended_gcsfs")):
    if setting:
      env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = setting
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == module, out.stderr


def test_epath_reaches_buckets_through_gcsfs_even_where_tensorflow_is_importable(tmp_path):
  """With a stand-in `tensorflow` package importable, etils.epath would pick tf.io.gfile for
  gs:// paths; importing jaxdefense's paths keeps it on gcsfs (EPATH_USE_TF=false), unless
  the user's environment sets EPATH_USE_TF."""
  (tmp_path / "tensorflow").mkdir()
  (tmp_path / "tensorflow" / "__init__.py").write_text("")
  script = ("import jaxdefense.workdir.paths; from etils.epath import gpath; "
            "print(gpath._is_tf_installed())")
  env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
  for setting, uses_tf in ((None, "False"), ("true", "True")):
    if setting:
      env["EPATH_USE_TF"] = setting
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == uses_tf, out.stderr
