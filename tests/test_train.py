"""The training program: an end-to-end main.py run, resume == uninterrupted, schedules and
the optimizer (bad configs: tests/test_bad_input.py; a gs:// workdir: tests/test_gcs.py)."""
import functools
import json
import os
import signal

import jax
import ml_collections
import numpy as np
import optax
import pytest

from jaxdefense import checkpoint, data, models
from jaxdefense.config import validation
from jaxdefense.training import optim, steps, train, train_state
from jaxdefense.config.defaults import get as default_config
from tests.helpers import (ROOT, TINY, kept_checkpoints, run_main, steps_per_epoch, tiny_config,
                           total_steps, with_generated_recipe, write_extra, EXTRA_MARKER,
                           load_config)

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
  assert "96 train / 48 test" in first.stdout
  assert f"1 epochs x {k} steps = {k} steps" in first.stdout
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
  dataset = data.from_config(config)
  model = models.from_config(config, dataset.num_classes)
  tx, _ = optim.make_optimizer(config, steps_per_epoch(config))
  target = jax.eval_shape(lambda: train_state.create(
      model, tx, jax.random.key(0), dataset.image_shape, ema=True))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every_steps=1,
                                 keep=1)
  state, step, _ = ckpt.restore(target)
  ckpt.close()
  return state, step


@pytest.mark.parametrize("defense,objective,generated", [("fsr", "pgd_at", False),
                                                        ("cas", "trades", False),
                                                        ("cifs", "pgd_at", True)])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, defense, objective, generated):
  """2k steps straight equal k steps, SIGTERM (save and exit), resume, k more: identical
  parameters, BN statistics, optimizer state and EMA; also with extra data in every batch
  and the generated-data recipe's AWP, label smoothing, warm-up and dynamic EMA."""
  config = tiny_config(defense, objective)
  if generated:
    with_generated_recipe(config, write_extra(tmp_path / "extra.npz", 200, (8, 8, 1),
                                              value=None))
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight["steps"] == total_steps(config)

  batches = train._batches
  seen = {"n": 0}

  def preempt_after_four(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      seen["n"] += 1
      if seen["n"] == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(train, "_batches", preempt_after_four)
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
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(0), schedule(749), schedule(750), schedule(899),
                              schedule(900)], [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
  c.optim.schedule = "cosine"
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(0), schedule(500), schedule(1000)], [0.1, 0.05, 0.0],
                             atol=1e-7)
  c.optim.schedule = "step"
  with pytest.raises(ValueError, match="unknown optim.schedule 'step'"):
    optim.learning_rate_schedule(c, steps_per_epoch=10)


def test_warm_up_then_cosine_with_the_rate_scaled_by_the_batch():
  """DeepMind's schedule: lr = 0.1 x B / 256, linear from 0 over the warm-up epochs, then a
  cosine to 0 at the last step over the remaining steps; a warm-up before a piecewise
  schedule keeps the milestones' absolute epochs."""
  c = default_config()
  c.optim.lr, c.optim.lr_reference_batch, c.train.batch_size = 0.1, 256, 1024
  c.optim.schedule, c.optim.warmup_epochs, c.train.epochs = "cosine", 10, 100
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=10)
  peak, warmup, total = 0.4, 100, 1000
  for step in (0, 1, 50, 99, 100, 101, 550, 999, 1000):
    expected = (peak * step / warmup if step < warmup else
                0.5 * peak * (1 + np.cos(np.pi * (step - warmup) / (total - warmup))))
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-7, err_msg=step)
  c.optim.schedule, c.optim.warmup_epochs, c.optim.milestones = "piecewise", 5, (75, 90)
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(25), schedule(50), schedule(749), schedule(750)],
                             [0.2, 0.4, 0.4, 0.04], rtol=1e-6)


def test_optimizer_is_torch_sgd():
  """SGD with momentum and coupled weight decay equals torch.optim.SGD's update rule:
  g += wd p; buf = m buf + g; p -= lr buf."""
  c = default_config()
  c.optim.schedule, c.optim.lr, c.optim.weight_decay, c.optim.momentum = "constant", 0.1, 0.01, 0.9
  tx, _ = optim.make_optimizer(c, steps_per_epoch=1)
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


