"""What the attacks share: model-function types, norms, the eps-ball projection, ascent
directions, argument checks, per-example keys, and the reference's loop of runs on the
points still robust (`run_on_robust`).

Every attack module (`projected_gradient`, `auto_pgd`, `fab`, `square_attack`,
`auto_attack`) takes these from here, and none takes a helper from another attack. Shapes:
x is (N, ...), one example per row; "per example" values are (N,) or shaped (N, 1, ..., 1)
to broadcast against x, as each function says.
"""
from __future__ import annotations

import functools
from typing import Callable, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.models.common import ModelOutput

ModelFn = Callable[[jax.Array], ModelOutput]
StochasticModelFn = Callable[[jax.Array, jax.Array], ModelOutput]
Forward = Callable[[jax.Array, Union[jax.Array, None]], ModelOutput]
# One run of an attack: (run, per-example keys, model key or None, x, labels, attacked)
# -> (x_adv, still correct); see `run_on_robust`.
RunFn = Callable[..., tuple[jax.Array, jax.Array]]

NORMS = ("linf", "l2", "l1")  # The threat models every attack here supports.


# ---------------------------------------------------------------- norms and directions

def per_example_norm(v: jax.Array, norm: str = "l2", *, keepdims: bool = True) -> jax.Array:
  """||v_i||_inf = max_j |v_ij|, ||v_i||_2 = sqrt(sum_j v_ij^2) or ||v_i||_1 = sum_j |v_ij|
  (plain sums in XLA's order; `accurate_l2_norm`, `accurate_l1_norm` for the ball), reduced
  over all axes but the first: shaped (N, 1, ..., 1) to broadcast against v, or (N,) with
  `keepdims=False`."""
  axes = tuple(range(1, v.ndim))
  if norm == "linf":
    return jnp.max(jnp.abs(v), axis=axes, keepdims=keepdims)
  if norm == "l1":
    return jnp.sum(jnp.abs(v), axis=axes, keepdims=keepdims)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=keepdims))


def normalize(v: jax.Array, norm: str, *, guard: Literal["max", "add"]) -> jax.Array:
  """v_i / ||v_i|| per example, the norm kept away from zero by
  guard="max": v / max(||v||, 1e-12) (torch.nn.functional.normalize's form; FGSM and PGD), or
  guard="add": v / (||v|| + 1e-12) (fra31/auto-attack's form; APGD's step, Square L2).
  Each attack keeps its own form: the two round differently near ||v|| = 1e-12."""
  length = per_example_norm(v, norm)
  if guard == "max":
    return v / jnp.maximum(length, 1e-12)
  return v / (length + 1e-12)


def ascent_direction(grad: jax.Array, norm: str, *, guard: Literal["max", "add"]) -> jax.Array:
  """The steepest-ascent step of unit norm for the loss linearised at x: sign(g) (L-inf),
  g / ||g||_2 (L2, zero-guarded as in `normalize`: "max" for PGD / FGSM, "add" for APGD
  as the reference's `autopgd_base.py` computes it)."""
  if norm == "linf":
    return jnp.sign(grad)
  if norm == "l1":
    return sparse_l1_direction(grad, jnp.full(grad.shape[:1], L1_TOPK))
  return normalize(grad, "l2", guard=guard)


# The fraction of coordinates an L1 step moves: APGD's first (Croce & Hein 2021), which
# PGD under L1 keeps throughout.
L1_TOPK = 0.2


def sparse_l1_direction(grad: jax.Array, topk: jax.Array) -> jax.Array:
  """The reference's L1 step direction (autopgd_base.py): sign(g) on the coordinates with
  |g_i| >= the value at ascending rank floor((1 - topk) D) (clipped to [0, D - 1]) of |g|,
  divided by their count (+ 1e-10): unit L1 norm on about topk D coordinates. topk (N,)."""
  n, size = grad.shape[0], grad[0].size
  flat = jnp.abs(grad.reshape(n, -1))
  rank = jnp.clip(jnp.floor((1.0 - topk) * size), 0, size - 1).astype(jnp.int32)
  threshold = jnp.take_along_axis(jnp.sort(flat, axis=1), rank[:, None], axis=1)
  signs = jnp.sign(grad.reshape(n, -1)) * (flat >= threshold)
  return (signs / (jnp.sum(jnp.abs(signs), axis=1, keepdims=True) + 1e-10)).reshape(grad.shape)


