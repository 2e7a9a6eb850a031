"""The training program: an end-to-end main.py run, resume == uninterrupted, schedules and
the optimizer, a gs:// workdir (bad configs: tests/test_bad_input.py)."""
import json
import os
import signal

import jax
import numpy as np
import optax
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from tensorboardX import record_writer

from jaxdefense import analysis, build, checkpoint, data, evaluate, train, validation
from jaxdefense.default_config import get as default_config
from tests.helpers import (ROOT, TINY, kept_checkpoints, run_main, steps_per_epoch, tiny_config,
                           total_steps)

def test_main_end_to_end_with_a_relative_workdir_and_resume(tmp_path):
  """main.py, started in another working directory with a relative --workdir, trains one
  epoch of the quick-start config shrunk to seconds; the same command with 2 epochs resumes
  from its checkpoint and writes results.json, metrics.jsonl, TensorBoard events and
  checkpoints under that relative path."""
  config = os.path.join(ROOT, "configs", "quickstart.py")
  first = run_main("runs/tiny", *TINY, "--config.defense.name=fsr", "--config.train.epochs=1",
                config=config, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "devices: 1 x " in first.stdout
  k = steps_per_epoch(tiny_config())
  assert "96 train / 48 test" in first.stdout and f"1 epochs x {k} steps = {k} steps" in first.stdout
  assert "defense:" in first.stdout  # The resolved config is printed.
  run = run_main("runs/tiny", *TINY, "--config.defense.name=fsr", config=config, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  workdir = tmp_path / "runs" / "tiny"
  assert f"resumed from step {k} in {workdir}" in run.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"] == "quickstart" and results["epochs"] == 2
  assert results["steps"] == total_steps(tiny_config()) == 2 * k
  assert 0 <= results["robust_accuracy"] <= results["natural_accuracy"] <= 1
  assert results["num_examples"] == 48
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  c = tiny_config()
  logged = lambda first, last: [s for s in range(first, last + 1)
                                if s % c.train.log_every_steps == 0 or s == last]
  assert [l["step"] for l in lines if "train/loss" in l] == logged(1, k) + logged(k + 1, 2 * k)
  assert any("fsr_recalibrated_ce" in k for l in lines for k in l)
  assert os.listdir(workdir / "tensorboard")
  # Saved every checkpoint_every_steps and at each epoch's evaluation; the last
  # keep_checkpoints are kept.
  assert sorted(map(int, os.listdir(workdir / "checkpoints"))) == kept_checkpoints(c)


def _final_state(workdir, config):
  dataset = build.load_data(config)
  model = build.build_model(config, dataset.num_classes)
  tx, _ = build.make_optimizer(config, steps_per_epoch(config))
  target = jax.eval_shape(lambda: build.create_train_state(
      model, tx, jax.random.key(0), dataset.image_shape, ema=True))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every_steps=1,
                                 keep=1)
  state, step, _ = ckpt.restore(target)
  ckpt.close()
  return state, step


@pytest.mark.parametrize("defense,objective", [("fsr", "pgd_at"), ("cas", "trades")])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, defense, objective):
  """2k steps straight equal k steps, SIGTERM (save and exit), resume, k more: identical
  parameters, BN statistics, optimizer state and EMA."""
  config = tiny_config(defense, objective)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight["steps"] == total_steps(config)

  batches = data.train_batches
  seen = {"n": 0}

  def preempt_after_four(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      seen["n"] += 1
      if seen["n"] == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(data, "train_batches", preempt_after_four)
  stopped = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert stopped == {"preempted": True, "step": 4}
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed == straight
  a, step_a = _final_state(tmp_path / "straight", config)
  b, step_b = _final_state(tmp_path / "resumed", config)
  assert step_a == step_b == total_steps(config)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def test_missing_tfds_data_set_is_a_clear_error(tmp_path):
  run = run_main(tmp_path / "run", f"--config.data.data_dir={tmp_path}",
              config="configs/fsr.py:resnet18,none",
              timeout=120)
  assert run.returncode != 0
  assert "cifar10" in run.stderr and str(tmp_path) in run.stderr and "tfds build" in run.stderr


def test_learning_rate_schedules():
  """Piecewise: lr, x0.1 after the first milestone epoch, x0.01 after the second; cosine
  ends at 0."""
  c = default_config()
  c.optim.lr, c.optim.milestones, c.train.epochs = 0.1, (75, 90), 100
  schedule = build.learning_rate_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(0), schedule(749), schedule(750), schedule(899),
                              schedule(900)], [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
  c.optim.schedule = "cosine"
  schedule = build.learning_rate_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(0), schedule(500), schedule(1000)], [0.1, 0.05, 0.0],
                             atol=1e-7)
  c.optim.schedule = "step"
  with pytest.raises(ValueError, match="unknown optim.schedule 'step'"):
    build.learning_rate_schedule(c, steps_per_epoch=10)


