"""`python -m jaxdefense.report`: grouping from configs, mean and standard deviation,
McNemar's exact test and its interval against independent derivations, incomparable runs
refused, the LaTeX table, the plots, and the command line end to end."""
import csv
import fractions
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from jaxdefense.report import figures, runs, significance, summary, tables
from tests.helpers import ROOT
from tests.report_workdirs import PGD20, flags, write_run

DEFENSES, OBJECTIVES, SEEDS = ("none", "cas"), ("pgd_at", "trades"), (0, 1, 2)


def _report(tmp_path, paths, baseline=None):
  read = [runs.read(p) for p in paths]
  found = [r for r in read if isinstance(r, runs.Run)]
  return summary.build(found, [r for r in read if isinstance(r, runs.LeftOut)], baseline)


@pytest.fixture
def grid(tmp_path):
  """2 defenses x 2 objectives x 3 seeds; CAS more robust; the log interval differs too."""
  rng = np.random.default_rng(0)
  paths = []
  for defense in DEFENSES:
    for objective in OBJECTIVES:
      for seed in SEEDS:
        robust = {"natural": flags(rng, 0.9),
                  "pgd20": flags(rng, 0.8 if defense == "cas" else 0.5)}
        paths.append(write_run(
            tmp_path / f"{defense}_{objective}_{seed}", robust=robust, seed=seed,
            config={"defense.name": defense, "objective.name": objective,
                    "train.log_every_steps": 2 + seed}))
  return paths


def test_groups_from_the_configs_seeds_as_replicates(tmp_path, grid):
  """Two fields differ: four groups of three seeds, named by the fields' short names; a
  bookkeeping field that differs (the log interval) does not split them."""
  report = _report(tmp_path, grid[::-1])  # Order of the arguments does not matter.
  assert report.fields == ["defense.name", "objective.name"]
  [section] = report.sections
  labels = sorted(row.group.label for row in section.rows)
  assert labels == sorted(f"defense={d}, objective={o}" for d in DEFENSES for o in OBJECTIVES)
  assert all(row.group.seeds == [0, 1, 2] for row in section.rows)
  assert not report.left_out


def test_mean_and_sample_std_against_numpy(tmp_path, grid):
  report = _report(tmp_path, grid)
  for row in report.sections[0].rows:
    for column in ("natural", "pgd20", "training_natural"):
      values = []
      for run in row.group.runs:
        e = json.load(open(os.path.join(run.workdir, "eval.json")))["results"]
        values.append(e["natural" if column == "training_natural" else column]["accuracy"])
      cell = row.cells[column]
      assert cell.mean == pytest.approx(np.mean(values))
      assert cell.std == pytest.approx(np.std(values, ddof=1))
      assert summary.mean_std(cell) == (f"{100 * np.mean(values):.2f} ± "
                                        f"{100 * np.std(values, ddof=1):.2f}")
  one = summary.Cell((0.5,))
  assert (one.mean, one.std, summary.mean_std(one)) == (0.5, None, "50.00")
  assert summary.mean_std(summary.Cell((None, None))) == "n/a"


DISCORDANT = [(0, 0), (8, 0), (0, 8), (1, 0), (5, 5), (30, 12), (12, 30), (3, 17),
              (400, 350), (1000, 1101)]


@pytest.mark.parametrize("better,worse", DISCORDANT)
def test_mcnemar_and_interval_against_scipy_binomial_test(better, worse):
  """The exact McNemar p-value is SciPy's two-sided binomial test of the discordant pairs
  at 1/2; the interval is its exact (Clopper-Pearson) interval of b / m mapped to the
  difference; the all-agree case is p = 1 with an empty interval at 0."""
  m, n = better + worse, 2000
  p = significance.mcnemar_exact(better, worse)
  low, high = significance.difference_interval(better, worse, n, 0.95)
  if m == 0:
    assert (p, low, high) == (1.0, 0.0, 0.0)
    return
  test = stats.binomtest(better, m, 0.5)
  assert p == pytest.approx(test.pvalue, rel=1e-9, abs=1e-300)
  ci = test.proportion_ci(confidence_level=0.95, method="exact")
  assert low == pytest.approx(m / n * (2 * ci.low - 1), abs=1e-9)
  assert high == pytest.approx(m / n * (2 * ci.high - 1), abs=1e-9)
  assert low <= (better - worse) / n <= high