# ---------------------------------------------------------------- the eps-ball

def linf_bounds(x: jax.Array, eps) -> tuple[jax.Array, jax.Array]:
  """[x - eps, x + eps], each bound moved by one ulp inwards where rounding put it outside."""
  hi = x + eps
  hi = jnp.where(hi - x > eps, jnp.nextafter(hi, jnp.full_like(hi, -jnp.inf)), hi)
  lo = x - eps
  lo = jnp.where(x - lo > eps, jnp.nextafter(lo, jnp.full_like(lo, jnp.inf)), lo)
  return lo, hi


# The L2 ball's radius is taken 2^-19 (16 float32 ulps) inside eps, measured with a norm
# accurate to about one ulp, so that a checker summing the squares in another order
# (NumPy's pairwise float32 sum, XLA's on CPU or GPU, float64) still finds the point inside.
L2_MARGIN = 2.0 ** -19


def _two_sum(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]):
  """Knuth's TwoSum of two (high, low) float32 pairs: hi + lo carries the sum's rounding
  error, so a reduction with it is accurate to a few ulps in any order."""
  s = a[0] + b[0]
  v = s - a[0]
  error = (a[0] - (s - v)) + (b[0] - v)
  return s, a[1] + b[1] + error


def _accurate_sum(values: jax.Array) -> jax.Array:
  """Per-example sum of float32 values over all axes but the first, compensated (TwoSum),
  shaped (N, 1, ..., 1)."""
  axes = tuple(range(1, values.ndim))
  zero = jnp.zeros((), jnp.float32)
  hi, lo = jax.lax.reduce((values, jnp.zeros_like(values)), (zero, zero), _two_sum, axes)
  return (hi + lo).reshape(values.shape[:1] + (1,) * (values.ndim - 1))


def accurate_l2_norm(v: jax.Array) -> jax.Array:
  """Per-example ||v_i||_2 (shaped to broadcast against v), the squares summed with a
  compensated (TwoSum) reduction: within about one float32 ulp of the exact norm."""
  return jnp.sqrt(_accurate_sum(jnp.square(v.astype(jnp.float32))))


def project(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """Nearest point (L-inf: exactly; L2: radially, to radius eps (1 - 2^-19)) of the
  eps-ball around x, then [0, 1] (L1: the nearest point of ball and box together, radius
  eps (1 - 2^-19), `l1_ball_step`):
  L-inf: clip(clip(x_adv, x - eps, x + eps), 0, 1);
  L2: clip(x + delta min(1, r / max(||delta||_2, 1e-12)), 0, 1), delta = x_adv - x,
  r = eps (1 - 2^-19), shrunk further where rounding left the ball."""
  if norm == "linf":
    lo, hi = linf_bounds(x, eps)
    return jnp.clip(jnp.clip(x_adv, lo, hi), 0.0, 1.0)
  if norm == "l1":
    return _project_l1(x_adv, x, eps)
  radius = eps * (1 - L2_MARGIN)
  delta = x_adv - x
  delta = delta * jnp.minimum(1.0, radius / jnp.maximum(accurate_l2_norm(delta), 1e-12))

  # Rounding in x + delta can leave the ball by a few ulps: shrink those points until not.
  outside = lambda d: accurate_l2_norm(jnp.clip(x + d, 0.0, 1.0) - x) > radius
  delta = jax.lax.while_loop(lambda d: jnp.any(outside(d)),
                             lambda d: jnp.where(outside(d), d * (1 - L2_MARGIN), d), delta)
  return jnp.clip(x + delta, 0.0, 1.0)


def random_start(keys: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """P(x + eps t / (||t|| + 1e-12)) with t ~ U[-1, 1]^D (L-inf) or N(0, I) (L2); L1:
  P(x + t), t ~ N(0, I); one draw per example from its own key (the reference's APGD
  start; FAB's restarts at eps / 2)."""
  shape = x.shape[1:]
  if norm == "linf":
    t = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0))(keys)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
  if norm == "l1":  # The reference's L1 start: x + t, projected onto ball and box.
    return project(x + t, x, eps, "l1")
  # (eps t) / (||t|| + 1e-12), in this order: eps * normalize(t) would round differently.
  return project(x + eps * t / (per_example_norm(t, norm) + 1e-12), x, eps, norm)