def test_onecycle_is_torch_onecyclelr_stepped_per_epoch_with_nesterov_sgd():
  """DM-Improves-AT's `cosinew`: 12 epochs of 3 steps of torch.optim.SGD (Nesterov, weight
  decay) under OneCycleLR(max_lr=0.2, pct_start=3/12, total_steps=12) stepped after each
  epoch, rate and cycled momentum included, equal the optimizer optim.make_optimizer makes."""
  torch = pytest.importorskip("torch")
  c = default_config()
  c.optim.schedule, c.optim.lr, c.optim.warmup_epochs, c.train.epochs = "onecycle", 0.2, 3, 12
  c.optim.nesterov, c.optim.weight_decay = True, 5e-4
  tx, schedule = optim.make_optimizer(c, steps_per_epoch=3)
  weights = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
  sgd = torch.optim.SGD([weights], lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
  onecycle = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=0.2, pct_start=3 / 12,
                                                 total_steps=12)
  p = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
  state = tx.init(p)
  rng = np.random.default_rng(0)
  for epoch in range(12):
    for k in range(3):
      step = 3 * epoch + k
      np.testing.assert_allclose(schedule(step), sgd.param_groups[0]["lr"], rtol=1e-5)
      g = rng.normal(size=3)
      weights.grad = torch.tensor(g)
      sgd.step()
      updates, state = tx.update({"w": g.astype(np.float32)}, state, p)
      p = optax.apply_updates(p, updates)
      np.testing.assert_allclose(p["w"], weights.detach().numpy(), rtol=1e-5, atol=1e-6,
                                 err_msg=f"epoch {epoch} step {k}")
    if epoch < 11:  # torch refuses a step past total_steps.
      onecycle.step()


def test_the_in_training_pgd_attacks_cas_through_its_own_loss():
  """eval_pgd.loss="auto" (which also ranks checkpoints for --checkpoint=best): CAS's own
  loss for CAS, the CE otherwise; "ce" and "defense" force either; others are refused."""
  from jaxdefense.attacks import losses
  from jaxdefense.models import ModelOutput
  cas, none = tiny_config("cas"), tiny_config()
  assert steps.in_training_pgd_loss(none) is losses.cross_entropy
  assert steps.in_training_pgd_title(none) == "PGD-2"
  logits = np.array([[2.0, 0.0, -1.0]], np.float32)
  out = ModelOutput(logits, {"cas/layer2.0": np.array([[0.0, 3.0, 0.0]], np.float32)})
  labels = np.array([0])
  ce = float(losses.cross_entropy(out, labels)[0])
  assert float(steps.in_training_pgd_loss(cas)(out, labels)[0]) > ce + 1  # + 2 x head CE (~3)
  assert steps.in_training_pgd_title(cas) == "PGD-2 on the CAS loss"
  cas.eval_pgd.loss = "ce"
  assert steps.in_training_pgd_loss(cas) is losses.cross_entropy
  cas.eval_pgd.loss = "margin"
  with pytest.raises(ValueError, match="unknown eval_pgd.loss 'margin'; allowed: auto, ce"):
    validation.check_eval_pgd(cas)


class _Pixels:
  """A model whose logits are the image's 4 pixels: class k wins where pixel k is the
  brightest."""

  def apply(self, variables, x, train=False):
    del variables, train
    return models.ModelOutput(logits=x.reshape(x.shape[0], -1), aux={})


def test_the_in_training_pgd_counts_robust_only_points_also_correct_naturally():
  """eval_step, summed by train.evaluate_accuracy over padded batches: a point is robust
  when it is correct naturally and on the PGD point, as --mode=eval counts it. Built so that
  the attack "fixes" every point: PGD descends the CE (its loss negated) over the whole box
  on a model whose logits are the pixels, which moves each point to its label's corner, so
  counting the PGD point alone would give 100%; robust accuracy is then exactly the natural
  one (NumPy's argmax of the pixels)."""
  from jaxdefense import attacks, parallel
  from jaxdefense.attacks import losses
  rng = np.random.default_rng(0)
  images = rng.permuted(np.tile(np.array([0, 80, 160, 240], np.uint8), (10, 1)), axis=1)
  images = images.reshape(10, 2, 2, 1)
  labels = rng.integers(0, 4, 10).astype(np.int32)
  natural = np.argmax(images.reshape(10, 4), -1) == labels
  assert 0 < natural.sum() < 10
  pgd = ml_collections.ConfigDict({"eps": 1.0, "step_size": 0.5, "steps": 4,
                                   "random_start": False})
  descend = lambda out, y: -losses.cross_entropy(out, y)
  x_adv = attacks.pgd(attacks.deployed(_Pixels(), {}), data.to_float(images), labels,
                      jax.random.key(0), eps=1.0, step_size=0.5, steps=4, random_start=False,
                      loss=descend)
  assert (np.argmax(np.asarray(x_adv).reshape(10, 4), -1) == labels).all()  # All "fixed".
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=_Pixels(), pgd=pgd, loss=descend))
  result = train.evaluate_accuracy(eval_fn, {}, images, labels, parallel.make_mesh(),
                                   batch_size=4, seed=0)
  assert result["num_examples"] == 10
  assert result["natural_accuracy"] == result["pgd_accuracy"] == natural.sum() / 10


