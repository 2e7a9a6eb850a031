"""Each objective's loss on a tiny batch equals a NumPy computation of its formula
(docs/method.md section 3) from the model's own train-mode logits on x and a fixed x'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import defenses, models
from jaxdefense.training import objectives
from tests.reference import np_ce, np_log_softmax


def _np_kl(p_logits, q_logits):
  lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _np_bce(z, y):
  p = np.exp(np_log_softmax(z))
  order = np.argsort(-p, axis=-1)
  wrong = np.where(order[:, 0] == y, order[:, 1], order[:, 0])
  return np_ce(z, y) - np.log(1.0001 - p[np.arange(len(y)), wrong] + 1e-12)


@pytest.fixture(scope="module")
def setup():
  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
  delta = 0.03 * jnp.sign(jax.random.normal(jax.random.key(2), x.shape))
  x_adv = jnp.clip(x + delta, 0, 1)
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  return x, x_adv, labels


def _model(defense_name):
  defense = defenses.DefenseConfig(name=defense_name, beta=1.5)
  model = models.create("wide_resnet", num_classes=5, defense=defense, depth=10, width=1)
  return model, defense, models.init(model, jax.random.key(0), (8, 8, 1))


def _train_logits(model, v, x, labels, key):
  out, _ = model.apply(v, x, labels, train=True, rngs={"gumbel": key}, mutable=["batch_stats"])
  return np.asarray(out.logits, np.float64), {k: np.asarray(a, np.float64)
                                              for k, a in out.aux.items()}


def _run(name, model, defense, v, x, x_adv, labels, monkeypatch, rng):
  monkeypatch.setattr(objectives.attacks, "pgd", lambda *a, **k: x_adv)
  fn = objectives.make(name, model, defense, objectives.AttackConfig(steps=1))
  loss, (metrics, _) = fn(v["params"], v["batch_stats"], {"images": x, "labels": labels}, rng)
  return float(loss), metrics


@pytest.mark.parametrize("defense_name", ["none", "cas", "fsr"])
def test_pgd_at_and_natural(defense_name, setup, monkeypatch):
  x, x_adv, labels = setup
  model, defense, v = _model(defense_name)
  y = np.asarray(labels)
  rng = jax.random.key(7)
  for name, inputs, key in (("pgd_at", x_adv, jax.random.split(rng)[1]), ("natural", x, rng)):
    loss, _ = _run(name, model, defense, v, x, x_adv, labels, monkeypatch, rng)
    z, aux = _train_logits(model, v, inputs, labels, key)
    expected = np_ce(z, y)
    if defense_name == "cas":
      expected = expected + 1.5 * np.mean([np_ce(a, y) for a in aux.values()], axis=0)
    if defense_name == "fsr":
      top = np.argsort(-z, axis=-1)
      y_wrong = np.where(top[:, 0] == y, top[:, 1], top[:, 0])
      expected = expected + (np_ce(aux["fsr/final/robust"], y)
                             + np_ce(aux["fsr/final/non_robust"], y_wrong)
                             + np_ce(aux["fsr/final/recalibrated"], y))
    np.testing.assert_allclose(loss, expected.mean(), rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("defense_name", ["none", "cas"])
def test_trades(defense_name, setup, monkeypatch):
  x, x_adv, labels = setup
  model, defense, v = _model(defense_name)
  y = np.asarray(labels)
  loss, metrics = _run("trades", model, defense, v, x, x_adv, labels, monkeypatch,
                       jax.random.key(3))
  z_nat, aux_nat = _train_logits(model, v, x, labels, jax.random.key(0))
  z_adv, aux_adv = _train_logits(model, v, x_adv, labels, jax.random.key(0))
  natural = np_ce(z_nat, y).mean()
  robust = _np_kl(z_nat, z_adv).mean()
  if defense_name == "cas":
    natural += 1.5 * np.mean([np_ce(aux_nat[k], y).mean() for k in aux_nat])
    robust += 1.5 * np.mean([_np_kl(aux_nat[k], aux_adv[k]).mean() for k in aux_nat])
  assert robust > 0
  np.testing.assert_allclose(loss, natural + 6.0 * robust, rtol=2e-5)


@pytest.mark.parametrize("defense_name", ["none", "cas"])
def test_mart(defense_name, setup, monkeypatch):
  x, x_adv, labels = setup
  model, defense, v = _model(defense_name)
  y = np.asarray(labels)
  loss, _ = _run("mart", model, defense, v, x, x_adv, labels, monkeypatch, jax.random.key(3))
  z_nat, aux_nat = _train_logits(model, v, x, labels, jax.random.key(0))
  z_adv, aux_adv = _train_logits(model, v, x_adv, labels, jax.random.key(0))
  weight = 1.0000001 - np.exp(np_log_softmax(z_nat))[np.arange(len(y)), y]
  bce = _np_bce(z_adv, y).mean()
  robust = (_np_kl(z_nat, z_adv) * weight).mean()
  if defense_name == "cas":
    bce += 1.5 * np.mean([_np_bce(aux_adv[k], y).mean() for k in aux_adv])
    robust += 1.5 * np.mean([(_np_kl(aux_nat[k], aux_adv[k]) * weight).mean() for k in aux_nat])
  np.testing.assert_allclose(loss, bce + 6.0 * robust, rtol=2e-5)


def test_unknown_objective_and_bad_attack():
  model, defense, _ = _model("none")
  with pytest.raises(ValueError, match="unknown objective 'madry'.*pgd_at, trades, mart, natural"):
    objectives.make("madry", model, defense, objectives.AttackConfig())
  with pytest.raises(ValueError, match="eps must be >= 0, got -0.1"):
    objectives.AttackConfig(eps=-0.1)
  with pytest.raises(ValueError, match="unknown objective.attack.loss 'kl'"):
    objectives.AttackConfig(loss="kl")


@pytest.mark.parametrize("defense_name,passes", [("none", 3), ("cas", 2)])
def test_trades_updates_batch_norm_as_the_authors_code(defense_name, passes, setup,
                                                       monkeypatch):
  """Plain TRADES updates BatchNorm's running statistics on x, x', x (the original code's
  three train-mode passes), TRADES + CAS on x, x' (CAS's trades_reg). With x' = x every
  pass sees the same batch statistics mu, so after k passes running = 0.9^k r0 +
  (1 - 0.9^k) mu, mu read off one pass."""
  x, _, labels = setup
  model, defense, v = _model(defense_name)
  monkeypatch.setattr(objectives.attacks, "pgd", lambda *a, **k: x)
  fn = objectives.make("trades", model, defense, objectives.AttackConfig(steps=1))
  _, (_, stats) = fn(v["params"], v["batch_stats"], {"images": x, "labels": labels},
                     jax.random.key(3))
  _, one = model.apply(v, x, labels, train=True, rngs={"gumbel": jax.random.key(0)},
                       mutable=["batch_stats"])
  for r0, r1, got in zip(jax.tree.leaves(v["batch_stats"]), jax.tree.leaves(one["batch_stats"]),
                         jax.tree.leaves(stats)):
    r0, r1 = np.asarray(r0, np.float64), np.asarray(r1, np.float64)
    mu = (r1 - 0.9 * r0) / 0.1
    np.testing.assert_allclose(got, 0.9 ** passes * r0 + (1 - 0.9 ** passes) * mu,
                               rtol=2e-4, atol=1e-5)


def _np_smoothed_ce(z, y, s):
  """CE on the targets (1 - s) onehot(y) + s / K: (1 - s) CE + s mean_k(-log softmax(z)_k)."""
  return (1 - s) * np_ce(z, y) - s * np_log_softmax(z).mean(-1)


SMOOTHING = np.array([0.1, 0.0, 0.3, 0.1, 0.0, 0.2])


@pytest.mark.parametrize("defense_name", ["none", "cas"])
def test_label_smoothing(defense_name, setup, monkeypatch):
  """With a per-example s in the batch, natural's and PGD-AT's CE and TRADES' natural CE are
  the smoothed CE (closed form); CAS's auxiliary CEs, TRADES' KL and the attack keep the hard
  labels (DM-Improves-AT gowal21uncovering/utils/trades.py:42, 110, 112); s = 0 is the plain
  objective bit for bit."""
  x, x_adv, labels = setup
  model, defense, v = _model(defense_name)
  # Logits far from uniform, where smoothing matters: the classifier's kernel x 30.
  v = {**v, "params": {**v["params"], "fc": {**v["params"]["fc"],
                                             "kernel": 30 * v["params"]["fc"]["kernel"]}}}
  y = np.asarray(labels)
  monkeypatch.setattr(objectives.attacks, "pgd", lambda *a, **k: x_adv)
  plain_batch = {"images": x, "labels": labels}
  batch = dict(plain_batch, label_smoothing=jnp.asarray(SMOOTHING, jnp.float32))
  zero = dict(plain_batch, label_smoothing=jnp.zeros(len(y), jnp.float32))
  z_nat, _ = _train_logits(model, v, x, labels, jax.random.key(0))
  z_adv, _ = _train_logits(model, v, x_adv, labels, jax.random.key(0))
  for name, z in (("natural", z_nat), ("pgd_at", z_adv), ("trades", z_nat)):
    fn = objectives.make(name, model, defense, objectives.AttackConfig(steps=1),
                         label_smoothing=0.3)
    run = lambda b: fn(v["params"], v["batch_stats"], b, jax.random.key(7))
    (loss, (metrics, _)), (plain, (plain_metrics, _)) = run(batch), run(plain_batch)
    smoothed = _np_smoothed_ce(z, y, SMOOTHING)
    np.testing.assert_allclose(metrics["ce"] - plain_metrics["ce"],
                               (smoothed - np_ce(z, y)).mean(), rtol=1e-4, err_msg=name)
    if defense_name == "none":
      expected = smoothed.mean() + (6.0 * _np_kl(z_nat, z_adv).mean() if name == "trades" else 0)
      np.testing.assert_allclose(loss, expected, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(loss - plain, (smoothed - np_ce(z, y)).mean(), rtol=1e-4,
                               err_msg=name)
    assert run(zero)[0] == plain, name


def test_split_objective_and_label_smoothing_checks(setup):
  """objective(...) = loss(attack(...)): the same loss and gradient as the loss at the
  attack's fixed x' (the attack sees the parameters through stop_gradient), x' within eps and
  independent of the labels' smoothing; MART refuses s > 0; the per-example s."""
  x, _, labels = setup
  model, defense, v = _model("cas")
  attack = objectives.AttackConfig(eps=0.1, step_size=0.05, steps=2)
  objective = objectives.make("pgd_at", model, defense, attack)
  key, batch = jax.random.key(5), {"images": x, "labels": labels}
  x_adv = jax.jit(objective.attack)(v["params"], v["batch_stats"], batch, key)
  smooth = dict(batch, label_smoothing=jnp.full(len(labels), 0.2))
  np.testing.assert_array_equal(
      x_adv, jax.jit(objective.attack)(v["params"], v["batch_stats"], smooth, key))
  assert np.abs(np.asarray(x_adv - x)).max() <= 0.1 + 1e-6 and not np.array_equal(x_adv, x)
  whole = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      v["params"], v["batch_stats"], batch, key)
  at_x_adv = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, v["batch_stats"], batch, x_adv, key), has_aux=True))(
          v["params"])
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(at_x_adv)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert objectives.make("natural", model, defense, attack).attack(
      v["params"], v["batch_stats"], batch, key) is None

  with pytest.raises(ValueError, match="label_smoothing=0.1 is not defined for MART"):
    objectives.make("mart", model, defense, attack, label_smoothing=0.1)
  objectives.make("mart", model, defense, attack, label_smoothing=0.0)
  with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
    objectives.make("trades", model, defense, attack, label_smoothing=1.0)
  with pytest.raises(ValueError, match="unknown objective.label_smoothing_on 'real'"):
    objectives.check_label_smoothing("trades", 0.1, "real")
  extra = jnp.array([False, True, True, False])
  np.testing.assert_array_equal(objectives.smoothing_per_example(0.1, "all", extra),
                                np.full(4, 0.1, np.float32))
  np.testing.assert_array_equal(objectives.smoothing_per_example(0.1, "extra", extra),
                                np.float32([0, 0.1, 0.1, 0]))