def bisect_decreasing(decreasing: Callable[[jax.Array], jax.Array], target: jax.Array,
                      lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row, the adjacent float32 pair (lo, hi) with f(lo) >= target > f(hi) for a
  non-increasing f given f(lo) >= target > f(hi) (a row given lo = hi is left as it is):
  bisection until the midpoint is lo or hi
  (at most ~280 halvings cover every float32 in [0, 1]; the loop stops when all rows are
  done). The hyperplane and L1 projections find their segment by it instead of sorting: on
  the CPU, XLA's sort of the (2N, D) rows costs more than the model's forward pass, the
  bisection's O(D) sums a fraction of it (measured: benchmarks/RESULTS.md, 'AutoAttack,
  quiet machine')."""
  def cond(s):
    lo, hi = s
    mid = (lo + hi) / 2
    return jnp.any((mid > lo) & (mid < hi))

  def body(s):
    lo, hi = s
    mid = (lo + hi) / 2
    above = decreasing(mid) >= target
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)
  return jax.lax.while_loop(cond, body, (lo, hi))


# ---------------------------------------------------------------- the L1 ball

# As for L2, the L1 ball's radius is taken 2^-19 inside eps, measured by a compensated sum.
L1_MARGIN = 2.0 ** -19


def accurate_l1_norm(v: jax.Array) -> jax.Array:
  """Per-example ||v_i||_1 (shaped to broadcast against v), the |v_ij| summed with a
  compensated (TwoSum) reduction: within about one float32 ulp of the exact sum."""
  return _accurate_sum(jnp.abs(v.astype(jnp.float32)))


def l1_ball_step(x: jax.Array, y: jax.Array, eps) -> jax.Array:
  """The reference's `L1_projection` (autopgd_base.py): the d for which y + d is the
  Euclidean projection of the perturbation y onto {||delta||_1 <= eps, 0 <= x + delta <= 1}.

  Per coordinate |y_i| shrinks, its sign kept, by r_i = min(max(v_i, alpha), |y_i|), where
  v_i = max(0, x_i + y_i - 1, -(x_i + y_i)) is what the box needs; alpha = 0 if the box
  alone brings ||y||_1 to eps or below, else the alpha >= 0 with sum_i r_i = ||y||_1 - eps
  (r is piecewise linear and non-decreasing in alpha). The reference finds alpha's segment
  by a binary search over the sorted breakpoints {v_i, |y_i|}; here it is bracketed by
  bisection on alpha and alpha solved on it. x, y (N, ...); d has their shape."""
  shape = y.shape
  x, y = x.reshape(shape[0], -1).astype(jnp.float32), y.reshape(shape[0], -1)
  size = jnp.abs(y)
  need = jnp.maximum(0.0, jnp.maximum(x + y - 1.0, -(x + y)))
  excess = jnp.sum(size, axis=1) - eps  # What the shrinking must remove in all.
  thresholded = jnp.sum(need, axis=1) < excess
  removed = lambda alpha: jnp.sum(jnp.minimum(jnp.maximum(need, alpha[:, None]), size), axis=1)
  lo, hi = bisect_decreasing(lambda a: -removed(a), -excess, jnp.zeros_like(excess),
                             jnp.where(thresholded, jnp.max(size, axis=1), 0.0))
  top, bottom = size <= lo[:, None], need >= hi[:, None]  # Saturated on the segment.
  free = ~top & ~bottom
  fixed = jnp.sum(jnp.where(top, size, jnp.where(bottom, need, 0.0)), axis=1)
  count = jnp.sum(free, axis=1)
  alpha = jnp.clip((excess - fixed) / jnp.maximum(count, 1), lo, hi)
  alpha = jnp.where(thresholded & (count > 0), alpha, jnp.where(thresholded, hi, 0.0))
  shrink = jnp.minimum(jnp.maximum(need, alpha[:, None]), size)
  return (-jnp.sign(y) * shrink).reshape(shape)


def _project_l1(x_adv: jax.Array, x: jax.Array, eps) -> jax.Array:
  radius = eps * (1 - L1_MARGIN)
  delta = x_adv - x
  delta = jnp.clip(x + delta + l1_ball_step(x, delta, radius), 0.0, 1.0) - x
  outside = lambda d: accurate_l1_norm(jnp.clip(x + d, 0.0, 1.0) - x) > radius
  delta = jax.lax.while_loop(lambda d: jnp.any(outside(d)),
                             lambda d: jnp.where(outside(d), d * (1 - L1_MARGIN), d), delta)
  return jnp.clip(x + delta, 0.0, 1.0)