def _tail(k: int, m: int, pi: float, upper: bool) -> float:
  """P[X >= k] (upper) or P[X <= k], X ~ Binomial(m, pi), summed term by term."""
  ks = range(k, m + 1) if upper else range(0, k + 1)
  return sum(math.comb(m, j) * pi ** j * (1 - pi) ** (m - j) for j in ks)


@pytest.mark.parametrize("better,worse", [(8, 0), (0, 3), (7, 2), (10, 10), (2, 13)])
def test_mcnemar_and_interval_from_their_definitions(better, worse):
  """By hand: p = 2 P[X <= min(b, c)] in exact rationals (one-sided cases included); the
  interval's ends are where the binomial tails equal alpha / 2."""
  m = better + worse
  tail = sum(fractions.Fraction(math.comb(m, j), 2 ** m) for j in range(min(better, worse) + 1))
  assert significance.mcnemar_exact(better, worse) == pytest.approx(float(min(1, 2 * tail)))
  low, high = significance.difference_interval(better, worse, m, 0.9)
  pi_low, pi_high = (low + 1) / 2, (high + 1) / 2
  if better > 0:
    assert _tail(better, m, pi_low, upper=True) == pytest.approx(0.05, rel=1e-6)
  if better < m:
    assert _tail(better, m, pi_high, upper=False) == pytest.approx(0.05, rel=1e-6)


def test_interval_excludes_zero_exactly_when_p_is_below_alpha():
  for better in range(0, 25):
    for worse in range(0, 25):
      low, high = significance.difference_interval(better, worse, 100, 0.95)
      excludes = low > 0 or high < 0
      assert excludes == (significance.mcnemar_exact(better, worse) < 0.05), (better, worse)


def test_compare_pools_seed_pairs():
  """Outcomes built to hold b = 7 and c = 2 over two seed pairs: the pooled comparison's
  counts, difference (= the accuracies' difference) and p."""
  model = [np.array([1, 1, 1, 1, 0, 0, 1, 1], bool), np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)]
  base = [np.array([0, 0, 0, 1, 1, 0, 1, 1], bool), np.array([0, 0, 1, 0, 0, 0, 1, 0], bool)]
  c = significance.compare(model, base)
  assert (c.pairs, c.better, c.worse) == (16, 7, 2)
  assert c.difference == pytest.approx(np.mean(np.concatenate(model))
                                       - np.mean(np.concatenate(base)))
  assert c.p_value == pytest.approx(stats.binomtest(7, 9).pvalue)
  with pytest.raises(ValueError, match="as many model runs as baseline runs"):
    significance.compare(model, base[:1])


def test_paired_comparison_with_the_baseline(tmp_path, grid):
  """--baseline=defense=none: each CAS group is compared with the undefended group of the
  same objective, seed with seed, on each column; the figures are those of `compare`."""
  report = _report(tmp_path, grid, "defense=none")
  rows = {row.group.label: row for row in report.sections[0].rows}
  for objective in OBJECTIVES:
    row, base = rows[f"defense=cas, objective={objective}"], rows[f"defense=none, "
                                                                  f"objective={objective}"]
    assert row.baseline is base.group and not base.comparisons
    expected = significance.compare([r.robust["pgd20"] for r in row.group.runs],
                                    [r.robust["pgd20"] for r in base.group.runs])
    assert row.comparisons["pgd20"] == expected
    assert expected.difference > 0 and expected.p_value < 0.05
  text = tables.markdown(report)
  assert "Worst case vs defense=none" in text and "| defense=none, objective=pgd_at |" in text
  assert "seed pairs 0-0, 1-1, 2-2" in text
  cas = rows["defense=cas, objective=trades"].comparisons["worst_case"]
  assert summary.summary_line(cas) in text


