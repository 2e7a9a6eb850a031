"""The run's directory: where it is, and how files get into it.

A workdir is a local path (relative, `~`, or through a symlink) or a remote URL such as
`gs://bucket/run` on Cloud TPU. `resolve` makes a local one absolute once, where a run
starts (orbax refuses relative checkpoint paths), and leaves a remote one as given. Every
output goes through `etils.epath`, and whole files are written atomically, so a reader (or a
killed run) never sees half a file: on a local disk to a temporary name beside the target,
then renamed over it; on an object store in one upload (an object appears only once whole).

gs:// goes through gcsfs, whose default filesystem (2026.3 on) asks each bucket's storage
layout over gRPC before its calls, again at every call when that fails (no permission for
it, no gRPC route, an emulator), each time with a warning. jaxdefense needs none of what it
detects (zonal appends, hierarchical-namespace folder renames: it writes whole objects), so
it sets gcsfs's own switch GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read when gcsfs is
imported, unless the environment sets it (true for a zonal bucket). Where TensorFlow is
importable, etils.epath would serve gs:// through tf.io.gfile instead: EPATH_USE_TF=false
(unless set) keeps one backend everywhere, gcsfs, the one the extra data's concurrent range
reads need, the one tested against a storage server, and the one that honours
STORAGE_EMULATOR_HOST (tf.io.gfile asks www.googleapis.com whatever it says). gcsfs logs,
with its traceback, each request error it then raises (refused, or out of retries); those
logs are dropped: the error raised is reported (one line where it is a fault of the run).
"""
from __future__ import annotations

import logging
import os
import uuid

from etils import epath

from jaxdefense import errors

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("EPATH_USE_TF", "false")


class _DropRaisedRequestErrors(logging.Filter):
  """Drops gcsfs's log of a request error it then raises (module docstring)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.funcName != "retry_request"


logging.getLogger("gcsfs").addFilter(_DropRaisedRequestErrors())


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
  return "://" in str(path)


def resolve(path: epath.PathLike) -> epath.Path:
  """`path` as an absolute local path (user and symlinks expanded), or the URL as given."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically: in one upload to an object store; to a local disk
  as a temporary file renamed over it, creating parents."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_bytes(data)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text(path: epath.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode("utf-8"))


def check_writable(directory: epath.PathLike, what: str = "workdir") -> None:
  """RunError naming `directory` (as `what`) unless it is (or can be made) a directory that
  takes a file: checked where a run starts, before any data is loaded. On an object store,
  where a prefix exists only once an object is under it, unless it is not an object itself and an
  object can be written and deleted under it; Cloud Storage refusing the run's credentials
  or permissions is a WorkdirError saying what to do (`errors.storage_refusal`)."""
  directory = epath.Path(directory)
  try:
    if not is_remote(directory):
      directory.mkdir(parents=True, exist_ok=True)
    if directory.exists() and not directory.is_dir():
      raise NotADirectoryError(f"{directory} is a file")
    probe = directory / f".write-test-{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # noqa: BLE001  (an OSError, or a refusal by Cloud Storage)
    refused = errors.storage_refusal(e, directory)
    if refused is not None:
      raise refused from e
    if not isinstance(e, OSError):
      raise
    reason = ("its bucket does not exist; create it or use another --workdir"
              if is_remote(directory) and isinstance(e, FileNotFoundError)
              else " ".join(str(e).split()))  # gcsfs's messages span lines.
    raise errors.RunError(f"{what} {directory} is not a writable directory: {reason}") from e