# ---------------------------------------------------------------- argument checks

def check_eps(eps) -> None:
  """Raises for a negative eps (checked where eps is concrete, i.e. not traced)."""
  if not isinstance(eps, jax.core.Tracer) and np.any(np.asarray(eps) < 0):
    raise ValueError(f"eps must be >= 0, got {eps}")


def check_norm(norm: str, allowed: tuple[str, ...] = NORMS, attack: str | None = None) -> None:
  """Raises unless norm is one of `allowed`, naming the attack where given."""
  if norm not in allowed:
    where = f" for {attack}" if attack else ""
    raise ValueError(f"unknown norm {norm!r}{where}; allowed: {', '.join(allowed)}")


def check_integer(name: str, value: int, minimum: int) -> None:
  """Raises unless value is an integer (Python or NumPy) >= minimum."""
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive(name: str, value: int) -> None:
  """Raises unless value is an integer >= 1 (steps, queries, chunks, EOT samples)."""
  check_integer(name, value, 1)


def check_restarts(restarts: int) -> None:
  """Raises unless restarts is an integer >= 0 (0 runs nothing: the input comes back)."""
  check_integer("restarts", restarts, 0)


def check_unit_interval(name: str, value: float) -> None:
  """Raises unless 0 < value <= 1 (APGD's rho, Square's p_init)."""
  if not 0 < value <= 1:
    raise ValueError(f"{name} must lie in (0, 1], got {value}")


def num_classes(forward: Forward, x: jax.Array, model_key: jax.Array | None) -> int:
  """K, from the logits' shape (no computation)."""
  return jax.eval_shape(forward, x, model_key).logits.shape[-1]


def check_n_target(n_target: int, classes: int, attack: str) -> None:
  """Raises unless 1 <= n_target < K: the targets are the 2nd..(n_target+1)th classes."""
  check_positive("n_target", n_target)
  if n_target >= classes:
    raise ValueError(f"{attack}: n_target={n_target} needs n_target < num_classes={classes} "
                     f"(targets are the 2nd..(n_target+1)th most likely classes); allowed: "
                     f"1..{classes - 1}")


# ---------------------------------------------------------------- loops

def default_unroll(steps: int) -> int:
  """Attack loops of up to 20 steps are unrolled whole, longer ones by 10: with
  `jaxdefense.convolution`'s convolution a rolled `fori_loop` runs nearly as fast as unrolled code,
  and partial unrolling keeps compile times low (measured on the CPU only:
  benchmarks/RESULTS.md, 'Attack loop unrolling')."""
  return max(steps, 1) if steps <= 20 else 10


def loop_unroll(steps: int, unroll: int | None) -> int:
  """`unroll` if given, else `default_unroll(steps)` (looked up here at call time, so one
  patch of `common.default_unroll` reaches every attack)."""
  return default_unroll(steps) if unroll is None else unroll


# ---------------------------------------------------------------- keys and models

def _is_single_key(key: jax.Array) -> bool:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 0
  return key.ndim == 1


def example_keys(key: jax.Array, n: int, model_key: jax.Array | None, stochastic: bool
                 ) -> tuple[jax.Array, jax.Array | None]:
  """(one key per example, the key of the model's noise or None).

  `key` is one PRNG key (split over the batch: keys_i = split(fold_in(key, 0), n)_i; the
  model key, if needed and not given, is fold_in(key, 1)) or N keys, one per example (a
  stochastic model then needs `model_key`).
  """
  if _is_single_key(key):
    keys = jax.random.split(jax.random.fold_in(key, 0), n)
    if stochastic and model_key is None:
      model_key = jax.random.fold_in(key, 1)
  else:
    if key.shape[0] != n:
      raise ValueError(f"got {key.shape[0]} per-example keys for a batch of {n}; pass one "
                       f"key or exactly one key per example")
    keys = key
    if stochastic and model_key is None:
      raise ValueError("a stochastic model with per-example keys needs model_key")
  return keys, (model_key if stochastic else None)


