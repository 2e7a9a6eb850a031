"""The errors a run reports as one line, and the exit code `main.py` gives each
(docs/faults.md). Anything else is a bug, reported with its traceback (exit 1)."""
from __future__ import annotations

import errno
import os
import re

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; rerun to resume.


class RunError(Exception):
  """A fault of the run's inputs or state, not of the program."""
  exit_code = 2


class ConfigError(RunError, ValueError):
  """A config value (or command-line argument) that is not allowed: the message names the
  field, the value and what is allowed. Raised before any data is loaded."""
  exit_code = 2


class DataError(RunError, ValueError):
  """A data set that is not prepared, or a data file that is missing or malformed."""
  exit_code = 2


class Diverged(RunError):
  """The loss or the gradient norm became non-finite; nothing from that step was saved."""
  exit_code = 3


class WorkdirBusy(RunError):
  """Another training run holds the workdir."""
  exit_code = 4


class ConfigMismatch(RunError):
  """The config builds other parameters than the workdir's checkpoints hold."""
  exit_code = 5


class WeightsMismatch(RunError):
  """Imported weights (a PyTorch state_dict) that do not fit the layout or the config."""
  exit_code = 5


class NoIntactCheckpoint(RunError):
  """No saved step restores, or the one asked for holds non-finite parameters."""
  exit_code = 6


class NoCheckpoint(RunError, FileNotFoundError):
  """Evaluation or analysis of a workdir with nothing trained in it."""
  exit_code = 6


class WorkdirError(RunError, OSError):
  """A workdir (or a file in it) that cannot be read or written: damaged, not writable,
  out of space. The message names the path and what to do."""
  exit_code = 6


def _io_failure(e: OSError) -> WorkdirError:
  where = f" ({e.filename})" if e.filename else ""
  if e.errno == errno.ENOSPC:
    todo = ("free space there and rerun the same command: the run resumes from its last "
            "intact checkpoint")
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    todo = "make it writable (or use another --workdir) and rerun the same command"
  else:
    todo = "fix the path or the file and rerun the same command"
  return WorkdirError(f"{e.strerror or e}{where}: {todo}")


def as_run_error(e: BaseException) -> RunError | None:
  """`e` as the one-line fault it stands for: itself if a RunError, an I/O failure (an
  OSError anywhere in its cause chain, e.g. a full disk under a checkpoint save) as a
  WorkdirError naming the path; None for anything else (a bug: keep its traceback)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, RunError):
      return e
    if isinstance(e, OSError) and e.errno is not None:
      return _io_failure(e)
    code = re.search(r"\[os_error_code='(\d+)'\]", str(e))  # TensorStore's (orbax's) I/O.
    if code:
      path = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(e))
      number = int(code.group(1))
      return _io_failure(OSError(number, os.strerror(number), path and path.group(1)))
    e = e.__cause__ or e.__context__
  return None
