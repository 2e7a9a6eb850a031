"""bfloat16 compute: float32 parameters, optimizer state, BatchNorm statistics, loss and
perturbation; the step tracks the float32 step closely."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdefense import attacks, defenses, models
from jaxdefense.training import objectives, steps, train_state


def _step(dtype, defense, objective="pgd_at"):
  model = models.create("wide_resnet", num_classes=4, defense=defenses.DefenseConfig(name=defense),
                        depth=10, width=1, dtype=dtype)
  tx = optax.sgd(0.1, momentum=0.9)
  state = train_state.create(model, tx, jax.random.key(0), (8, 8, 1), ema=False)
  objective = objectives.make(objective, model, model.defense,
                              objectives.AttackConfig(eps=0.1, step_size=0.03, steps=2))
  step = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx,
                                   schedule=optax.constant_schedule(0.1),
                                   augment=lambda key, x: x))
  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
  labels = jax.random.randint(jax.random.key(2), (16,), 0, 4)
  new_state, metrics = step(state, {"images": x, "labels": labels})
  x_adv = attacks.make(model, attacks.pgd, eps=0.1, step_size=0.03, steps=2)(
      state.variables(), x, labels, jax.random.key(3))
  return state, new_state, metrics, x_adv


def test_bfloat16_keeps_float32_state_and_tracks_the_float32_step():
  """Parameters, optimizer state, BN statistics, loss and x' stay float32 (FSR, PGD-AT);
  without the attack's and the Gumbel mask's discrete choices, the bfloat16 update points
  the way of the float32 one (cosine > 0.95) with a close loss."""
  state, bf16, m16, x_adv = _step("bfloat16", "fsr")
  for tree in (state, bf16):
    dtypes = {a.dtype for a in jax.tree.leaves((tree.params, tree.batch_stats, tree.opt_state))}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
  assert m16["loss"].dtype == jnp.float32 and x_adv.dtype == jnp.float32
  state, bf16, m16, _ = _step("bfloat16", "none", "natural")
  _, f32, m32, _ = _step("float32", "none", "natural")
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=0.05)
  update = lambda new: np.concatenate([np.ravel(n - o) for n, o in zip(
      jax.tree.leaves(new.params), jax.tree.leaves(state.params))])
  u16, u32 = update(bf16), update(f32)
  assert np.dot(u16, u32) / (np.linalg.norm(u16) * np.linalg.norm(u32)) > 0.95
