"""Faults a long run meets, each made on purpose: a damaged newest checkpoint, a diverged run,
a second training on a held workdir, a config that builds another model, bad workdirs,
SIGTERM (mid-run and during the final evaluation) and SIGKILL at random moments."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import attacks, errors, models
from jaxdefense.evaluation import evaluate
from jaxdefense.training import optim, train, train_state
from jaxdefense.workdir import lock
from jaxdefense.checkpoint import Checkpointer
from tests.helpers import (ROOT, TINY, kept_checkpoints, run_main, saved_state, steps_per_epoch,
                           tiny_config, total_steps)

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
# The checkpoints a finished tiny run keeps (steps), its last and the one before.
KEPT = kept_checkpoints(tiny_config())
LAST, PREVIOUS = KEPT[-1], KEPT[-2]


def _array_files(step_dir):
  """The files holding a checkpoint's arrays (orbax's OCDBT data files): which of them holds
  the weights and which the optimizer state varies from save to save."""
  return [os.path.join(d, f) for d, _, names in os.walk(step_dir / "state") for f in names
          if os.sep + "d" + os.sep in os.path.join(d, f)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run (checkpoints KEPT) to copy and damage."""
  workdir = tmp_path_factory.mktemp("trained")
  config = tiny_config()
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _copy(trained, tmp_path):
  import shutil
  config, workdir = trained
  shutil.copytree(workdir, tmp_path / "run")
  return config.copy_and_resolve_references(), tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncate the array files", "delete state/_METADATA"])
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(trained, tmp_path, capsys,
                                                                 damage):
  """Eval names the damaged step and evaluates the previous one (moving nothing); training
  resumes from the previous one, moves the damaged step to checkpoints_damaged/ and ends
  where an undamaged run ends."""
  config, run = _copy(trained, tmp_path)
  if damage.startswith("truncate"):  # All of them: evaluation reads only the weights.
    for path in _array_files(run / "checkpoints" / str(LAST)):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(run / "checkpoints" / str(LAST) / "state" / "_METADATA")
  config.eval.attacks, config.eval.num_examples, config.eval.batch_size = ("fgsm",), 24, 24
  report = evaluate.run(config, run, which="latest")
  assert report["step"] == PREVIOUS
  assert f"checkpoint step {LAST} in" in capsys.readouterr().out
  assert sorted(map(int, os.listdir(run / "checkpoints"))) == KEPT  # Eval moves nothing.

  results = train.train_and_evaluate(config, run)
  out = capsys.readouterr().out
  assert f"checkpoint step {LAST} in" in out and "does not restore" in out
  assert f"resumed from step {PREVIOUS}" in out and f"moved damaged checkpoint step {LAST}" in out
  assert os.listdir(tmp_path / "run" / "checkpoints_damaged") == [str(LAST)]
  assert sorted(map(int, os.listdir(run / "checkpoints"))) == KEPT
  assert results == json.loads((trained[1] / "results.json").read_text())
  a, b = saved_state(trained[1] / "checkpoints", LAST), saved_state(run / "checkpoints", LAST)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_no_intact_checkpoint_is_one_error_listing_every_step(trained, tmp_path):
  config, run = _copy(trained, tmp_path)
  for step in KEPT:
    os.remove(run / "checkpoints" / str(step) / "state" / "_METADATA")
  tried = ": .*; ".join(f"step {s}" for s in reversed(KEPT))
  with pytest.raises(errors.NoIntactCheckpoint,
                     match=f"no checkpoint in .* restores; tried {tried}"):
    train.train_and_evaluate(config, run)
  assert sorted(map(int, os.listdir(run / "checkpoints"))) == KEPT  # Nothing moved.