def _generated_tiny(recipe: str, defense: str, extra_path) -> ml_collections.ConfigDict:
  """configs/generated.py's recipe on 64 synthetic 8x8 images with a WRN-10-1, 2 epochs."""
  c = load_config("generated", f"{recipe},wrn28_10")
  c.defense.name = defense
  c.data.name, c.data.num_train, c.data.num_test, c.data.image_size = "synthetic", 64, 32, 8
  c.data.extra = (os.fspath(extra_path),)
  c.model.kwargs.depth, c.model.kwargs.width = 10, 1
  c.train.epochs, c.train.batch_size, c.optim.warmup_epochs = 2, 32, 1
  c.train.eval_every_epochs, c.train.eval_examples, c.train.eval_batch_size = 1, 32, 16
  c.train.ema_warmup_steps, c.train.checkpoint_every_steps = 1, 2
  c.objective.attack.steps, c.eval_pgd.steps = 1, 1
  return c


@pytest.mark.parametrize("recipe,defense", [("wang2023", "cas"), ("gowal2021", "none")])
def test_generated_recipes_train_end_to_end(tmp_path, monkeypatch, recipe, defense):
  """Both recipe configs train with an extra source, with and without a defense; every
  batch the step receives holds round(0.7 x 32) = 22 extra images (all pixels the marker,
  flagged by "is_extra") after 10 real ones (never all marker), as an epoch of
  ceil(64 / 32) = 2 steps; the results are finite; each train row says how long the loop
  waited for data (`data_wait_s`, within its elapsed time)."""
  config = _generated_tiny(recipe, defense, write_extra(tmp_path / "extra.npz", 100, (8, 8, 3)))
  batches, seen = train._batches, []

  def checked(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      marked = np.all(batch["images"] == EXTRA_MARKER, axis=(1, 2, 3))
      seen.append((marked.tolist(), batch["is_extra"].tolist()))
      yield batch

  monkeypatch.setattr(train, "_batches", checked)
  results = train.train_and_evaluate(config, tmp_path / "run")
  assert results["steps"] == 4 and len(seen) == 4
  assert all(marked == flags == [False] * 10 + [True] * 22 for marked, flags in seen)
  assert np.isfinite(results["natural_accuracy"]) and np.isfinite(results["robust_accuracy"])
  rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  assert train_rows and all(0 <= r["data_wait_s"] <= r["elapsed_s"] for r in train_rows)


def _tiny_step_setup(recipe, objective_name="natural"):
  from jaxdefense import defenses, models  # noqa: PLC0415
  from jaxdefense.training import objectives, steps  # noqa: PLC0415
  model = models.create("resnet", num_classes=4, stage_sizes=(1,), width=4)
  tx = optax.sgd(0.1, momentum=0.9)
  state = train_state.create(model, tx, jax.random.key(0), (8, 8, 1), ema=True)
  objective = objectives.make(objective_name, model, defenses.DefenseConfig(),
                              objectives.AttackConfig(steps=1), label_smoothing=0.2)
  step = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx,
                                   schedule=optax.constant_schedule(0.1),
                                   augment=lambda key, x: data.to_float(x), recipe=recipe))
  rng = np.random.default_rng(0)
  batch = {"images": rng.integers(0, 256, (8, 8, 8, 1), np.uint8),
           "labels": rng.integers(0, 4, 8).astype(np.int32),
           "is_extra": np.arange(8) >= 3}
  return state, step, batch, objective