def test_incomparable_runs_are_never_compared(tmp_path):
  """Another eps is another section (its baseline there is named, not compared); other
  attack settings within a section, and a second run of a seed, are left out; an old
  eval.json without outcomes is tabled but not compared."""
  rng = np.random.default_rng(1)
  make = lambda name, **kw: write_run(
      tmp_path / name, robust={"natural": flags(rng, 0.9), "pgd20": flags(rng, 0.6)}, **kw)
  cas = {"defense.name": "cas"}
  paths = [make("none_0"), make("none_1", seed=1), make("cas_0", config=cas),
           make("cas_1", config=cas, seed=1),
           make("cas_eps", config=cas, eps=0.2),
           make("cas_steps", config=cas, seed=2, attack={**PGD20, "steps": 10}),
           make("cas_twin", config=cas)]
  report = _report(tmp_path, paths, "defense=none")
  reasons = {os.path.basename(item.workdir): item.reason for item in report.left_out}
  assert reasons["cas_steps"].startswith("evaluated with other attack settings")
  assert "steps 10 (not 20)" in reasons["cas_steps"]
  assert reasons["cas_twin"].startswith("the same experiment and seed (0) as")
  [main, other] = sorted(report.sections, key=lambda s: s.section.evaluation.eps)
  [row] = [r for r in other.rows]
  assert re.match(r"its baseline \(defense=none\) was evaluated differently \(eps 0.2 vs "
                  r"0.1\): not compared", row.comparisons["pgd20"])
  assert report.not_compared == [f"defense=cas ({paths[4]}): {row.comparisons['pgd20']}"]
  old = [make("old_none", outcomes=False), make("old_cas", config=cas, outcomes=False)]
  report = _report(tmp_path, old, "defense=none")
  [row] = [r for r in report.sections[0].rows if r.group.label == "defense=cas"]
  assert row.comparisons["pgd20"] == summary.NO_OUTCOMES
  assert report.not_compared == [f"defense=cas ({old[1]}): {summary.NO_OUTCOMES}"]
  assert summary.mean_std(row.cells["pgd20"]) != "n/a"


def test_latex_table_is_well_formed(tmp_path, grid):
  """Balanced braces, matching begin/end, one row per group, special characters escaped."""
  text = tables.latex(_report(tmp_path, grid, "defense=none"))
  depth = 0
  for ch in text.replace(r"\{", "").replace(r"\}", ""):
    depth += {"{": 1, "}": -1}.get(ch, 0)
    assert depth >= 0
  assert depth == 0
  assert re.findall(r"\\begin\{(\w+)\}", text) == ["table", "tabular"]
  assert re.findall(r"\\end\{(\w+)\}", text) == ["tabular", "table"]
  body = text.split(r"\hline")[2]
  rows = [line for line in body.splitlines() if line.endswith(r"\\")]
  assert len(rows) == 4 and all(line.count("&") == rows[0].count("&") for line in rows)
  assert r"objective=pgd\_at" in text and "pgd_at" not in text.replace(r"\_", "")
  assert r"$\pm$" in text and "±" not in text


def test_csv_holds_every_number(tmp_path, grid):
  report = _report(tmp_path, grid, "defense=none")
  rows = list(csv.DictReader(io.StringIO(tables.csv_text(report))))
  assert len(rows) == 4 * 5  # Groups x (two training columns, natural, PGD-20, worst case).
  row = next(r for r in rows if r["group"] == "defense=cas, objective=pgd_at"
             and r["column"] == "pgd20")
  [section] = report.sections
  [cell] = [g for g in section.rows if g.group.label == row["group"]]
  assert float(row["mean"]) == pytest.approx(cell.cells["pgd20"].mean)
  assert float(row["p_value"]) == pytest.approx(cell.comparisons["pgd20"].p_value)
  assert row["baseline"] == "defense=none, objective=pgd_at"


