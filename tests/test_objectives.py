"""Each objective's loss on a tiny batch equals a NumPy computation of its formula
(docs/method.md section 3) from the model's own train-mode logits on x and a fixed x'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import defenses, models, objectives
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
