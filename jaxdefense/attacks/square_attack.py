"""Square Attack, L-inf, L2 and L1 (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), as
AutoAttack runs it (github fra31/auto-attack, `square.py`, `resc_schedule=False`).

Score-based, no gradients. L-inf start: vertical stripes x + eps * (+-1 per column and
channel). Each query adds to the best point a square window of side s (from the p
schedule, s = round(sqrt(p H W)), clipped to [1, min(H, W)]) holding +-2 eps per channel,
projects onto the ball, and keeps the new point if the margin loss z_y - max_{j!=y} z_j
decreased or the point is misclassified. Points whose margin is <= 0 stop.

L2: the perturbation delta = x_best - x is rescaled to norm eps after every change. Start:
a grid of (H // 5)-squares, each a "pseudo-Gaussian" eta (concentric rectangles weighted
1 / (k + 1)^2, upper half positive, lower half negative, unit norm, transposed at random)
times +-1 per channel. Each query moves one window's content (normalised, plus a fresh
+-eta) to a random window, zeroes a second random window, and gives the moved window the
mass the rest of delta leaves to eps (s from the p schedule, odd, at least 3).

L1: as L2 with rings weighted 1 / (k + 1)^4 and unit L1 norms, the moved window given
the L1 mass the reference gives it, and every proposal projected onto the L1 ball and the
box (radius eps (1 - 1e-6), `common.l1_ball_step`) instead of rescaled.

Masked execution and per-example keys as in `auto_pgd.apgd`; unlike the reference, which
draws one window position and one sign per channel for the whole batch at each query, every
point draws its own (the same distribution per point, and a point's result then does not
depend on its batch).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.attacks import losses
from jaxdefense.attacks.common import (
    ModelFn, check_eps, check_norm, check_positive, check_restarts, check_unit_interval,
    example_keys, fold, l1_ball_step, make_forward, normalize, per_example_norm, per_point,
    predicts, project, run_on_robust)


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


def square_sizes_l2(height: int, width: int, queries: int, p_init: float = 0.8,
                    rescale_schedule: bool = False) -> np.ndarray:
  """L2 window side at each query: max(round(sqrt(p H W)), 3), made odd, at most min(H, W)."""
  sizes = []
  for i in range(queries):
    s = max(int(round(math.sqrt(p_selection(p_init, i, queries, rescale_schedule)
                                * height * width))), 3)
    sizes.append(min(s + 1 if s % 2 == 0 else s, min(height, width)))
  return np.asarray(sizes, np.int32)


def _rectangles(rows: int, cols: int, norm: str = "l2") -> np.ndarray:
  """Concentric rectangles about (rows // 2, cols // 2), ring k weighted 1 / (k + 1)^2
  (L2; 1 / (k + 1)^4 under L1), unit L2 (L1) norm (the reference's `eta_rectangles`)."""
  power = 4 if norm == "l1" else 2
  delta = np.zeros((rows, cols))
  r, c = rows // 2, cols // 2
  for k in range(max(r, c) + 1):
    delta[max(r - k, 0):min(r + k + 1, rows), max(c - k, 0):min(c + k + 1, cols)] += \
        1.0 / (k + 1) ** power
  size = _lp(delta, norm)
  return delta / size if size > 0 else delta


def _lp(v: np.ndarray, norm: str) -> float:
  return float(np.sum(np.abs(v))) if norm == "l1" else float(np.sqrt(np.sum(v ** 2)))


def eta(size: int, norm: str = "l2") -> np.ndarray:
  """The (size, size) pseudo-Gaussian block: rectangles on the upper half, minus
  rectangles on the lower half, unit L2 (L1) norm (the reference's `eta`, untransposed)."""
  delta = np.zeros((size, size))
  delta[:size // 2] = _rectangles(size // 2, size, norm)
  delta[size // 2:] = -_rectangles(size - size // 2, size, norm)
  return delta / _lp(delta, norm)


def _eta_table(sizes: np.ndarray, height: int, width: int, norm: str = "l2"
               ) -> tuple[np.ndarray, np.ndarray]:
  """For each distinct size, eta and its transpose in the top-left corner of an (H, W)
  grid: (table (K, 2, H, W), index into it per query)."""
  distinct = sorted(set(int(s) for s in sizes))
  table = np.zeros((len(distinct), 2, height, width), np.float32)
  for k, s in enumerate(distinct):
    table[k, 0, :s, :s] = eta(s, norm)
    table[k, 1, :s, :s] = eta(s, norm).T
  return table, np.asarray([distinct.index(int(s)) for s in sizes], np.int32)


def _window_norm(v: jax.Array, norm: str = "l2") -> jax.Array:
  """Per example and channel, the L2 (L1) norm over (H, W)."""
  if norm == "l1":
    return jnp.sum(jnp.abs(v), axis=(1, 2), keepdims=True)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))


# Under L1 the reference projects every proposal onto the ball of radius eps (1 - 1e-6).
L1_RADIUS = 1 - 1e-6


def _square_run_lp(model_fn: ModelFn, x: jax.Array, labels: jax.Array, keys: jax.Array,
                   attacked: jax.Array, *, eps, queries: int, sizes: np.ndarray,
                   norm: str = "l2") -> tuple[jax.Array, jax.Array]:
  """One L2 or L1 Square run on the `attacked` points: (best point, its margin).

  L2 rescales the perturbation to norm eps after each change; L1 (the reference's) gives
  the moved window per channel the mass (max(eps - ||delta||_1, 0) / C + that of both
  windows) x C and projects x + delta onto ball and box of radius eps (1 - 1e-6)."""
  n, height, width, channels = x.shape

  def finish(delta):  # The proposal x + delta on the ball (and the box).
    if norm == "l1":
      return x + delta + l1_ball_step(x, delta, eps * L1_RADIUS)
    return jnp.clip(x + normalize(delta, "l2", guard="add") * eps, 0.0, 1.0)

  place = jax.vmap(lambda block, top, left: jnp.roll(block, (top, left), axis=(0, 1)))

  def flipped(table_entry, flip_keys):  # Per example: eta or its transpose, (N, H, W, 1).
    flip = jax.vmap(lambda k: jax.random.bernoulli(k))(flip_keys)
    return jnp.where(flip[:, None, None], table_entry[1], table_entry[0])[..., None]

  # Start: a grid of (H // 5)-squares from (H - 5 s) // 2, each eta x +-1 per channel.
  s0 = max(height // 5, 1)
  start_table, _ = _eta_table(np.asarray([s0]), height, width, norm)
  offset = (height - 5 * s0) // 2
  delta = jnp.zeros_like(x)
  init_keys = fold(keys, 0)
  for a in range(height // s0):
    for b in range(width // s0):
      top, left = offset + a * s0, offset + b * s0
      if top >= height or left >= width:
        continue
      k = fold(init_keys, a * (width // s0) + b + 1)
      block = flipped(start_table[0], fold(k, 0))
      block = jnp.roll(block, (top, left), axis=(1, 2))
      block = jnp.where(_window(jnp.full(n, top), jnp.full(n, left), s0, height, width),
                        block, 0.0)
      delta = delta + block * _signs(fold(k, 1), (1, 1, channels))
  x_best = finish(delta)
  table, index = _eta_table(sizes, height, width, norm)
  table, index, sizes = jnp.asarray(table), jnp.asarray(index), jnp.asarray(sizes)

  def propose(i, x_best):
    size = sizes[i]
    step_keys = fold(keys, i + 1)
    draws = jax.vmap(lambda k: jax.random.uniform(k, (4,)))(step_keys)
    corners = jnp.floor(draws * (jnp.array([height, width, height, width]) - size)
                        ).astype(jnp.int32)
    window = _window(corners[:, 0], corners[:, 1], size, height, width)
    window2 = _window(corners[:, 2], corners[:, 3], size, height, width)
    delta = x_best - x
    norm_image = per_example_norm(delta, norm)
    norm_window = _window_norm(jnp.where(window, delta, 0.0), norm)
    norm_windows = _window_norm(jnp.where(window | window2, delta, 0.0), norm)
    new = place(flipped(table[index[i]], fold(step_keys, 1)), corners[:, 0], corners[:, 1])
    new = new * _signs(fold(step_keys, 2), (1, 1, channels)) + \
        jnp.where(window, delta, 0.0) / (1e-12 + norm_window)
    new = jnp.where(window, new, 0.0)
    if norm == "l1":
      budget = (jnp.maximum(eps - norm_image, 0.0) / channels + norm_windows) * channels
    else:
      budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / channels
                        + norm_windows ** 2)
    new = new / (1e-12 + _window_norm(new, norm)) * budget
    return finish(jnp.where(window, new, jnp.where(window2, 0.0, delta)))

  return _search(model_fn, x_best, labels, attacked, queries, propose)


def _window(top: jax.Array, left: jax.Array, size, height: int, width: int) -> jax.Array:
  """Per example, the (N, H, W, 1) mask of the size x size square at (top, left)."""
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  top, left = top[:, None, None, None], left[:, None, None, None]
  return (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)


def _search(model_fn: ModelFn, x_best: jax.Array, labels: jax.Array, attacked: jax.Array,
            queries: int, propose) -> tuple[jax.Array, jax.Array]:
  """The random search both norms share: query i proposes `propose(i, x_best)`, kept if
  its margin fell or is <= 0; points stop at a margin <= 0. (best point, its margin)."""
  def searching(margin_min):
    return attacked & (margin_min > 0)

  def cond(s):
    i, _, margin_min = s
    return (i < queries) & jnp.any(searching(margin_min))

  def body(s):
    i, x_best, margin_min = s
    x_new = propose(i, x_best)
    margin = _margin(model_fn, x_new, labels)
    accept = searching(margin_min) & ((margin < margin_min) | (margin <= 0))
    x_best = jnp.where(per_point(accept, x_best.ndim), x_new, x_best)
    return i + 1, x_best, jnp.where(accept, margin, margin_min)

  margin_min = _margin(model_fn, x_best, labels)
  _, x_best, margin_min = jax.lax.while_loop(cond, body, (0, x_best, margin_min))
  return x_best, margin_min


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

  def propose(i, x_best):
    size = sizes[i]
    step_keys = fold(keys, i + 1)
    draws = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(step_keys)
    corner = jnp.floor(draws * (jnp.array([height, width]) - size)).astype(jnp.int32)
    window = _window(corner[:, 0], corner[:, 1], size, height, width)
    signs = _signs(fold(step_keys, 1), (1, 1, channels))
    return project(x_best + jnp.where(window, 2 * eps * signs, 0.0), x, eps, "linf")

  return _search(model_fn, x_best, labels, attacked, queries, propose)


def square(model_fn: ModelFn, x: jax.Array, labels: jax.Array, key: jax.Array, *, eps,
           norm: str = "linf", queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
           rescale_schedule: bool = False, active: jax.Array | None = None,
           chunks: int = 1) -> jax.Array:
  """Square Attack (L-inf, L2 or L1, margin loss) on NHWC images: the adversarial points, x
  where not fooled. Each restart runs `queries` queries on the points not yet fooled
  (`chunks`: gathered, see `common.run_on_robust`)."""
  check_eps(eps)
  check_norm(norm, attack="square")
  check_positive("queries", queries)
  check_restarts(restarts)
  check_unit_interval("p_init", p_init)
  if x.ndim != 4:
    raise ValueError(f"square needs NHWC images of rank 4, got shape {tuple(x.shape)}")
  x = x.astype(jnp.float32)
  forward = make_forward(model_fn, False)
  keys, _ = example_keys(key, x.shape[0], None, False)
  if norm == "linf":
    sizes = square_sizes(x.shape[1], x.shape[2], queries, p_init, rescale_schedule)
    run = functools.partial(_square_run, sizes=jnp.asarray(sizes))
  else:
    sizes = square_sizes_l2(x.shape[1], x.shape[2], queries, p_init, rescale_schedule)
    run = functools.partial(_square_run_lp, sizes=sizes, norm=norm)

  def run_fn(r, run_keys, run_model_key, x, labels, attacked):
    del r, run_model_key
    adv, _ = run(model_fn, x, labels, run_keys, attacked, eps=eps, queries=queries)
    adv = project(adv, x, eps, norm)  # L2: the rescaled delta may exceed eps by an ulp.
    return adv, predicts(model_fn(adv).logits, labels)
  return run_on_robust(forward, x, labels, keys, None, active, restarts, run_fn, chunks)
