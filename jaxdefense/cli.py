"""The command lines' error reporting (main.py, `python -m jaxdefense.interop.convert`,
`python -m jaxdefense.data.prepare`, `python -m jaxdefense.data.demo_extra`): a bad flag,
config file or config value, and any fault of the run's inputs or workdir, is one
`error:` line on stderr with its exit code (jaxdefense/errors.py); a bug keeps its
traceback (exit 1).
"""
from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator

import ml_collections
from absl import flags, logging

from jaxdefense import errors


def refuse_arguments(argv: list[str], usage: str) -> None:
  """One `error:` line (exit 2) when a command that takes only flags got other arguments."""
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}; usage: {usage} (--helpfull "
          "lists the flags)", file=sys.stderr, flush=True)
    sys.exit(errors.ConfigError.exit_code)


def _config_argument(argv: list[str]) -> str:
  return next((a for a in argv if a.startswith("--config=")), "--config")


def _flag_error(e: Exception, argv: list[str]) -> str:
  """A flag-parsing failure as one line naming the argument."""
  text = str(e)
  if "Traceback (most recent call last)" in text:  # Raised by the config file itself.
    return f"{_config_argument(argv)}: {text.strip().splitlines()[-1]}"
  if isinstance(e, (AttributeError, KeyError)):  # An override of a field the config lacks.
    field = re.search(r"\w+", text).group()
    hint = re.search(r"Did you mean (\S+) instead", text)
    arg = next((a.split("=")[0] for a in argv if a.startswith("--config.") and field in a), "")
    return (f"{arg}: the config has no field {field!r}"
            + (f" (did you mean {hint.group(1)}?)" if hint else ""))
  return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or config override (an unknown
  field, a value of the wrong type) reported as one line, exit 2."""
  try:
    remaining = flags.FLAGS(argv)
    config = flags.FLAGS["config"] if "config" in flags.FLAGS else None  # None: no --config.
    if (config is not None and config.present
        and not isinstance(config.value, ml_collections.ConfigDict)):
      raise flags.Error(f"{_config_argument(argv)}: no such config file, or it does not load")
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {_flag_error(e, argv)} (--helpfull lists the flags)", file=sys.stderr,
          flush=True)
    sys.exit(errors.ConfigError.exit_code)


@contextlib.contextmanager
def faults_as_one_line(workdir: str | None = None) -> Iterator[None]:
  """Runs the body; a RunError, or an I/O failure or Cloud Storage's refusal anywhere in an
  exception's cause chain (`errors.as_run_error`; a refusal names `workdir`), ends the
  program with one line and its exit code."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 (anything else is re-raised)
    fault = errors.as_run_error(e, workdir)
    if fault is None:
      raise
    print(f"error: {fault}", file=sys.stderr, flush=True)
    sys.exit(fault.exit_code)


def quiet_logging() -> None:
  """Warnings and errors only, unless -v was given: Orbax logs every save at INFO and JAX
  its platform probing (`-v 0` shows them)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