def test_robust_accuracy_plot_draws_every_run(tmp_path, grid):
  """A dot per run and column at its accuracy, a bar per group and column at the mean."""
  [s] = _report(tmp_path, grid).sections
  [ax] = figures.robust_accuracy(s).axes
  dots = sorted(y for line in ax.lines if line.get_marker() == "o" for y in line.get_ydata())
  columns = [c for c in s.titles if c not in summary.TRAINING_COLUMNS]
  assert dots == pytest.approx(sorted(100 * v for row in s.rows for c in columns
                                      for v in row.cells[c].present))
  bars = sorted(p.get_height() for p in ax.patches)
  assert bars == pytest.approx(sorted(100 * row.cells[c].mean for row in s.rows
                                      for c in columns))


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "jaxdefense.report", *map(str, args)],
                        capture_output=True, text=True, cwd=cwd, timeout=120)


def test_command_line_writes_the_report_and_says_what_it_left_out(tmp_path, grid):
  """End to end: a pattern of workdirs, one without an evaluation, one with an unreadable
  eval.json, one missing: each one line naming it; the rest reported in md, csv, tex and
  both plots, the audit's verdicts beside the numbers they qualify."""
  rng = np.random.default_rng(2)
  audited = write_run(tmp_path / "runs" / "cas_audit", config={"defense.name": "fsr"},
                      robust={"natural": flags(rng, 0.9), "pgd20": flags(rng, 0.7)},
                      audit={"attack": {"name": "pgd20"}, "indicators": {"silent_success": {
                          "title": "Silent success", "value": 0.05, "threshold": 0.0,
                          "triggered": True}}, "curves": {}, "autoattack": {"checks": []}},
                      curves=[{"step": 3, "epoch": 1, "eval/natural_accuracy": 0.5,
                               "eval/pgd_accuracy": 0.3},
                              {"step": 6, "epoch": 2, "eval/natural_accuracy": 0.8,
                               "eval/pgd_accuracy": 0.4}, "{cut"])
  os.makedirs(tmp_path / "runs" / "untrained")
  broken = write_run(tmp_path / "runs" / "broken", robust={"natural": flags(rng, 0.9),
                                                           "pgd20": flags(rng, 0.5)})
  (tmp_path / "runs" / "broken" / "eval.json").write_text("{not json")
  noeval = write_run(tmp_path / "runs" / "noeval", robust={"natural": flags(rng, 0.9),
                                                           "pgd20": flags(rng, 0.5)})
  os.remove(os.path.join(noeval, "eval.json"))
  partial = write_run(tmp_path / "runs" / "partial", robust={"natural": flags(rng, 0.9),
                                                             "pgd20": flags(rng, 0.5)})
  with open(os.path.join(partial, "eval.json"), "w") as f:
    json.dump({"results": {"natural": {"accuracy": 1.0}}, "eps": 0.1, "norm": "linf",
               "protocol": "full", "checkpoint": "best", "data": "digits"}, f)
  out = tmp_path / "report"
  result = _main(*grid, tmp_path / "runs" / "*", tmp_path / "missing",
                 "--baseline=defense=none", f"--output={out}")
  assert result.returncode == 0, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("left out: ")]
  expected = {os.path.join(tmp_path, "runs", "untrained"): "no readable config.json",
              broken: "eval.json is unreadable (JSONDecodeError",
              noeval: "no evaluation (eval.json)", str(tmp_path / "missing"): "no such directory",
              partial: "eval.json lacks results per column (natural's num_points, each "
                       "column's title): not written by `main.py --mode=eval`"}
  assert len(lines) == 5
  for workdir, reason in expected.items():
    assert any(l.startswith(f"left out: {workdir}: {reason}") for l in lines), (workdir, lines)
  assert sorted(os.listdir(out)) == ["report.csv", "report.md", "report.tex",
                                     "robust_accuracy.png", "training_curves.png"]
  for png in ("robust_accuracy.png", "training_curves.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (out / "report.md").read_text()
  assert "## Left out" in md and all(w in md for w in expected)
  assert f"read in part: {audited}: metrics.jsonl: 1 line(s) that do not parse" in md
  fsr = next(l for l in md.splitlines() if l.startswith("| defense=fsr, objective=pgd_at |"))
  assert "† |" in fsr and "signs in 1 of 1 audited" in fsr
  assert "PGD-20: seed 0: audit: Silent success triggered (0.0500 > 0)" in md
  assert md in result.stdout


def test_workdirs_and_report_in_a_bucket(tmp_path, grid, gcs_bucket):
  """Runs in a bucket (the storage server the tests start), named by a quoted pattern; the
  report written to the bucket equals the one written from local copies to a local disk,
  but for the workdirs' names."""
  from etils import epath
  for local in grid:
    for name in os.listdir(local):
      epath.Path(f"{gcs_bucket}/runs/{os.path.basename(local)}/{name}").write_bytes(
          open(os.path.join(local, name), "rb").read())
  baseline = "--baseline=defense=none,objective=pgd_at"  # As docs/report.md shows it.
  result = _main(f"{gcs_bucket}/runs/*", baseline, f"--output={gcs_bucket}/report")
  assert result.returncode == 0, result.stderr
  assert _main(*grid, baseline, f"--output={tmp_path}/report").returncode == 0
  remote = epath.Path(f"{gcs_bucket}/report/report.md").read_text()
  local = (tmp_path / "report" / "report.md").read_text()
  assert remote.replace(f"{gcs_bucket}/runs/", "") == local.replace(f"{tmp_path}/", "")
  # Both fields named: the one baseline group is every other group's.
  rows = list(csv.DictReader(io.StringIO(
      epath.Path(f"{gcs_bucket}/report/report.csv").read_text())))
  assert {r["group"]: r["baseline"] for r in rows if r["column"] == "pgd20"} == {
      "defense=none, objective=pgd_at": "",
      "defense=none, objective=trades": "defense=none, objective=pgd_at",
      "defense=cas, objective=pgd_at": "defense=none, objective=pgd_at",
      "defense=cas, objective=trades": "defense=none, objective=pgd_at"}
  assert sorted(p.name for p in epath.Path(f"{gcs_bucket}/report").iterdir()) == [
      "report.csv", "report.md", "report.tex", "robust_accuracy.png"]


BAD = [
    ([], "Flag --output must have a value other than None"),
    (["--baseline=defense"], "--baseline=defense: expected FIELD=VALUE"),
    (["--baseline=defense=none", "--confidence=1.5"], "--confidence=1.5: must be in (0, 1)"),
]


@pytest.mark.parametrize("flags_,message", BAD)
def test_bad_flags_are_one_line_before_any_work(tmp_path, grid, flags_, message):
  output = [f"--output={tmp_path / 'out'}"] if flags_ else []
  result = _main(*grid[:2], *flags_, *output)
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("error: ") and message in line, line
  assert not (tmp_path / "out" / "report.md").exists()


def test_confidence_flag_sets_the_intervals_level(tmp_path, grid):
  out = tmp_path / "out"
  assert _main(*grid, "--baseline=defense=none", "--confidence=0.9",
               f"--output={out}").returncode == 0
  rows = list(csv.DictReader(open(out / "report.csv")))
  row = next(r for r in rows if r["column"] == "pgd20" and r["difference"])
  low, high = significance.difference_interval(int(row["better"]), int(row["worse"]),
                                               int(row["point_pairs"]), 0.9)
  assert (float(row["interval_low"]), float(row["interval_high"])) == pytest.approx((low, high))
  assert "90% interval" in (out / "report.md").read_text()


def test_baseline_matching_no_run_still_writes_the_report(tmp_path, grid):
  out = tmp_path / "out"
  result = _main(*grid, "--baseline=defense=fsr", f"--output={out}")
  assert result.returncode == 0
  assert result.stderr.strip() == ("no comparison: --baseline: no run has defense=fsr (its "
                                   "values: cas, none)")
  assert "No paired comparison: --baseline: no run has defense=fsr" in (out / "report.md"
                                                                         ).read_text()
  result = _main(f"--output={out}")
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: no WORKDIR given; usage: python -m "
                                   "jaxdefense.report WORKDIR... --output=DIR "
                                   "[--baseline=FIELD=VALUE]")
  result = _main(tmp_path / "nothing", f"--output={out}")
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f"left out: {tmp_path / 'nothing'}: no such directory",
      "error: no workdir could be reported (each is listed above)"]


