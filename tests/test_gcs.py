"""gs:// workdirs against a real Cloud Storage API on loopback (fake-gcs-server, started by
the `gcs_bucket` fixture, tests/conftest.py): a training killed and resumed, its evaluation,
audit and analysis, ending as the same run on a local disk, with a clean console."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
from etils import epath

from jaxdefense.evaluation import evaluate
from jaxdefense.training import train
from tests.helpers import ROOT, TINY, run_main, saved_state, tiny_config

# Config overrides on top of TINY. Training saves at every step and keeps two (and the best),
# so that steps of the killed run and of the resumed one are deleted: retention on a bucket.
RETENTION = {"train.checkpoint_every_steps": 1, "train.keep_checkpoints": 2}
EVAL = {"eval.num_examples": 8, "eval.batch_size": 8, "eval.attacks": ("pgd20",)}
AUDIT = {**EVAL, **{f"eval.autoattack_options.{a}.steps": 3
                    for a in ("apgd_ce", "apgd_t", "fab_t")},
         "eval.autoattack_options.square.queries": 20, "audit.attack": "pgd20",
         "audit.iterations": (1, 2), "audit.restarts": (1, 2), "audit.eps_factors": (1.0, 2.0),
         "audit.curve_steps": 2}
# What a run may print on stderr: tqdm's bars, and TensorStore's note that it uses the test
# token (tests/storage_server.py; a real run has credentials instead).
_EXPECTED = re.compile(r"^\s*$|\|.*\[\d\d:\d\d<|Using GOOGLE_AUTH_TOKEN_FOR_TESTING")


def _objects(prefix: str) -> list[str]:
  """The object names under the gs:// `prefix`, relative to it, as the server lists them."""
  fs = fsspec.filesystem("gs", skip_instance_cache=True)
  root = prefix.removeprefix("gs://")
  return sorted(p.removeprefix(root + "/") for p in fs.find(root))


def _noise(stderr: str) -> list[str]:
  return [line for line in re.split(r"[\r\n]", stderr) if not _EXPECTED.search(line)]


def _without_times(report):
  """A JSON report without its durations (`*_s`: seconds), which no two runs share."""
  if isinstance(report, dict):
    return {k: _without_times(v) for k, v in report.items() if not k.endswith("_s")}
  if isinstance(report, list):
    return [_without_times(v) for v in report]
  return report


def _flags(overrides: dict) -> list[str]:
  """The overrides as main.py's --config.* flags."""
  return [f"--config.{k}=" + (f"({','.join(map(repr, v))},)" if isinstance(v, tuple) else str(v))
          for k, v in overrides.items()]


def _config(overrides: dict):
  """tiny_config (= TINY) with the overrides."""
  config = tiny_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def test_a_run_killed_resumed_and_evaluated_in_a_bucket_equals_a_local_run(gcs_bucket,
                                                                            tmp_path):
  """main.py on --workdir=gs://BUCKET/run, a prefix with nothing under it: SIGKILLed once its
  second checkpoint is in the bucket, rerun to the end, then --mode=eval, audit and analyze.
  The final train state, the steps kept (keep_checkpoints=2), metrics.jsonl, results.json
  and eval.json equal those of the same run and evaluation on a local disk (durations
  aside); TensorBoard events, the audit's and the analysis' reports and plots are in the
  bucket, and nothing else (no temporaries, write probe, lease or progress records); every
  run's stderr holds nothing but progress bars."""
  run = f"{gcs_bucket}/run"
  killed = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/quickstart.py",
       f"--workdir={run}", *TINY, *_flags(RETENTION)], cwd=ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while "checkpoints/2/commit_success.txt" not in _objects(run):
    assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1]
    time.sleep(0.1)
  killed.kill()
  assert not _noise(killed.communicate()[1]) and killed.returncode == -signal.SIGKILL
  assert "results.json" not in _objects(run)

  resumed = run_main(run, *TINY, *_flags(RETENTION))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(rf"resumed from step [2-5] in {run}\b", resumed.stdout), resumed.stdout
  evaluated = run_main(run, *TINY, "--mode=eval", "--checkpoint=last", *_flags(EVAL))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  audited = run_main(run, *TINY, "--mode=audit", "--checkpoint=last", *_flags(AUDIT))
  assert audited.returncode == 0, audited.stderr[-3000:]
  analyzed = run_main(run, *TINY, "--mode=analyze", "--checkpoint=last")
  assert analyzed.returncode == 0, analyzed.stderr[-3000:]
  for done in (resumed, evaluated, audited, analyzed):
    assert not _noise(done.stderr), (done.args, _noise(done.stderr))

  local = tmp_path / "local"
  train.train_and_evaluate(_config(RETENTION), local)
  evaluate.run(_config(EVAL), local, which="latest")

  objects = _objects(run)
  steps = sorted({int(name.split("/")[1]) for name in objects if name.startswith("checkpoints/")})
  assert steps == sorted(int(s) for s in os.listdir(local / "checkpoints"))
  outside = {name for name in objects if not name.startswith(("checkpoints/", "tensorboard/"))}
  assert outside == {"config.json", "metrics.jsonl", "results.json", "eval.json", "eval.md",
                     "audit.json", "audit.md", "audit_curves.png", "analysis.json",
                     "analysis_layer2.0.png", "analysis_frequency_layer2.0.png"}, outside
  assert [name for name in objects if name.startswith("tensorboard/events.out.tfevents.")]
  bucket = epath.Path(run)
  rows = lambda text: [_without_times(json.loads(r)) for r in text.splitlines()]
  assert rows((bucket / "metrics.jsonl").read_text()) == rows((local / "metrics.jsonl").read_text())
  for report in ("results.json", "eval.json"):
    got, expected = (_without_times(json.loads(p.read_text()))
                     for p in (bucket / report, local / report))
    assert got == expected, report
  report = json.loads((bucket / "audit.json").read_text())
  assert report["step"] == steps[-1] and report["points"] == EVAL["eval.num_examples"]
  natural = json.loads((local / "eval.json").read_text())["results"]["natural"]
  assert _without_times(report["natural"]) == _without_times(natural)
  a, b = (saved_state(d / "checkpoints", steps[-1]) for d in (bucket, local))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
