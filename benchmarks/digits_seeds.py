r"""The README's digits table: each defense trained with several seeds and evaluated alike.

    python benchmarks/digits_seeds.py --defenses=none,cas,fsr,cifs   # seeds 0 1 2
    python benchmarks/digits_seeds.py --defenses=none,cifs --seeds=0 --num_examples=60

For every defense and seed it trains `configs/quickstart.py:DEFENSE` with `--config.seed=S`
into `WORKDIR/DEFENSE_sS`, evaluates the last checkpoint with `--config.eval.protocol` (the
attack seed is the training seed) on the first `--num_examples` test points, audits the
runs of `--audit_seeds` if any (`--mode=audit` at the same points, eps and checkpoint;
each costs about an evaluation, AutoAttack included), then writes
`python -m jaxdefense.report`'s report of those workdirs against `--baseline` into
`--output` (default WORKDIR/report) and prints its table. Finished trainings and
evaluations (same protocol and points) are reused, so an interrupted run resumes where it
stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from jaxdefense.report import files, runs, summary, tables

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str]) -> None:
  cmd = [sys.executable, str(ROOT / "main.py"), *args]
  print("$", " ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def _evaluated(workdir: Path, protocol: str, num_examples: int) -> dict | None:
  path = workdir / "eval.json"
  if not path.exists():
    return None
  report = json.loads(path.read_text())
  results = report["results"]
  same = (report.get("protocol") == protocol and "outcomes" in report
          and results["natural"]["num_points"] == num_examples)
  return report if same else None


def run_one(workdir: Path, defense: str, seed: int, protocol: str, num_examples: int,
            batch_size: int, *, audit: bool = False, only_finished: bool = False
            ) -> dict | None:
  config = f"--config={ROOT / 'configs/quickstart.py'}:{defense}"
  if only_finished and _evaluated(workdir, protocol, num_examples) is None:
    return None
  started = time.time()
  if not (workdir / "results.json").exists():
    _run([config, f"--workdir={workdir}", f"--config.seed={seed}"])
  trained = time.time()
  evaluation = [config, f"--workdir={workdir}", "--checkpoint=last", f"--config.seed={seed}",
                f"--config.eval.seed={seed}", f"--config.eval.num_examples={num_examples}",
                f"--config.eval.batch_size={batch_size}"]
  report = _evaluated(workdir, protocol, num_examples)
  if report is None:
    _run(["--mode=eval", *evaluation, f"--config.eval.protocol={protocol}"])
    report = _evaluated(workdir, protocol, num_examples)
  evaluated = time.time()
  if audit and not only_finished and not (workdir / "audit.json").exists():
    _run(["--mode=audit", *evaluation])
  print(f"{defense} seed {seed}: train {trained - started:.0f} s, eval "
        f"{evaluated - trained:.0f} s, audit {time.time() - evaluated:.0f} s", flush=True)
  return report


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--defenses", default="none,cas,fsr")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--protocol", default="full")
  p.add_argument("--num_examples", type=int, default=120)
  p.add_argument("--batch_size", type=int, default=120)
  p.add_argument("--workdir", default="workdirs/seeds")
  p.add_argument("--audit_seeds", default="",
                 help="the seeds whose runs are also audited (--mode=audit), e.g. 0,1")
  p.add_argument("--baseline", default="defense=none",
                 help="the report's --baseline (FIELD=VALUE)")
  p.add_argument("--output", help="the report's directory (default WORKDIR/report)")
  p.add_argument("--only_finished", action="store_true",
                 help="report the finished runs only; start none")
  a = p.parse_args()
  root = Path(a.workdir).resolve()
  finished = []
  for defense in a.defenses.split(","):
    for seed in (int(s) for s in a.seeds.split(",")):
      workdir = root / f"{defense}_s{seed}"
      audit = str(seed) in a.audit_seeds.split(",")  # "" audits none.
      if run_one(workdir, defense, seed, a.protocol, a.num_examples, a.batch_size,
                 audit=audit, only_finished=a.only_finished) is not None:
        finished.append(str(workdir))
  found, left_out = runs.read_all(finished)
  report = summary.build(found, left_out, a.baseline)
  output = a.output or str(root / "report")
  files.write(report, output)
  print(f"\n{a.num_examples} test points, protocol {a.protocol}, seeds {a.seeds}; "
        f"report in {output}")
  for section in report.sections:
    print("\n" + "\n".join(tables.main_table(report, section)))


if __name__ == "__main__":
  main()