def test_trained_and_evaluated_runs_through_main_py(tmp_path):
  """Real runs: the tiny quick start, none and CAS, two seeds each, trained and evaluated by
  main.py's code; the report's per-run accuracies are eval.json's and the paired test uses
  the outcomes the evaluation recorded (one section: the same points)."""
  from jaxdefense.evaluation import evaluate
  from jaxdefense.training import train
  from tests.helpers import override, tiny_config
  workdirs = []
  for defense in ("none", "cas"):
    for seed in (0, 1):
      config = override(tiny_config(defense), {"seed": seed, "train.epochs": 1,
                                               "eval.attacks": ("fgsm",), "eval.seed": seed})
      workdir = tmp_path / f"{defense}_s{seed}"
      train.train_and_evaluate(config, workdir)
      evaluate.run(config, workdir, which="latest")
      workdirs.append(workdir)
  out = tmp_path / "report"
  result = _main(*workdirs, "--baseline=defense=none", f"--output={out}")
  assert result.returncode == 0, result.stderr
  rows = list(csv.DictReader(open(out / "report.csv")))
  cas = {r["column"]: r for r in rows if r["group"] == "defense=cas"}
  accuracies = [json.load(open(w / "eval.json"))["results"]["fgsm"]["accuracy"]
                for w in workdirs[2:]]
  assert float(cas["fgsm"]["mean"]) == pytest.approx(np.mean(accuracies))
  pairs = [[evaluate.robust_points(json.load(open(w / "eval.json")))["fgsm"]
            for w in ws] for ws in (workdirs[2:], workdirs[:2])]
  assert float(cas["fgsm"]["p_value"]) == pytest.approx(
      significance.compare(*pairs).p_value)
  assert int(cas["fgsm"]["point_pairs"]) == 2 * 48


def test_digits_seeds_tables_its_runs_through_the_report(tmp_path):
  """benchmarks/digits_seeds.py --only_finished on finished runs: the report's files in
  WORKDIR/report and its main table printed, CAS compared with the undefended runs."""
  rng = np.random.default_rng(3)
  for defense in ("none", "cas"):
    for seed in (0, 1):
      write_run(tmp_path / f"{defense}_s{seed}", seed=seed, config={"defense.name": defense},
                robust={"natural": flags(rng, 0.9), "pgd20": flags(rng, 0.5)})
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "digits_seeds.py"), "--only_finished",
       "--defenses=none,cas,fsr", "--seeds=0,1", "--num_examples=40",
       f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  report = (tmp_path / "report" / "report.md").read_text()
  table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
  assert len(table) == 3 and table[0].startswith("| group | seeds |")
  assert "Worst case vs defense=none" in table[0]
  assert all(line in report for line in table)
  assert table[2].startswith("| defense=cas | 0, 1 |") and "p = " in table[2]
