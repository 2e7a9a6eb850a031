"""AWP (jaxdefense/awp.py) against NumPy re-derivations of csdongxian/AWP's utils_awp.py and of
its train scripts' perturb -> torch.optim.SGD step -> restore, on tiny models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense import defenses, models
from jaxdefense.training import awp, objectives, steps, train_state

ATTACK = objectives.AttackConfig(eps=0.1, step_size=0.03, steps=2)


def _setup(defense_name, objective_name):
  defense = defenses.DefenseConfig(name=defense_name, hidden=8, probe_hidden=8)
  model = models.create("resnet", num_classes=4, stage_sizes=(1,), width=4, defense=defense)
  v = models.init(model, jax.random.key(0), (8, 8, 1))
  batch = {"images": jax.random.uniform(jax.random.key(1), (8, 8, 8, 1)),
           "labels": jnp.array([0, 1, 2, 3, 0, 1, 2, 3])}
  return objectives.make(objective_name, model, defense, ATTACK), v, batch


def objective_model(objective):
  """The model an `objectives.make` objective was built for."""
  return objective.loss.keywords["model"]


def _sgd():
  """optim.make_optimizer's optimizer: torch.optim.SGD's L2 weight decay and momentum."""
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def _awp_step(params, batch_stats, opt_state, batch, key, *, objective, tx, gamma, active):
  """The train step's AWP recipe (awp.py's docstring)."""
  x_adv = objective.attack(params, batch_stats, batch, key)
  loss_at = lambda p: objective.loss(p, batch_stats, batch, x_adv, key)
  v = awp.perturbation(lambda p: loss_at(p)[0], params, gamma=gamma, active=active)
  perturbed = awp.perturb(params, v)
  (loss, (_, batch_stats)), grads = jax.value_and_grad(loss_at, has_aux=True)(perturbed)
  updates, opt_state = tx.update(grads, opt_state, perturbed)
  return awp.restore(optax.apply_updates(perturbed, updates), v), batch_stats, opt_state, loss


def _plain_step(params, batch_stats, opt_state, batch, key, *, objective, tx):
  """steps.train_step's update without AWP."""
  (loss, (_, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
      params, batch_stats, batch, key)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), batch_stats, opt_state, loss


@pytest.mark.parametrize("objective_name", ["pgd_at", "trades"])
def test_perturbation_equals_numpy(objective_name):
  """v_l = gamma ||w_l|| d_l / (||d_l|| + 1e-20), d = 0.01 grad L, for every kernel, 0 for
  biases and BatchNorm's scales / offsets (normalisation redone in float64 from JAX's
  gradient); ||v_l|| = gamma ||w_l||; the loss at w + v is above the loss at w."""
  objective, v, batch = _setup("none", objective_name)
  key, gamma = jax.random.key(3), 0.005
  x_adv = objective.attack(v["params"], v["batch_stats"], batch, key)
  loss_fn = lambda p: objective.loss(p, v["batch_stats"], batch, x_adv, key)[0]
  got = jax.jit(functools.partial(awp.perturbation, loss_fn, gamma=gamma))(v["params"])
  grads = jax.jit(jax.grad(loss_fn))(v["params"])
  flat = jax.tree_util.tree_leaves_with_path(got)
  ndims = set()
  for (path, g), w, grad in zip(flat, jax.tree.leaves(v["params"]), jax.tree.leaves(grads)):
    name = jax.tree_util.keystr(path)
    w, grad, g = (np.asarray(a, np.float64) for a in (w, grad, g))
    ndims.add(w.ndim > 1)
    if w.ndim <= 1:
      assert not g.any(), name
      continue
    d = 0.01 * grad
    expected = gamma * np.linalg.norm(w) * d / (np.linalg.norm(d) + 1e-20)
    # Two compilations of the gradient differ in its last bits: near-zero entries compare
    # on the tensor's scale.
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                               err_msg=name)
    np.testing.assert_allclose(np.linalg.norm(g), gamma * np.linalg.norm(w), rtol=1e-5,
                               err_msg=name)
  assert ndims == {True, False}
  assert loss_fn(awp.perturb(v["params"], got)) > loss_fn(v["params"])
  off = jax.jit(lambda p, a: awp.perturbation(loss_fn, p, gamma=gamma, active=a))
  assert not any(np.asarray(a).any() for a in jax.tree.leaves(off(v["params"], False)))
  for a, b in zip(jax.tree.leaves(off(v["params"], True)), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_gamma_zero_and_inactive_are_the_plain_step_bit_for_bit():
  objective, v, batch = _setup("cas", "pgd_at")
  tx = _sgd()
  args = (v["params"], v["batch_stats"], tx.init(v["params"]), batch, jax.random.key(3))
  plain = jax.jit(functools.partial(_plain_step, objective=objective, tx=tx))(*args)
  step = jax.jit(functools.partial(_awp_step, objective=objective, tx=tx),
                 static_argnames="gamma")
  for gamma, active in ((0.0, True), (0.01, False)):
    got = step(*args, gamma=gamma, active=active)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain)):
      np.testing.assert_array_equal(a, b, err_msg=f"gamma={gamma}, active={active}")


