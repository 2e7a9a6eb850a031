"""The errors a run reports as one line, and the exit code `main.py` gives each (README:
"Faults and restarts"). Anything else is a bug, reported with its traceback (exit 1)."""
from __future__ import annotations

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; rerun to resume.


class RunError(Exception):
  """A fault of the run's inputs or state, not of the program."""
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