def fold(keys: jax.Array, data: int | jax.Array) -> jax.Array:
  """Per-example keys folded with the same counter (a run, an iteration): fold_in(k_i, data)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def fold_model(model_key: jax.Array | None, data: int | jax.Array) -> jax.Array | None:
  """fold_in(model_key, data), or None for a deterministic model."""
  return None if model_key is None else jax.random.fold_in(model_key, data)


def make_forward(model_fn: ModelFn | StochasticModelFn, stochastic: bool) -> Forward:
  """The model as `(x, key_or_None) -> ModelOutput`, deterministic models ignoring the key."""
  if stochastic:
    return lambda x, k: model_fn(x, k)
  return lambda x, k: model_fn(x)


def predicts(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether argmax(logits) == label, per example."""
  return jnp.argmax(logits, axis=-1) == labels


def per_point(value: jax.Array, ndim: int) -> jax.Array:
  """A per-example (N,) value shaped to broadcast against an (N, ...) array of rank ndim."""
  return value.reshape(value.shape + (1,) * (ndim - 1))


def target_classes(logits: jax.Array, rank) -> jax.Array:
  """The rank-th most likely class per example (rank 1 = argmax; may be traced)."""
  order = jnp.argsort(logits, axis=-1)
  return jnp.take_along_axis(order, (logits.shape[-1] - rank) * jnp.ones_like(order[:, :1]),
                             axis=-1)[:, 0]


# ---------------------------------------------------------------- runs on the robust points

def run_on_robust(forward: Forward, x: jax.Array, labels: jax.Array, keys: jax.Array,
                  model_key: jax.Array | None, active: jax.Array | None, runs: int,
                  run_fn: RunFn, chunks: int = 1) -> jax.Array:
  """The reference's `perturb`: `runs` runs, each on the points still correctly classified;
  a point fooled by a run takes that run's adversarial point and is not run again.
  `run_fn(run, keys, model_key, x, labels, attacked) -> (x_adv, still_correct)`.

  `chunks` = 1: every run takes the whole batch, the points not attacked masked. `chunks`
  = C > 1: the points still robust are gathered and attacked in batches of ceil(N / C), as
  many as they need: the work follows the robust points, as the reference's (which
  gathers them), in smaller batches. Each point's result is the same either way (per-point
  keys and step sizes); a randomised model (`model_key`) draws its noise per batch, so it
  is always run whole. The two forms are separate programs: choosing the whole batch by a
  `cond` when all C batches are needed slowed both (measured: benchmarks/RESULTS.md,
  'AutoAttack, quiet machine'). Under a mesh the gathered batches are not split over the
  devices (XLA replicates them): use C > 1 on one device."""
  if runs == 0:
    return x
  check_positive("chunks", chunks)
  acc = predicts(forward(x, fold_model(model_key, 0)).logits, labels)
  if active is not None:
    acc = acc & active
  n = x.shape[0]
  chunks = 1 if model_key is not None else min(chunks, n)

  def whole(r, carry):
    adv, acc = carry
    adv_run, acc_run = run_fn(r, fold(keys, r), fold_model(model_key, r + 1), x, labels, acc)
    fooled = acc & ~acc_run
    return jnp.where(per_point(fooled, x.ndim), adv_run, adv), acc & ~fooled

  size = -(-n // chunks)

  def gathered(r, batches, carry):
    order = jnp.concatenate([jnp.argsort(~carry[1], stable=True),  # The robust points first.
                             jnp.full((size * chunks - n,), n, jnp.int32)])
    run_keys = fold(keys, r)

    def batch(j, carry):
      adv, acc = carry
      index = jax.lax.dynamic_slice(order, (j * size,), (size,))
      valid, index = index < n, jnp.minimum(index, n - 1)
      attacked = acc[index] & valid
      adv_run, acc_run = run_fn(r, run_keys[index], None, x[index], labels[index], attacked)
      into = jnp.where(attacked & ~acc_run, index, n)  # Only the fooled; n is dropped.
      return adv.at[into].set(adv_run, mode="drop"), acc.at[into].set(False, mode="drop")
    return jax.lax.fori_loop(0, batches, batch, carry)

  def run(r, carry):
    if chunks == 1:
      return jax.lax.cond(jnp.any(carry[1]), functools.partial(whole, r), lambda c: c, carry)
    return gathered(r, (jnp.sum(carry[1]) + size - 1) // size, carry)

  adv, _ = jax.lax.fori_loop(0, runs, run, (x, acc))
  return adv