def test_optimizer_is_torch_sgd():
  """SGD with momentum and coupled weight decay equals torch.optim.SGD's update rule:
  g += wd p; buf = m buf + g; p -= lr buf."""
  c = default_config()
  c.optim.schedule, c.optim.lr, c.optim.weight_decay, c.optim.momentum = "constant", 0.1, 0.01, 0.9
  tx, _ = build.make_optimizer(c, steps_per_epoch=1)
  p = {"w": np.array([1.0, -2.0], np.float32)}
  state = tx.init(p)
  buf = np.zeros(2)
  expected = np.array([1.0, -2.0])
  for g in ([0.5, 0.5], [-1.0, 2.0]):
    updates, state = tx.update({"w": np.array(g, np.float32)}, state, p)
    p = optax.apply_updates(p, updates)
    buf = 0.9 * buf + (np.array(g) + 0.01 * expected)
    expected = expected - 0.1 * buf
  np.testing.assert_allclose(p["w"], expected, rtol=1e-6)


class _EpathEventFiles:
  """tensorboardX's writer factory for gs:// (the real one needs google-cloud-storage and a
  bucket), writing through epath, i.e. into etils' gs:// mock."""

  def open(self, path):
    return epath.Path(path).open("wb")

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def test_train_eval_and_analyze_on_a_gs_workdir(tmp_path, monkeypatch):
  """With --workdir=gs://bucket/run every output lands in the bucket (etils' mock maps it
  to `gs:/bucket/run` in the working directory) and orbax gets the gs:// path itself (its
  TensorStore writes are not mocked: the test's Checkpointer keeps them local)."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _EpathEventFiles())
  handed_to_orbax = []

  class LocalCheckpointer(checkpoint.Checkpointer):
    def __init__(self, directory, **kwargs):
      handed_to_orbax.append(str(directory))
      epath.Path(directory).mkdir(parents=True, exist_ok=True)
      super().__init__(tmp_path / "orbax", **kwargs)

  monkeypatch.setattr(checkpoint, "Checkpointer", LocalCheckpointer)
  config = tiny_config()
  config.train.epochs = 1
  config.eval.attacks, config.eval.batch_size, config.eval.num_examples = ("pgd20",), 24, 24
  with epath_testing.mock_epath():
    train.train_and_evaluate(config, "gs://bucket/run")
    evaluate.run(config, "gs://bucket/run", which="latest")
    analysis.run(config, "gs://bucket/run", which="latest")
  assert handed_to_orbax == ["gs://bucket/run/checkpoints"] * 3
  bucket = tmp_path / "gs:" / "bucket" / "run"
  written = set(os.listdir(bucket))
  assert {"results.json", "metrics.jsonl", "eval.json", "eval.md", "analysis.json",
          "analysis_layer2.0.png", "tensorboard", "checkpoints"} <= written, written
  assert json.loads((bucket / "results.json").read_text())["steps"] == total_steps(config)
  assert json.loads((bucket / "eval.json").read_text())["results"]["pgd20"]["num_points"] == 24
  assert os.listdir(bucket / "tensorboard")
  assert not [f for f in written if ".tmp-" in f]
  assert not (tmp_path / "gs:").samefile(tmp_path / "orbax") and os.listdir(tmp_path / "orbax")


def test_the_in_training_pgd_attacks_cas_through_its_own_loss():
  """eval_pgd.loss="auto" (which also ranks checkpoints for --checkpoint=best): CAS's own
  loss for CAS, the CE otherwise; "ce" and "defense" force either; others are refused."""
  from jaxdefense.attacks import losses
  from jaxdefense.models import ModelOutput
  cas, none = tiny_config("cas"), tiny_config()
  assert build.in_training_pgd_loss(none) is losses.cross_entropy
  assert build.in_training_pgd_title(none) == "PGD-2"
  logits = np.array([[2.0, 0.0, -1.0]], np.float32)
  out = ModelOutput(logits, {"cas/layer2.0": np.array([[0.0, 3.0, 0.0]], np.float32)})
  labels = np.array([0])
  ce = float(losses.cross_entropy(out, labels)[0])
  assert float(build.in_training_pgd_loss(cas)(out, labels)[0]) > ce + 1  # + 2 x head CE (~3)
  assert build.in_training_pgd_title(cas) == "PGD-2 on the CAS loss"
  cas.eval_pgd.loss = "ce"
  assert build.in_training_pgd_loss(cas) is losses.cross_entropy
  cas.eval_pgd.loss = "margin"
  with pytest.raises(ValueError, match="unknown eval_pgd.loss 'margin'; allowed: auto, ce"):
    validation.check_eval_pgd(cas)