def test_perturb_sgd_restore_is_torch_sgd_at_the_perturbed_weights():
  """Three AWP steps on 0.5 mean (x K + b - y)^2 (K 2x1, b 1: three parameters) equal a
  NumPy re-derivation of AT_AWP/train_cifar10.py:338-363 with torch.optim.SGD (momentum
  mu, weight decay wd, dampening 0): K += v; g = grad at (K, b); buf = mu buf + g + wd
  (K, b) (no mu buf at the first step); (K, b) -= lr buf; K -= v. The weight decay and the
  momentum see K + v: decaying K instead gives another result."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(5, 2)), rng.normal(size=(5, 1))
  k0, b0 = rng.normal(size=(2, 1)), rng.normal(size=(1,))
  gamma, lr, mu, wd = 0.3, 0.1, 0.9, 0.05

  def np_grads(k, b):
    r = x @ k + b - y
    return x.T @ r / len(x), r.mean(0)

  def np_awp(gamma, decay_perturbed=True):
    k, b, buf = k0.copy(), b0.copy(), None
    for _ in range(3):
      d = 0.01 * np_grads(k, b)[0]
      v = gamma * np.linalg.norm(k) * d / (np.linalg.norm(d) + 1e-20)
      k = k + v
      g_k, g_b = np_grads(k, b)
      d_p = (g_k + wd * (k if decay_perturbed else k - v), g_b + wd * b)
      buf = d_p if buf is None else tuple(mu * m + g for m, g in zip(buf, d_p))
      k, b = k - lr * buf[0] - v, b - lr * buf[1]
    return k, b

  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  loss = lambda p: 0.5 * jnp.mean((xj @ p["kernel"] + p["bias"] - yj) ** 2)
  tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mu))

  @jax.jit
  def step(params, opt_state):
    v = awp.perturbation(loss, params, gamma=gamma)
    assert v["bias"].shape == (1,)
    perturbed = awp.perturb(params, v)
    updates, opt_state = tx.update(jax.grad(loss)(perturbed), opt_state, perturbed)
    return awp.restore(optax.apply_updates(perturbed, updates), v), opt_state

  params = {"kernel": jnp.asarray(k0, jnp.float32), "bias": jnp.asarray(b0, jnp.float32)}
  opt_state = tx.init(params)
  for _ in range(3):
    params, opt_state = step(params, opt_state)
  k, b = np_awp(gamma)
  np.testing.assert_allclose(params["kernel"], k, rtol=1e-5)
  np.testing.assert_allclose(params["bias"], b, rtol=1e-5)
  for other in (np_awp(0.0), np_awp(gamma, decay_perturbed=False)):
    assert np.abs(other[0] - k).max() > 1e-3 * np.abs(k).max()


@pytest.mark.parametrize("defense_name,objective_name", [
    ("cifs", "pgd_at"), ("cas", "trades"), ("fsr", "trades")])
def test_awp_with_defenses(defense_name, objective_name):
  """One AWP step (gamma 0.01), the defense's auxiliary loss part of the loss: the loss is
  finite and every parameter moves."""
  objective, v, batch = _setup(defense_name, objective_name)
  tx = _sgd()
  params, _, _, loss = jax.jit(functools.partial(
      _awp_step, objective=objective, tx=tx, gamma=0.01, active=True))(
          v["params"], v["batch_stats"], tx.init(v["params"]), batch, jax.random.key(3))
  assert np.isfinite(loss)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(v["params"]))]
  assert min(moved) > 0 and all(np.isfinite(moved))


def test_train_step_with_awp_is_the_recipe():
  """steps.train_step with Recipe(awp_gamma, awp_start_step) is _awp_step (awp.py's recipe)
  from its start step on and the plain step before it, on the same augmented batch and key."""
  objective, v, batch = _setup("none", "trades")
  tx = _sgd()
  awp_step = jax.jit(functools.partial(_awp_step, objective=objective, tx=tx, gamma=0.01,
                                       active=True))
  plain_step = jax.jit(functools.partial(_plain_step, objective=objective, tx=tx))
  state = train_state.create(objective_model(objective), tx, jax.random.key(0),
                                   (8, 8, 1), ema=False)
  state = state.replace(params=v["params"], batch_stats=v["batch_stats"],
                        opt_state=tx.init(v["params"]))
  recipe = steps.Recipe(awp_gamma=0.01, awp_start_step=1)
  step = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx,
                                   schedule=optax.constant_schedule(0.1),
                                   augment=lambda key, x: x, recipe=recipe))
  for k in range(2):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    _, objective_key = jax.random.split(key)
    args = (state.params, state.batch_stats, state.opt_state, batch, objective_key)
    expected = awp_step(*args) if k else plain_step(*args)
    state, _ = step(state, batch)
    for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                    jax.tree.leaves(expected[:3])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"step {k}")