def test_diverged_run_stops_saves_nothing_after_and_reports_no_result(tmp_path):
  """lr x 1e10 after the first epoch: a Diverged error naming the step and the values; no
  results.json; the checkpoints of the first epoch are kept, every one left is finite;
  evaluation refuses a non-finite checkpoint."""
  config = tiny_config()
  config.optim.milestones, config.optim.decay_factor = (1,), 1e10
  with pytest.raises(errors.Diverged, match=r"training diverged at step \d+: loss .*gradient "
                                            r"norm .*newest checkpoint in .*: step"):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "results.json").exists()
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps[:2] == [2, 3]
  for step in steps:
    for key, value in saved_state(tmp_path / "checkpoints", step).items():
      assert np.all(np.isfinite(value)), (step, key)
  rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("train/"))

  # A non-finite checkpoint (saved by hand) is refused by evaluation.
  good = tiny_config()
  train.train_and_evaluate(good, tmp_path / "good")
  target = jax.eval_shape(lambda: train_state.create(
      models.from_config(good, 10), optim.make_optimizer(good, steps_per_epoch(good))[0],
      jax.random.key(0), (8, 8, 1), ema=True))
  with Checkpointer(tmp_path / "good" / "checkpoints", save_every_steps=1, keep=5,
                    best_metric="pgd_accuracy") as ckpt:
    state, _, _ = ckpt.restore(target)
    nan = jax.tree.map(lambda a: a * jnp.nan if jnp.issubdtype(a.dtype, jnp.floating) else a,
                       state)
    ckpt.save(7, nan, force=True)
  with pytest.raises(errors.NoIntactCheckpoint, match="step 7 .* non-finite parameters"):
    evaluate.run(good, tmp_path / "good", which="latest")


def test_a_point_with_non_finite_logits_is_not_robust():
  """evaluate's scoring: NaN logits (argmax would pick class 0) and NaN inputs count as
  wrong, and as non-finite."""
  class Model:
    def apply(self, variables, x, train=False):
      del variables, train
      logits = jnp.stack([jnp.sum(x, axis=(1, 2, 3)), jnp.zeros(len(x))], -1)
      return type("Out", (), {"logits": logits})()

  x = jnp.ones((3, 2, 2, 1)).at[1].set(jnp.nan)
  correct, finite = attacks.correct_points(Model(), {}, x, jnp.array([0, 0, 1]))
  assert correct.tolist() == [True, False, False] and finite.tolist() == [True, False, True]
  table = evaluate.markdown_table({"pgd20": {"title": "PGD-20", "accuracy": 0.5,
                                             "non_finite_points": 2}}, "caption")
  assert "PGD-20: 2 point(s) with non-finite x' or logits, counted as not robust" in table


def test_second_training_on_a_held_workdir_refuses_and_eval_runs_beside(trained, tmp_path):
  config, run = _copy(trained, tmp_path)
  held = lock.Lease(run, config.train.lease_timeout_s).acquire()
  try:
    with pytest.raises(errors.WorkdirBusy, match=rf"in use by a training run on host "
                                                 rf"{socket.gethostname()}, process {os.getpid()}"):
      train.train_and_evaluate(config, run)
    config.eval.attacks, config.eval.num_examples, config.eval.batch_size = ("fgsm",), 24, 24
    assert evaluate.run(config, run, which="latest")["step"] == LAST
  finally:
    held.release()
  assert not (run / "lock.json").exists()


def test_a_run_killed_on_one_host_resumes_on_another_once_its_lease_expires(trained, tmp_path,
                                                                              monkeypatch, capsys):
  """Host a dies after step 4 (its lease left behind, unrenewed, as SIGKILL or a lost VM leaves
  it); the same command at once on host b waits for the lease to expire (1 s), takes it over
  in one line, resumes and ends with the uninterrupted run's results and state."""
  config = tiny_config()
  config.train.lease_timeout_s = 1.0

  class Killed(Exception):
    pass
  batches = train._batches

  def die_after_four(*args, **kwargs):
    for n, batch in enumerate(batches(*args, **kwargs)):
      if n == 4:
        raise Killed
      yield batch
  monkeypatch.setattr(socket, "gethostname", lambda: "a")
  with monkeypatch.context() as killed:
    killed.setattr(train, "_batches", die_after_four)
    killed.setattr(lock.Lease, "_renew_periodically", lambda self: None)
    killed.setattr(lock.Lease, "release", lambda self: None)
    with pytest.raises(Killed):
      train.train_and_evaluate(config, tmp_path / "run")
  assert json.loads((tmp_path / "run" / "lock.json").read_text())["host"] == "a"
  monkeypatch.setattr(socket, "gethostname", lambda: "b")
  results = train.train_and_evaluate(config, tmp_path / "run")
  out = capsys.readouterr().out
  assert f"taking over {tmp_path / 'run' / 'lock.json'}: the lease of process {os.getpid()} on " \
         "host a (started" in out and "resumed from step 4" in out
  assert not (tmp_path / "run" / "lock.json").exists()
  assert results == json.loads((trained[1] / "results.json").read_text())
  a = saved_state(trained[1] / "checkpoints", LAST)
  b = saved_state(tmp_path / "run" / "checkpoints", LAST)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_config_that_builds_another_model_is_one_error(trained, tmp_path):
  config, run = _copy(trained, tmp_path)
  fsr = tiny_config("fsr")
  message = (r"defense.name: 'none' in the workdir, 'fsr' now.*Use the config it was trained "
             r"with \(saved in .*config.json\)")
  for action in (lambda: evaluate.run(fsr, run), lambda: train.train_and_evaluate(fsr, run)):
    with pytest.raises(errors.ConfigMismatch, match=message):
      action()
  wider = tiny_config()
  wider.model.kwargs.width = 16
  with pytest.raises(errors.ConfigMismatch, match=r"model.kwargs: .*'width': 8.*'width': 16"):
    evaluate.run(wider, run)


