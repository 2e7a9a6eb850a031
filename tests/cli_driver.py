"""Runs a command line's parsing and main function in-process, once per case, as
`python -m tests.cli_driver main|convert CASES.json RESULTS.json`: CASES holds argument
lists; RESULTS gets, per case, the exit code, stderr, and the traceback of an exception
that escaped (None when the program ended through sys.exit or returned). One process
serves every case, so the table of bad inputs costs one start-up of JAX."""
import contextlib
import importlib.util
import io
import json
import os
import sys
import traceback

from absl import flags

from jaxdefense import cli
from tests.helpers import ROOT


def _program(name: str):
  """(program name, main function) with the program's flags defined."""
  if name == "main":
    spec = importlib.util.spec_from_file_location("jaxdefense_main", os.path.join(ROOT, "main.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return "main.py", module.main
  from jaxdefense.interop import convert
  convert.define_flags()
  return "convert", convert.main


def run_case(program: str, main, argv: list[str]) -> dict:
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # The last case's overrides, defined as flags when parsed.
  sys.argv = [program, *argv]  # ml_collections finds the --config.* overrides there.
  stderr = io.StringIO()
  code, escaped = 0, None
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
    try:
      main(cli.parse_flags([program, *argv]))
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001 (what the table looks for)
      code, escaped = 1, traceback.format_exc()
  return {"argv": argv, "code": code, "stderr": stderr.getvalue(), "traceback": escaped}


def main(argv: list[str]) -> None:
  name, cases_path, results_path = argv[1:]
  program, main_fn = _program(name)
  with open(cases_path) as f:
    cases = json.load(f)
  results = [run_case(program, main_fn, case) for case in cases]
  with open(results_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv)
