"""gs:// workdirs against a real Cloud Storage API on loopback (fake-gcs-server, started by
the `gcs_bucket` fixture, tests/conftest.py): a training killed and resumed on another host,
its evaluation, audit and analysis, ending as the same run on a local disk, with a clean
console."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import fsspec
import numpy as np
import pytest
import requests
import tensorstore
from etils import epath
from google.api_core import exceptions

from jaxdefense import errors
from jaxdefense.evaluation import evaluate
from jaxdefense.training import train
from jaxdefense.workdir import lock
from tests import latency_proxy, storage_server
from tests.helpers import (ROOT, TINY, TINY_OVERRIDES, override, run_main, saved_state,
                           tiny_config)

# Config overrides on top of TINY. Training saves at every step and keeps two (and the best),
# so that steps of the killed run and of the resumed one are deleted: retention on a bucket.
RETENTION = {"train.checkpoint_every_steps": 1, "train.keep_checkpoints": 2}
# The bucket's training also holds its lease for a second only unrenewed, so that a rerun on
# another host takes over the lease of the killed one at once.
LEASE = {"train.lease_timeout_s": 1}
EVAL = {"eval.num_examples": 8, "eval.batch_size": 8, "eval.attacks": ("pgd20",)}
AUDIT = {**EVAL, **{f"eval.autoattack_options.{a}.steps": 3
                    for a in ("apgd_ce", "apgd_t", "fab_t")},
         "eval.autoattack_options.square.queries": 20, "audit.attack": "pgd20",
         "audit.iterations": (1, 2), "audit.restarts": (1, 2), "audit.eps_factors": (1.0, 2.0),
         "audit.curve_steps": 2}
# What a run may print on stderr: tqdm's bars, and TensorStore's note that it uses the test
# token (tests/storage_server.py; a real run has credentials instead).
_EXPECTED = re.compile(r"^\s*$|\|.*\[\d\d:\d\d<|Using GOOGLE_AUTH_TOKEN_FOR_TESTING")
# Cloud Storage's reasons, which the proxy answers with, for refusing an anonymous caller
# (gcsfs sends no credentials where it finds none) and an account that may only read.
ANONYMOUS = ("Anonymous caller does not have storage.objects.get access to the Google Cloud "
             "Storage object. Permission 'storage.objects.get' denied on resource (or it may "
             "not exist).")
READER = ("runner@project.iam.gserviceaccount.com does not have storage.objects.create access "
          "to the Google Cloud Storage object. Permission 'storage.objects.create' denied on "
          "resource (or it may not exist).")
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# `python -c _AS_HOST HOST main.py FLAGS...`: main.py where socket.gethostname() is HOST, as
# on a VM, pod or SLURM node that a killed run is requeued on.
_AS_HOST = ("import runpy, socket, sys; _, host, *sys.argv = sys.argv; "
            "socket.gethostname = lambda: host; runpy.run_path(sys.argv[0], run_name='__main__')")


def _run_main_on(host: str, workdir: str, *flags: str) -> subprocess.CompletedProcess:
  """helpers.run_main on a machine named `host`."""
  return subprocess.run([sys.executable, "-c", _AS_HOST, host, os.path.join(ROOT, "main.py"),
                         "--config=configs/quickstart.py", f"--workdir={workdir}", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


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


def test_a_run_killed_resumed_and_evaluated_in_a_bucket_equals_a_local_run(gcs_bucket,
                                                                            tmp_path):
  """main.py on --workdir=gs://BUCKET/run, a prefix with nothing under it: SIGKILLed once its
  second checkpoint is in the bucket, rerun to the end on another host (which takes over the
  killed run's expired lease, saying so in one line), then --mode=eval, audit and analyze.
  The final train state, the steps kept (keep_checkpoints=2), metrics.jsonl, results.json
  and eval.json equal those of the same run and evaluation on a local disk (durations
  aside); TensorBoard events, the audit's and the analysis' reports and plots are in the
  bucket, and nothing else (no temporaries, write probe, lease or progress records); every
  run's stderr holds nothing but progress bars."""
  run = f"{gcs_bucket}/run"
  killed = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/quickstart.py",
       f"--workdir={run}", *TINY, *_flags({**RETENTION, **LEASE})], cwd=ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while "checkpoints/2/commit_success.txt" not in _objects(run):
    assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1]
    time.sleep(0.1)
  killed.kill()
  assert not _noise(killed.communicate()[1]) and killed.returncode == -signal.SIGKILL
  assert "results.json" not in _objects(run)

  resumed = _run_main_on("host-b", run, *TINY, *_flags({**RETENTION, **LEASE}))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  taken = [line for line in resumed.stdout.splitlines() if line.startswith("taking over")]
  assert len(taken) == 1 and re.fullmatch(
      rf"taking over {run}/lock.json: the lease of process {killed.pid} on host "
      rf"{re.escape(socket.gethostname())} \(started \S+\) was last renewed [\d.]+ s ago "
      r"\(timeout 1 s\)", taken[0]), resumed.stdout
  resumed_at = re.search(rf"resumed from step ([2-5]) in {run}\b", resumed.stdout)
  assert resumed_at, resumed.stdout
  evaluated = run_main(run, *TINY, "--mode=eval", "--checkpoint=last", *_flags(EVAL))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  audited = run_main(run, *TINY, "--mode=audit", "--checkpoint=last", *_flags(AUDIT))
  assert audited.returncode == 0, audited.stderr[-3000:]
  analyzed = run_main(run, *TINY, "--mode=analyze", "--checkpoint=last")
  assert analyzed.returncode == 0, analyzed.stderr[-3000:]
  for done in (resumed, evaluated, audited, analyzed):
    assert not _noise(done.stderr), (done.args, _noise(done.stderr))

  local = tmp_path / "local"
  train.train_and_evaluate(override(tiny_config(), RETENTION), local)
  evaluate.run(override(tiny_config(), EVAL), local, which="latest")

  objects = _objects(run)
  steps = sorted({int(name.split("/")[1]) for name in objects if name.startswith("checkpoints/")})
  assert steps == sorted(int(s) for s in os.listdir(local / "checkpoints"))
  outside = {name for name in objects if not name.startswith(("checkpoints/", "tensorboard/"))}
  assert outside == {"config.json", "metrics.jsonl", "results.json", "eval.json", "eval.md",
                     "audit.json", "audit.md", "audit_curves.png", "analysis.json",
                     "analysis_layer2.0.png", "analysis_frequency_layer2.0.png"}, outside
  assert [name for name in objects if name.startswith("tensorboard/events.out.tfevents.")]
  bucket = epath.Path(run)
  # A run resumed between two log steps logs, at the next one, the mean of fewer steps than
  # the uninterrupted run: that training row alone may differ (the kill lands after step 2
  # is committed, most often before step 3 is).
  log_every, start = TINY_OVERRIDES["train.log_every_steps"], int(resumed_at.group(1))
  partial = -(-start // log_every) * log_every if start % log_every else None
  rows = lambda text: [_without_times(row) for row in map(json.loads, text.splitlines())
                       if not (row["step"] == partial and "train/loss" in row)]
  assert rows((bucket / "metrics.jsonl").read_text()) == rows(
      (local / "metrics.jsonl").read_text())
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


def test_a_bucket_refusing_the_run_stops_it_before_training_in_one_line(storage_server_url,
                                                                         gcs_bucket,
                                                                         monkeypatch):
  """Behind the proxy, answering every request 401 (no valid credentials), then every write
  403 (no permission to write): main.py stops before training with one line naming the
  workdir, why and what to do, exit 6, and writes nothing. The lease's client
  (google-cloud-storage) and the arrays' (TensorStore) refused become the same line."""
  run = f"{gcs_bucket}/run"
  todo = {401: "run `gcloud auth application-default login` (or point "
               "GOOGLE_APPLICATION_CREDENTIALS at a service account's key), or give the VM a "
               "service account, and rerun the same command",
          403: "grant the account the run uses Storage Object Admin (roles/storage.objectAdmin) "
               "on the bucket, or use another --workdir, and rerun the same command"}
  refused = {401: f"Cloud Storage refused the run's credentials for {run} (",
             403: f"Cloud Storage denied the run access to {run} ("}
  with latency_proxy.running(int(storage_server_url.rsplit(":", 1)[1])) as (proxy, url):
    for status, why, methods in ((401, ANONYMOUS, None), (403, READER, WRITES)):
      proxy.answer, proxy.answer_methods = (status, why), methods
      done = run_main(run, *TINY, env=storage_server.environment(url))
      assert done.returncode == 6 and "config:" not in done.stdout, done.stderr[-3000:]
      assert _noise(done.stderr) == [f"error: {refused[status]}HTTP {status}: {why}): "
                                     f"{todo[status]}"], done.stderr[-3000:]
      with monkeypatch.context() as patch:
        for name, value in storage_server.environment(url).items():
          patch.setenv(name, value)
        for client in (lambda: lock._Bucket(epath.Path(run) / lock.LEASE).swap(None, b"{}"),
                       lambda: tensorstore.open({"driver": "zarr", "kvstore": f"{run}/array",
                                                 "metadata": {"shape": [2], "dtype": "<f4"}},
                                                create=True).result()):
          with pytest.raises(Exception) as raised:
            client()
          fault = str(errors.as_run_error(raised.value, run))
          assert fault.startswith(refused[status]) and fault.endswith(todo[status]), fault
  assert not _objects(run)


def test_connections_dropped_during_checkpoint_saves_lose_nothing(storage_server_url,
                                                                  gcs_bucket, tmp_path):
  """main.py behind the proxy, saving at every step: the connections dropped for 2 s once
  step 1's arrays start going up (every client retries: the run goes on), and again, for
  good, once step 3's do: the run, hung in its retries, is killed with step 3 half-written
  in the bucket (no commit_success.txt). The same command rerun with the connection back
  resumes from step 2, ignoring step 3's remains, and ends as the same run uninterrupted on a
  local disk; every step in the bucket then is whole."""
  run, overrides = f"{gcs_bucket}/run", {"train.checkpoint_every_steps": 1}
  arrays = lambda step: f"checkpoints%2F{step}%2Fstate%2Focdbt.process_0%2Fd%2F".encode()
  with latency_proxy.running(int(storage_server_url.rsplit(":", 1)[1])) as (proxy, url):
    proxy.drop_at = arrays(1)
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/quickstart.py",
               f"--workdir={run}", *TINY, *_flags(overrides)]
    env = dict(os.environ, **storage_server.environment(url))
    hung = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    for step in (1, 3):
      while not proxy.drop:
        assert hung.poll() is None and time.monotonic() < deadline, hung.communicate()[1]
        time.sleep(0.05)
      time.sleep(2)
      if step == 1:
        proxy.drop, proxy.drop_at = False, arrays(3)
    hung.kill()
    assert not _noise(hung.communicate()[1]) and hung.returncode == -signal.SIGKILL
    step_3 = [name for name in _objects(run) if name.startswith("checkpoints/3/")]
    assert step_3 and "checkpoints/3/commit_success.txt" not in step_3, step_3
    proxy.drop = False
    resumed = run_main(run, *TINY, *_flags(overrides), env=storage_server.environment(url))
  assert resumed.returncode == 0 and not _noise(resumed.stderr), resumed.stderr[-3000:]
  assert f"resumed from step 2 in {run}\n" in resumed.stdout, resumed.stdout
  local = tmp_path / "local"
  train.train_and_evaluate(override(tiny_config(), overrides), local)
  objects = _objects(run)
  steps = sorted({name.split("/")[1] for name in objects if name.startswith("checkpoints/")})
  assert steps == sorted(os.listdir(local / "checkpoints"))
  assert all(f"checkpoints/{step}/commit_success.txt" in objects for step in steps)
  bucket = epath.Path(run)
  rows = lambda d: [_without_times(json.loads(r)) for r in (d / "metrics.jsonl").read_text()
                    .splitlines()]
  assert rows(bucket) == rows(local)
  results = lambda d: _without_times(json.loads((d / "results.json").read_text()))
  assert results(bucket) == results(local)
  a, b = (saved_state(d / "checkpoints", int(steps[-1])) for d in (bucket, local))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_connection_failed_for_good_is_one_line():
  """What each client raises once its retries of a dropped connection run out, as seen
  when the proxy drops them for good (gcsfs: aiohttp's error; google-cloud-storage:
  google-api-core's RetryError over requests'; TensorStore's message), is one line naming
  the workdir and what to do, exit 6; a refusal or a bug is not."""
  run = "gs://bucket/run"
  todo = (": check the network, then rerun the same command (a training resumes from its last "
          "whole checkpoint)")
  try:
    try:
      raise requests.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end "
                                     "closed connection without response'))")
    except requests.ConnectionError as e:
      raise exceptions.RetryError("Timeout of 120.0s exceeded", e) from e
  except exceptions.RetryError as e:
    retried = e
  tensorstore_error = ValueError(
      "ABORTED: Error reading gs://bucket/run/checkpoints/1/state/_sharding: All 32 retry "
      "attempts failed: CURL error Server returned nothing (no headers, no data): Empty reply "
      "from server [curl_code='52'] [tensorstore_spec='{\"driver\":\"gcs\"}']")
  for error, why in (
      (retried, "RetryError: Timeout of 120.0s exceeded, last exception: ('Connection "
                "aborted.', RemoteDisconnected('Remote end closed connection without "
                "response'))"),
      (aiohttp.ServerDisconnectedError(), "ServerDisconnectedError: Server disconnected"),
      (tensorstore_error, "Error reading gs://bucket/run/checkpoints/1/state/_sharding: All 32 "
                          "retry attempts failed: CURL error Server returned nothing (no "
                          "headers, no data): Empty reply from server")):
    fault = errors.as_run_error(error, run)
    assert isinstance(fault, errors.WorkdirError) and fault.exit_code == 6
    assert str(fault) == f"the connection to {run} failed ({why}){todo}"
  denied = errors.as_run_error(exceptions.Forbidden("403 POST: no"), run)
  assert str(denied).startswith(f"Cloud Storage denied the run access to {run} (HTTP 403: ")
  assert errors.as_run_error(ValueError("INVALID_ARGUMENT: a bug"), run) is None
