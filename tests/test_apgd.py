"""APGD (Croce & Hein 2020) against docs/method.md section 6 and the reference's rules: DLR and
targeted DLR against NumPy, the checkpoint schedule, both step-size conditions on hand-made
loss histories, the EOT gradient average, masked runs equal subset runs, and APGD-CE,
APGD-DLR and APGD-T on a naturally trained digits MLP (inside the ball, accuracy far below
natural)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attack_models import MLP, accuracy, linf_distance, train_mlp
from jaxdefense.attacks import apgd, apgd_checkpoints, apgd_targeted, losses, step_size_halving
from jaxdefense.attacks.auto_pgd import _loss_and_grad
from jaxdefense.attacks.common import make_forward, target_classes
from jaxdefense.models.common import ModelOutput

EPS = 0.1


@pytest.fixture(scope="module")
def trained():
  model_fn, x, y = train_mlp()
  return model_fn, x[:48], y[:48]


def _np_dlr(z, y):
  srt = np.sort(z, axis=1)
  other = np.where(np.argmax(z, 1) == y, srt[:, -2], srt[:, -1])
  return -(z[np.arange(len(y)), y] - other) / (srt[:, -1] - srt[:, -3] + 1e-12)


def _np_dlr_targeted(z, y, t):
  srt = np.sort(z, axis=1)
  rows = np.arange(len(y))
  return -(z[rows, y] - z[rows, t]) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


def test_dlr_and_targeted_dlr_match_numpy():
  z = np.array([[3.0, 1.0, 0.5, -1.0, 2.0],     # y = argmax
                [0.2, 4.0, 1.0, 3.5, -2.0],     # y is not the argmax
                [1.0, 1.0, 0.0, -1.0, 0.5]],    # a tie at the top
               np.float32)
  y = np.array([0, 3, 1])
  t = np.array([4, 1, 2])
  out = ModelOutput(jnp.asarray(z), {})
  np.testing.assert_allclose(losses.dlr(out, jnp.asarray(y)), _np_dlr(z, y), rtol=1e-6)
  # Row 0 by hand: -(3 - 2) / (3 - 1) = -0.5.
  assert float(losses.dlr(out, jnp.asarray(y))[0]) == pytest.approx(-0.5)
  np.testing.assert_allclose(losses.dlr_targeted(jnp.asarray(t))(out, jnp.asarray(y)),
                             _np_dlr_targeted(z, y, t), rtol=1e-6)
  # Row 0 by hand: -(3 - 2) / (3 - (1 + 0.5) / 2) = -1 / 2.25.
  assert float(losses.dlr_targeted(jnp.asarray(t))(out, jnp.asarray(y))[0]) == \
      pytest.approx(-1 / 2.25)
  # Targets: the 2nd and 3rd most likely classes.
  np.testing.assert_array_equal(target_classes(jnp.asarray(z[:2]), 2), [4, 3])
  np.testing.assert_array_equal(target_classes(jnp.asarray(z[:2]), 3), [1, 2])


def _reference_checkpoints(n):
  """The reference's counter3 / k bookkeeping, replayed."""
  k, decrease, minimum = max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)
  points, counter = [], 0
  for i in range(n):
    counter += 1
    if counter == k:
      points.append(i)
      k, counter = max(k - decrease, minimum), 0
  return tuple(points)


def test_checkpoints():
  assert apgd_checkpoints(100) == (21, 40, 56, 69, 79, 86, 92, 98)
  assert apgd_checkpoints(10) == tuple(range(1, 10))
  assert apgd_checkpoints(1) == (0,)
  for n in (2, 5, 20, 37, 50, 250, 1000):
    assert apgd_checkpoints(n) == _reference_checkpoints(n), n


def test_step_size_halving_conditions():
  n_iter, k, i = 10, 4, 7            # checkpoint at 7 closes the window of iterations 4..7
  history = np.zeros((n_iter, 4), np.float32)
  history[:8, 0] = [0, 0, 0, 0.0, 1, 2, 3, 4]     # rose 4 of 4 times: no halving
  history[:8, 1] = [0, 0, 0, 0.0, 1, 2, 3, 3]     # 3 of 4 <= 0.75 * 4: halve (condition 1)
  history[:8, 2] = [0, 0, 0, 0.0, 1, 2, 3, 4]     # rising, but no gain since last check
  history[:8, 3] = [0, 0, 0, 5.0, 1, 2, 3, 4]     # row 4 falls from 5: 3 rises, halve
  loss_best = jnp.array([4.0, 3.0, 4.0, 5.0])
  best_last = jnp.array([3.0, 3.0, 4.0, 5.0])
  reduced_last = jnp.array([False, True, False, True])
  halve = step_size_halving(jnp.asarray(history), i, k, loss_best, best_last, reduced_last)
  np.testing.assert_array_equal(halve, [False, True, True, True])
  # Condition 2 needs the step not reduced last time.
  halve = step_size_halving(jnp.asarray(history), i, k, loss_best, best_last,
                            jnp.ones(4, bool))
  np.testing.assert_array_equal(halve, [False, True, False, True])
  # First window (checkpoint at k - 1): step 0 is compared with the last row, still zero,
  # as in the reference.
  first = np.zeros((n_iter, 2), np.float32)
  first[:3, 0] = [-1.0, -0.5, 0.0]   # the step into row 0 does not count as a rise
  first[:3, 1] = [1.0, 2.0, 3.0]     # it does here: 3 rises of 3
  halve = step_size_halving(jnp.asarray(first), 2, 3, jnp.array([0.0, 3.0]),
                            jnp.array([-1.0, 1.0]), jnp.ones(2, bool))
  np.testing.assert_array_equal(halve, [True, False])