@pytest.mark.parametrize("batch_stats", ["average", "live"])
def test_ema_warm_up_schedule_is_the_recipes_recurrence(batch_stats):
  """ema <- d_k ema + (1 - d_k) w_{k+1}, d_k = 0 for the first W = 2 updates (the EMA copies
  the weights), then min(0.9, (1 + d) / (10 + d)) with d = k - W (DM-Improves-AT's
  ema_update; NumPy recurrence); BatchNorm statistics averaged alike or the model's."""
  from jaxdefense.training import steps  # noqa: PLC0415
  c = default_config()
  c.train.ema_decay, c.train.ema_schedule, c.train.ema_warmup_steps = 0.9, "warmup", 2
  recipe = steps.Recipe(ema_decay=train_state.ema_decay(c), ema_batch_stats=batch_stats)
  state, step, batch, _ = _tiny_step_setup(recipe)
  expected = jax.tree.map(np.asarray, state.ema)
  for k in range(6):
    state, _ = step(state, batch)
    d = 0.0 if k < 2 else min(0.9, (1 + k - 2) / (10 + k - 2))
    live = {"params": state.params, "batch_stats": state.batch_stats}
    expected = jax.tree.map(lambda e, w: d * e + (1 - d) * np.asarray(w), expected, live)
    if batch_stats == "live":
      expected["batch_stats"] = jax.tree.map(np.asarray, state.batch_stats)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.ema),
                            jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{k} {jax.tree_util.keystr(path)}")
  assert k == 5


@pytest.mark.parametrize("on,smoothed", [("all", np.ones(8, bool)),
                                         ("extra", np.arange(8) >= 3)])
def test_the_step_smooths_the_labels_the_recipe_names(on, smoothed):
  """train_step's loss is the objective's at s = 0.2 on the examples `on` names (all, or the
  batch's "is_extra" ones), 0 on the rest: its CE is the closed form (1 - s) CE + s mean_k
  (-log p_k) per example."""
  from jaxdefense.training import steps  # noqa: PLC0415
  state, step, batch, objective = _tiny_step_setup(
      steps.Recipe(label_smoothing=0.2, label_smoothing_on=on))
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  _, objective_key = jax.random.split(key)
  images = data.to_float(batch["images"])
  out = objective_model_apply(objective, state, images, batch["labels"], objective_key)
  log_p = np.asarray(jax.nn.log_softmax(out), np.float64)
  s = np.where(smoothed, 0.2, 0.0)
  y = batch["labels"]
  ce = -log_p[np.arange(8), y]
  expected = np.mean((1 - s) * ce + s * -log_p.mean(-1))
  _, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["ce"], expected, rtol=1e-5)


def objective_model_apply(objective, state, images, labels, key):
  """The natural objective's train-mode logits (its forward pass with the step's key)."""
  model = objective.loss.keywords["model"]
  out, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       labels, train=True, rngs={"gumbel": key}, mutable=["batch_stats"])
  return out.logits


def test_a_shard_damaged_mid_run_stops_it_naming_the_shard(tmp_path, monkeypatch):
  """A prepared shard truncated while the run reads it: the run stops with a DataError naming
  the shard; the step whose batch failed never ran, so no checkpoint is of it or later."""
  from jaxdefense import errors  # noqa: PLC0415
  from jaxdefense.data import writer  # noqa: PLC0415
  rng = np.random.default_rng(0)
  writer.write_prepared(tmp_path / "prepared", [rng.integers(0, 256, (500, 8, 8, 1), np.uint8)],
                        rng.integers(0, 10, 500), image_shape=(8, 8, 1), source="test",
                        shard_images=250)
  shard = tmp_path / "prepared" / "images-00001-of-00002.npy"
  config = tiny_config()
  config.data.extra, config.data.extra_fraction = (os.fspath(tmp_path / "prepared"),), 0.5
  config.data.buffer_batches, config.train.checkpoint_every_steps = 1, 1
  batches, consumed = train._batches, []

  def truncating(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      consumed.append(1)
      if len(consumed) == 2:
        os.truncate(shard, 1000)
      yield batch

  monkeypatch.setattr(train, "_batches", truncating)
  with pytest.raises(errors.DataError, match="images-00001-of-00002.npy.*(short read|damaged)"):
    train.train_and_evaluate(config, tmp_path / "run")
  saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(consumed) < total_steps(config) and max(saved) <= len(consumed)