def test_bad_workdirs_fail_at_once_in_one_line(tmp_path):
  """main.py: eval of an empty workdir (no checkpoints/ left behind, no traceback), a
  workdir that is a file; each exits non-zero with one 'error:' line."""
  empty = run_main(tmp_path / "empty", "--mode=eval", timeout=120)
  assert empty.returncode == errors.NoCheckpoint.exit_code, empty.stderr[-2000:]
  assert "error: no checkpoint in" in empty.stderr and "Traceback" not in empty.stderr
  assert not (tmp_path / "empty" / "checkpoints").exists()
  (tmp_path / "file").write_text("")
  start = time.time()
  as_file = run_main(tmp_path / "file", *TINY, timeout=120)
  assert as_file.returncode == errors.RunError.exit_code, as_file.stderr[-2000:]
  assert f"error: workdir {tmp_path / 'file'} is not a writable directory" in as_file.stderr
  assert "devices:" not in as_file.stdout  # Before the data is loaded.
  assert time.time() - start < 60


def _start_main(workdir, *flags):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"),
                           f"--config={QUICKSTART}", f"--workdir={workdir}", *TINY, *flags],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_sigterm_mid_run_exits_75_and_the_final_evaluation_is_not_cut_short(tmp_path,
                                                                            monkeypatch):
  """SIGTERM once the loop runs: main.py saves, exits 75 (not 0), and the rerun finishes.
  In process: SIGTERM during the final evaluation still ends with results.json."""
  proc = _start_main(tmp_path / "run", "--config.train.epochs=40")
  output = ""
  while "quickstart:" not in output:  # tqdm's bar: the SIGTERM handler is installed.
    line = proc.stdout.readline()
    assert line, output
    output += line
  proc.send_signal(signal.SIGTERM)
  rest, _ = proc.communicate(timeout=120)
  assert proc.returncode == errors.PREEMPTED_EXIT_CODE, (output + rest)[-2000:]
  assert "preempted: saved step" in rest
  assert not (tmp_path / "run" / "results.json").exists()

  config = tiny_config()
  evaluate_accuracy = train.evaluate_accuracy
  calls = []

  def sigterm_in_final_eval(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # Epoch 2 of 2: the final evaluation.
      os.kill(os.getpid(), signal.SIGTERM)
    return evaluate_accuracy(*args, **kwargs)

  monkeypatch.setattr(train, "evaluate_accuracy", sigterm_in_final_eval)
  results = train.train_and_evaluate(config, tmp_path / "inproc")
  assert results["steps"] == total_steps(config)
  assert (tmp_path / "inproc" / "results.json").exists()


def test_resume_drops_rows_logged_after_the_checkpoint(trained, tmp_path):
  """A run killed after logging its last step but before saving it: the rerun resumes from
  the checkpoint before, and metrics.jsonl holds each step's rows once, as the uninterrupted
  run's."""
  config, run = _copy(trained, tmp_path)
  import shutil
  shutil.rmtree(run / "checkpoints" / str(LAST))
  train.train_and_evaluate(config, run)
  steps = lambda w: [json.loads(r)["step"] for r in (w / "metrics.jsonl").read_text().splitlines()]
  assert steps(run) == steps(trained[1])


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(trained, tmp_path):
  """main.py killed (SIGKILL) at 3 seeded random moments, each followed by a rerun, ends
  with the uninterrupted run's parameters, BN statistics, optimizer state and EMA."""
  workdir = tmp_path / "run"
  moments = random.Random(0)
  for _ in range(3):
    proc = _start_main(workdir)
    time.sleep(moments.uniform(3, 15))
    proc.kill()
    proc.communicate()
  final = run_main(workdir, *TINY, timeout=300)
  assert final.returncode == 0, final.stderr[-3000:]
  a, b = (saved_state(trained[1] / "checkpoints", LAST),
          saved_state(workdir / "checkpoints", LAST))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_eval_killed_mid_attack_resumes_to_the_same_eval_json(trained, tmp_path):
  """`--mode=eval` killed (SIGKILL) once its first attack has finished a batch, then run
  again: it reuses the finished batches and ends with the eval.json of an uninterrupted
  evaluation (times aside); the progress records are removed at the end."""
  config, run = _copy(trained, tmp_path)
  flags = ["--mode=eval", "--checkpoint=last", "--config.eval.batch_size=4",
           "--config.eval.attacks=('pgd100','cw')"]
  proc = _start_main(run, *flags)
  progress = run / "eval_progress"
  deadline = time.time() + 240
  while not list(progress.glob("*/pgd100.*.npz")):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
    time.sleep(0.01)
  proc.kill()
  proc.communicate()
  assert not (run / "eval.json").exists()
  done = {p.name for p in progress.glob("*/*.npz")}
  assert "natural.00000.npz" in done and len(done) < 1 + 2 * 12

  resumed = _start_main(run, *flags)
  output, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, output[-3000:]
  assert "(resuming: finished batches reused)" in output
  assert not progress.exists() or not list(progress.iterdir())

  _, fresh = _copy(trained, tmp_path / "uninterrupted")
  uninterrupted = _start_main(fresh, *flags)
  output, _ = uninterrupted.communicate(timeout=300)
  assert uninterrupted.returncode == 0, output[-3000:]
  strip = lambda results: {k: {f: v for f, v in r.items() if f != "time_s"}
                           for k, r in results.items()}
  got = strip(json.loads((run / "eval.json").read_text())["results"])
  expected = strip(json.loads((fresh / "eval.json").read_text())["results"])
  differing = {f"{k}.{f}": (got[k].get(f), v) for k, r in expected.items()
               for f, v in r.items() if got.get(k, {}).get(f) != v}
  assert not differing and got.keys() == expected.keys(), differing


def test_a_full_disk_stops_before_the_save_and_the_rerun_resumes(tmp_path, monkeypatch):
  """Less free space than a checkpoint takes: one WorkdirError naming the step, the
  directory and the sizes, raised before orbax writes anything (no half-written step);
  with space again the same command resumes from the last step saved and ends as an
  uninterrupted run."""
  import collections
  import shutil
  from jaxdefense import checkpoint
  config = tiny_config()
  straight = train.train_and_evaluate(config, tmp_path / "straight")
  usage = shutil.disk_usage
  full = lambda path: collections.namedtuple("Usage", "total used free")(1, 1, 0)
  saves = []
  real_save = checkpoint.Checkpointer.save

  def save_then_fill(self, step, state, **kwargs):
    saved = real_save(self, step, state, **kwargs)
    saves.append(step)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", full)  # The disk fills up.
    return saved
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_fill)
  with pytest.raises(errors.WorkdirError, match=r"no space left for checkpoint step \d+ in "
                     r".*checkpoints: it needs .* MiB, 0.0 MiB are free; free space there and "
                     r"rerun the same command \(it resumes from step \d+\)"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not [d for d in os.listdir(tmp_path / "run" / "checkpoints") if "tmp" in d]
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)
  assert train.train_and_evaluate(config, tmp_path / "run") == straight


def test_io_failures_anywhere_in_a_cause_chain_become_one_line():
  """An OSError under another exception (as orbax wraps them), and TensorStore's own I/O
  message, become WorkdirErrors naming the path and what to do; anything else stays a bug."""
  import errno
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/7")
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as e:
    fault = errors.as_run_error(e)
  assert isinstance(fault, errors.WorkdirError) and fault.exit_code == 6
  assert str(fault).startswith("No space left on device (/data/run/checkpoints/7): free space")
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local '
                           'file "/r/ckpt/": Failed writing: "/r/ckpt/d/12": Failed to write '
                           "3 bytes to file 11: No space left on device [os_error_code='28']")
  assert "(/r/ckpt/d/12): free space" in str(errors.as_run_error(tensorstore))
  denied = errors.as_run_error(PermissionError(errno.EACCES, "Permission denied", "/ro/run"))
  assert "Permission denied (/ro/run): make it writable" in str(denied)
  assert errors.as_run_error(ValueError("a bug")) is None