def test_eot_averages_gradients_over_samples():
  w = jax.random.normal(jax.random.key(0), (12, 5))

  def noisy(x, key):
    x = x.reshape(x.shape[0], -1)
    return ModelOutput((x + 0.3 * jax.random.normal(key, x.shape)) @ w * x.sum(-1, keepdims=True),
                       {})
  x = jax.random.uniform(jax.random.key(1), (3, 12))
  y = jnp.array([0, 1, 2])
  evaluate = _loss_and_grad(make_forward(noisy, True), losses.cross_entropy, y, 4)
  model_key = jax.random.key(7)
  loss, logits, grad = evaluate(x, model_key)
  single = [jax.grad(lambda v, k=k: losses.cross_entropy(noisy(v, k), y).sum())(x)
            for k in (jax.random.fold_in(model_key, s) for s in range(4))]
  np.testing.assert_allclose(grad, np.mean(single, 0), rtol=1e-5, atol=1e-6)
  last = noisy(x, jax.random.fold_in(model_key, 3))
  np.testing.assert_allclose(logits, last.logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, losses.cross_entropy(last, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_breaks_trained_model(trained, loss):
  model_fn, x, y = trained
  natural = accuracy(model_fn, x, y)
  active = jnp.arange(x.shape[0]) % 5 != 0
  run = jax.jit(functools.partial(apgd, model_fn, loss=loss, steps=25, unroll=1),
                static_argnames=())
  x_adv = run(x, y, jax.random.key(0), eps=EPS, active=active)
  assert natural > 0.9
  assert accuracy(model_fn, x_adv, y) < natural - 0.4
  assert linf_distance(x_adv, x) <= np.float32(EPS)
  assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
  np.testing.assert_array_equal(x_adv[~active], x[~active])
  # Robust accuracy never exceeds natural: a misclassified point stays untouched.
  wrong = jnp.argmax(model_fn(x).logits, -1) != y
  np.testing.assert_array_equal(x_adv[wrong], x[wrong])


def test_apgd_targeted_and_l2(trained):
  model_fn, x, y = trained
  natural = accuracy(model_fn, x, y)
  x_adv = apgd_targeted(model_fn, x, y, jax.random.key(1), eps=EPS, steps=15, n_target=3,
                        unroll=1)
  assert accuracy(model_fn, x_adv, y) < natural - 0.4
  assert linf_distance(x_adv, x) <= np.float32(EPS)
  x_l2 = apgd(model_fn, x, y, jax.random.key(2), eps=1.0, norm="l2", steps=15, unroll=1)
  norms = jnp.sqrt(jnp.sum(jnp.square(x_l2 - x), axis=(1, 2, 3)))
  assert float(norms.max()) <= 1.0
  assert accuracy(model_fn, x_l2, y) < natural - 0.4


def test_masked_run_equals_subset_run(trained):
  model_fn, x, y = trained
  keys = jax.random.split(jax.random.key(3), x.shape[0])
  active = jnp.asarray(np.random.RandomState(0).rand(x.shape[0]) < 0.5)
  subset = np.flatnonzero(np.asarray(active))
  for attack in (functools.partial(apgd, steps=12, restarts=2, unroll=1),
                 functools.partial(apgd_targeted, steps=8, n_target=2, unroll=1)):
    masked = attack(model_fn, x, y, keys, eps=EPS, active=active)
    alone = attack(model_fn, x[subset], y[subset], keys[subset], eps=EPS)
    np.testing.assert_array_equal(masked[subset], alone)
    np.testing.assert_array_equal(masked[~active], x[~active])


def test_stochastic_model_with_eot(trained):
  model_fn, x, y = trained

  def randomised(v, key):
    return model_fn(jnp.clip(v + 0.02 * jax.random.normal(key, v.shape), 0, 1))
  natural = float(jnp.mean(jnp.argmax(randomised(x, jax.random.key(9)).logits, -1) == y))
  x_adv = apgd(randomised, x, y, jax.random.key(4), eps=EPS, steps=10, eot_samples=3,
               stochastic=True, unroll=1)
  assert linf_distance(x_adv, x) <= np.float32(EPS)
  assert float(jnp.mean(jnp.argmax(randomised(x_adv, jax.random.key(9)).logits, -1) == y)) \
      < natural - 0.4


def test_bad_input_raises(trained):
  model_fn, x, y = trained
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="'l0'.*linf, l2, l1"):
    apgd(model_fn, x, y, key, eps=EPS, norm="l0")
  with pytest.raises(ValueError, match="largereps.*'l1' only"):
    apgd(model_fn, x, y, key, eps=EPS, norm="l2", largereps=True)
  with pytest.raises(ValueError, match="'hinge'.*ce, dlr"):
    apgd(model_fn, x, y, key, eps=EPS, loss="hinge")
  with pytest.raises(ValueError, match="eps must be >= 0"):
    apgd(model_fn, x, y, key, eps=-0.1)
  with pytest.raises(ValueError, match="n_target=10.*1..9"):
    apgd_targeted(model_fn, x, y, key, eps=EPS, n_target=10)
  three = MLP(classes=3)
  params = three.init(jax.random.key(0), x[:1])
  with pytest.raises(ValueError, match=">= 4 classes, got 3"):
    apgd_targeted(lambda v: three.apply(params, v), x, y % 3, key, eps=EPS, n_target=2)
  with pytest.raises(ValueError, match="2 per-example keys for a batch of 48"):
    apgd(model_fn, x, y, jax.random.split(key, 2), eps=EPS)
