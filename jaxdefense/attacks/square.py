"""Square Attack, L-inf (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), as AutoAttack
runs it (github fra31/auto-attack, `square.py`, `resc_schedule=False`).

Score-based, no gradients. Start: vertical stripes x + eps * (+-1 per column and channel).
Each query adds to the best point a square window of side s (from the p schedule, s =
round(sqrt(p H W)), clipped to [1, min(H, W)]) holding +-2 eps per channel, projects onto
the ball, and keeps the new point if the margin loss z_y - max_{j!=y} z_j decreased or the
point is misclassified. Points whose margin is <= 0 stop. Masked execution and per-example
keys as in `apgd`; unlike the reference, which draws one window position and one sign per
channel for the whole batch at each query, every point draws its own (the same distribution
per point, and a point's result then does not depend on its batch).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.attacks.apgd import (
    check_eps, check_norm, check_positive, example_keys, fold, make_forward, per_point, predicts,
    run_on_robust)
from jaxdefense.attacks import losses
from jaxdefense.attacks.pgd import ModelFn, project

NORMS = ("linf",)


def p_selection(p_init: float, it: int, queries: int, rescale_schedule: bool = False) -> float:
  """The fraction p of pixels a square covers at query `it` (0-based): p_init halved at
  it > 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (`it` rescaled to a 10000-query
  budget if `rescale_schedule`; AutoAttack does not rescale)."""
  if rescale_schedule:
    it = int(it / queries * 10000)
  for bound, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32),
                         (500, 16), (200, 8), (50, 4), (10, 2)):
    if it > bound:
      return p_init / divisor
  return p_init


def square_sizes(height: int, width: int, queries: int, p_init: float = 0.8,
                 rescale_schedule: bool = False) -> np.ndarray:
  """Side s of the square at each query: min(max(round(sqrt(p H W)), 1), min(H, W))."""
  sizes = [max(int(round(math.sqrt(p_selection(p_init, i, queries, rescale_schedule)
                                   * height * width))), 1) for i in range(queries)]
  return np.minimum(np.asarray(sizes, np.int32), min(height, width))


def _margin(model_fn: ModelFn, x: jax.Array, labels: jax.Array) -> jax.Array:
  return losses.margin(model_fn(x).logits, labels)


def _signs(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.vmap(lambda k: jax.random.rademacher(k, shape, jnp.float32))(keys)


def _square_run(model_fn: ModelFn, x: jax.Array, labels: jax.Array, keys: jax.Array,
                attacked: jax.Array, *, eps, queries: int, sizes: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """One Square run on the `attacked` points: (best point, its margin)."""
  n, height, width, channels = x.shape
  x_best = project(x + eps * _signs(fold(keys, 0), (1, width, channels)), x, eps,
                   "linf")
  margin_min = _margin(model_fn, x_best, labels)
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]

  def searching(margin_min):
    return attacked & (margin_min > 0)

  def cond(s):
    i, _, margin_min = s
    return (i < queries) & jnp.any(searching(margin_min))

  def body(s):
    i, x_best, margin_min = s
    size = sizes[i]
    step_keys = fold(keys, i + 1)
    draws = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(step_keys)
    corner = jnp.floor(draws * (jnp.array([height, width]) - size)).astype(jnp.int32)
    top = corner[:, 0, None, None, None]
    left = corner[:, 1, None, None, None]
    window = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    signs = _signs(fold(step_keys, 1), (1, 1, channels))
    x_new = project(x_best + jnp.where(window, 2 * eps * signs, 0.0), x, eps, "linf")
    margin = _margin(model_fn, x_new, labels)
    accept = searching(margin_min) & ((margin < margin_min) | (margin <= 0))
    x_best = jnp.where(per_point(accept, x.ndim), x_new, x_best)
    return i + 1, x_best, jnp.where(accept, margin, margin_min)

  _, x_best, margin_min = jax.lax.while_loop(cond, body, (0, x_best, margin_min))
  return x_best, margin_min


def square(model_fn: ModelFn, x: jax.Array, labels: jax.Array, key: jax.Array, *, eps,
           norm: str = "linf", queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
           rescale_schedule: bool = False, active: jax.Array | None = None) -> jax.Array:
  """Square Attack (L-inf, margin loss) on NHWC images: the adversarial points, x where
  not fooled. Each restart runs `queries` queries on the points not yet fooled."""
  check_eps(eps)
  check_norm(norm, NORMS, "square")
  check_positive("queries", queries)
  if not isinstance(restarts, (int, np.integer)) or restarts < 0:
    raise ValueError(f"restarts must be an integer >= 0, got {restarts!r}")
  if not 0 < p_init <= 1:
    raise ValueError(f"p_init must lie in (0, 1], got {p_init}")
  if x.ndim != 4:
    raise ValueError(f"square needs NHWC images of rank 4, got shape {tuple(x.shape)}")
  x = x.astype(jnp.float32)
  forward = make_forward(model_fn, False)
  keys, _ = example_keys(key, x.shape[0], None, False)
  sizes = jnp.asarray(square_sizes(x.shape[1], x.shape[2], queries, p_init, rescale_schedule))

  def run_fn(r, run_keys, run_model_key, x, attacked):
    del r, run_model_key
    adv, _ = _square_run(model_fn, x, labels, run_keys, attacked, eps=eps, queries=queries,
                         sizes=sizes)
    return adv, predicts(model_fn(adv).logits, labels)
  return run_on_robust(forward, x, labels, keys, None, active, restarts, run_fn)
