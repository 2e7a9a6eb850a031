"""The run's directory: where it is, and how files get into it.

A workdir is a local path (relative, `~`, or through a symlink) or a remote URL such as
`gs://bucket/run` on Cloud TPU. `resolve` makes a local one absolute once, where a run
starts (orbax refuses relative checkpoint paths), and leaves a remote one as given. Every
output goes through `etils.epath`, and whole files are written atomically: to a temporary
name beside the target, then renamed over it, so a reader (or a killed run) never sees
half a file.
"""
from __future__ import annotations

import io
import os
import uuid

from etils import epath

from jaxdefense import errors


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
  return "://" in str(path)


def resolve(path: epath.PathLike) -> epath.Path:
  """`path` as an absolute local path (user and symlinks expanded), or the URL as given."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (temporary file, then rename), creating parents."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text(path: epath.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode("utf-8"))


def check_writable(directory: epath.PathLike) -> None:
  """RunError naming `directory` unless it is (or can be made) a directory that takes a
  file: checked where a run starts, before any data is loaded."""
  directory = epath.Path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    if not directory.is_dir():
      raise NotADirectoryError(f"{directory} is a file")
    probe = directory / f".write-test-{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise errors.RunError(f"workdir {directory} is not a writable directory: {e}") from e


def write_png(fig, path: epath.PathLike) -> epath.Path:
  """A matplotlib figure, laid out, written as a PNG through epath, then closed."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  write_bytes(path, png.getvalue())
  return epath.Path(path)
