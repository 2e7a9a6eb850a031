r"""The README's digits table: each defense trained with several seeds, evaluated under one protocol.

    python benchmarks/digits_seeds.py                     # none, cas, fsr x seeds 0 1 2
    python benchmarks/digits_seeds.py --defenses=none,cifs --seeds=0 --num_examples=60

For every defense and seed it trains `configs/quickstart.py:DEFENSE` with `--config.seed=S`
into `WORKDIR/DEFENSE_sS`, evaluates the last checkpoint with `--config.eval.protocol` (the
attack seed is the training seed) on the first `--num_examples` test points, and prints a
markdown table of mean +- sample standard deviation over the seeds per attack. Finished
trainings and evaluations (same protocol and points) are reused, so an interrupted run
resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
  same = (report.get("protocol") == protocol
          and results["natural"]["num_points"] == num_examples)
  return report if same else None


def run_one(workdir: Path, defense: str, seed: int, protocol: str, num_examples: int,
            batch_size: int, *, only_finished: bool = False) -> dict | None:
  config = f"--config={ROOT / 'configs/quickstart.py'}:{defense}"
  if only_finished and _evaluated(workdir, protocol, num_examples) is None:
    return None
  started = time.time()
  if not (workdir / "results.json").exists():
    _run([config, f"--workdir={workdir}", f"--config.seed={seed}"])
  trained = time.time()
  report = _evaluated(workdir, protocol, num_examples)
  if report is None:
    _run(["--mode=eval", "--checkpoint=last", config, f"--workdir={workdir}",
          f"--config.seed={seed}", f"--config.eval.seed={seed}",
          f"--config.eval.protocol={protocol}", f"--config.eval.num_examples={num_examples}",
          f"--config.eval.batch_size={batch_size}"])
    report = _evaluated(workdir, protocol, num_examples)
  print(f"{defense} seed {seed}: train {trained - started:.0f} s, eval "
        f"{time.time() - trained:.0f} s", flush=True)
  report["training"] = json.loads((workdir / "results.json").read_text())
  return report


def _cell(values: list[float]) -> str:
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(reports: dict[str, list[dict]]) -> str:
  """Mean +- sample std (%) over the seeds; one row per defense: the training run's final
  natural and in-training PGD accuracy on all test points, then each attack's."""
  columns: dict[str, str] = {}
  for runs in reports.values():
    for name, r in runs[0]["results"].items():
      columns.setdefault(name, r["title"])
  columns["worst_case"] = columns.pop("worst_case")  # Last, after every defense's attacks.
  lines = ["| defense | Natural (all) | in-training PGD (all) | "
           + " | ".join(columns.values()) + " |", "|---|" + "---|" * (len(columns) + 2)]
  for defense, runs in reports.items():
    label = defense if len(runs) == max(map(len, reports.values())) else \
        f"{defense} ({len(runs)} seeds: {', '.join(str(r['seed']) for r in runs)})"
    cells = [_cell([100 * run["training"]["natural_accuracy"] for run in runs]),
             _cell([100 * run["training"]["robust_accuracy"] for run in runs])]
    for name in columns:
      values = [100 * run["results"][name]["accuracy"] for run in runs
                if "accuracy" in run["results"].get(name, {})]
      cells.append(_cell(values))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--defenses", default="none,cas,fsr")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--protocol", default="full")
  p.add_argument("--num_examples", type=int, default=120)
  p.add_argument("--batch_size", type=int, default=120)
  p.add_argument("--workdir", default="workdirs/seeds")
  p.add_argument("--json", help="also write every run's eval.json results here")
  p.add_argument("--only_finished", action="store_true",
                 help="tabulate the finished runs only; start none")
  a = p.parse_args()
  root = Path(a.workdir).resolve()
  reports: dict[str, list[dict]] = {}
  for defense in a.defenses.split(","):
    for seed in (int(s) for s in a.seeds.split(",")):
      report = run_one(root / f"{defense}_s{seed}", defense, seed, a.protocol,
                       a.num_examples, a.batch_size, only_finished=a.only_finished)
      if report is not None:
        report["seed"] = seed
        reports.setdefault(defense, []).append(report)
  print(f"\n{a.num_examples} test points, protocol {a.protocol}, seeds {a.seeds}; "
        "accuracy (%), mean ± sample std over the seeds\n")
  print(table(reports))
  if a.json:
    Path(a.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
  main()
