"""FAB-T: targeted Fast Adaptive Boundary attack, L-inf and L2 (Croce & Hein, ICML 2020).

Follows the reference implementation (github fra31/auto-attack, `fab_base.py`, `fab_pt.py`,
`fab_projections.py`): at x_k the decision boundary between the true class y and the target
t is linearised, f_t - f_y + <grad(f_t - f_y), v - x_k> = 0, and both x_k and the clean x
are projected onto it (box-constrained, minimal L-inf or L2 norm). The step is the convex
combination

  x_{k+1} = clip01((1 - alpha)(x_k + eta d_k) + alpha (x + eta d_0)),
  alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max),

and a point that became adversarial is kept if closer to x than the best so far and pulled
back towards x: x_{k+1} <- x + beta (x_{k+1} - x). Targets are the 2nd..(n_target+1)th most
likely clean classes; a point counts as fooled when its closest adversarial point lies in
the eps-ball. Masked execution and per-example keys as in `apgd`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.attacks.apgd import (
    check_eps, check_n_target, check_norm, check_positive, example_keys, make_forward, num_classes,
    per_point, predicts, random_start, run_on_robust, target_classes)
from jaxdefense.attacks.pgd import ModelFn, default_unroll, project

NORMS = ("linf", "l2")


def _take(v: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(v, index, axis=1)


def project_linf_hyperplane(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Per row, the d of least ||d||_inf with <w, t + d> = b and 0 <= t + d <= 1 (where the
  box allows it; otherwise the box corner closest to the hyperplane), rows of (M, D).

  With the sign chosen so that <w, t> >= b, moving every coordinate by min(lambda, p_i)
  towards its box face p_i away changes <w, .> by -sum_i |w_i| min(lambda, p_i): lambda
  is found by a binary search over the sorted p, as in the reference."""
  side = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0)
  w = w * side[:, None]
  b = b * side
  toward_one = (w < 0).astype(t.dtype)
  nonzero = (w != 0).astype(t.dtype)
  d = (toward_one - t) * nonzero
  p = toward_one - t * (2 * toward_one - 1)
  order = jnp.argsort(p, axis=1)
  b = b - jnp.sum(w * t, axis=1)
  b0 = jnp.sum(w * d, axis=1)
  descending = order[:, ::-1]
  w_sorted = _take(w, descending)
  s = jnp.cumsum(jnp.abs(w_sorted), axis=1)
  sb = jnp.cumsum(-w_sorted * _take(d, descending), axis=1) + b0[:, None]

  smallest_p = _take(p, order[:, :1])[:, 0]
  below_smallest = b - (sb[:, -1] - s[:, -1] * smallest_p) > 0
  searched = (b - b0 > 0) & ~below_smallest

  dim = w.shape[1]
  lb = jnp.zeros(w.shape[:1], jnp.int32)
  ub = jnp.full(w.shape[:1], dim - 1, jnp.int32)
  for _ in range(math.ceil(math.log2(dim)) if dim > 1 else 0):
    mid = (lb + ub) // 2
    at = _take(order, (dim - 1 - mid)[:, None])
    reached = _take(sb, mid[:, None])[:, 0] - _take(s, mid[:, None])[:, 0] * _take(p, at)[:, 0]
    go_up = b - reached > 0
    lb = jnp.where(go_up, mid, lb)
    ub = jnp.where(go_up, ub, mid)

  lam_all = jnp.maximum((b - sb[:, -1]) / -s[:, -1], 0.0)[:, None]
  d_all = (2 * toward_one - 1) * lam_all
  lam = jnp.maximum((b - _take(sb, lb[:, None])[:, 0]) / -_take(s, lb[:, None])[:, 0],
                    0.0)[:, None]
  d_searched = jnp.minimum(lam, d) * toward_one + jnp.maximum(-lam, d) * (1 - toward_one)
  d = jnp.where(below_smallest[:, None], d_all, jnp.where(searched[:, None], d_searched, d))
  return d * nonzero


def project_l2_hyperplane(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Per row, the d of least ||d||_2 with <w, t + d> = b and 0 <= t + d <= 1 (where the
  box allows it; otherwise the box corner closest to the hyperplane), rows of (M, D).

  With the sign chosen so that c = <w, t> - b >= 0, the minimiser is
  d(lambda) = clip(-lambda w, -t, 1 - t) for the lambda >= 0 with <w, d(lambda)> = -c
  (KKT). <w, d(lambda)> falls piecewise linearly in lambda, bending where coordinate i
  reaches its box face, at r_i = |face_i| / |w_i|; it is evaluated at the sorted r, the
  segment holding -c found, and lambda solved on it (the reference reaches the same point
  through a binary search)."""
  c = jnp.sum(w * t, axis=1) - b
  side = jnp.where(c >= 0, 1.0, -1.0)
  w, c = w * side[:, None], c * side
  nonzero = w != 0
  face = jnp.where(w > 0, -t, 1.0 - t)  # Where -lambda w_i stops.
  r = jnp.where(nonzero, face / jnp.where(nonzero, -w, 1.0), jnp.inf)
  order = jnp.argsort(r, axis=1)
  r_sorted = _take(r, order)
  w2 = _take(w * w, order)
  saturated = _take(jnp.where(nonzero, w * face, 0.0), order)
  total = jnp.sum(w * w, axis=1, keepdims=True)
  a_incl, w2_incl = jnp.cumsum(saturated, axis=1), jnp.cumsum(w2, axis=1)
  # <w, d> at each breakpoint: the coordinates before it saturated, the rest at -lambda w.
  at_break = (a_incl - saturated) - jnp.where(jnp.isfinite(r_sorted), r_sorted, 0.0) * (
      total - (w2_incl - w2))
  passed = jnp.sum(jnp.isfinite(r_sorted) & (at_break + c[:, None] >= 0), axis=1)
  k = jnp.maximum(passed - 1, 0)[:, None]
  remaining = (total - _take(w2_incl, k))[:, 0]
  lam_segment = jnp.where(remaining > 0,
                          (_take(a_incl, k)[:, 0] + c) / jnp.where(remaining > 0, remaining, 1.0),
                          jnp.inf)
  lam = jnp.where(passed == 0, c / jnp.maximum(total[:, 0], 1e-30), lam_segment)
  d = jnp.clip(-lam[:, None] * jnp.where(nonzero, w, 0.0), -t, 1.0 - t)
  return jnp.where(nonzero, d, 0.0)


PROJECTIONS = {"linf": project_linf_hyperplane, "l2": project_l2_hyperplane}


def _distance(v: jax.Array, norm: str) -> jax.Array:
  """Per row of (M, D): ||v||_inf or ||v||_2."""
  if norm == "linf":
    return jnp.max(jnp.abs(v), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=1))


def _fab_run(model_fn: ModelFn, x: jax.Array, labels: jax.Array, targets: jax.Array,
             x_start: jax.Array, *, steps: int, alpha_max: float, eta: float, beta: float,
             unroll: int, norm: str = "linf") -> tuple[jax.Array, jax.Array]:
  """One FAB-T run: (closest adversarial point found or x, its distance or 1e10)."""
  n = x.shape[0]
  x0 = x.reshape(n, -1)
  project_hyperplane = PROJECTIONS[norm]

  def difference(v):
    z = model_fn(v).logits.astype(jnp.float32)
    return _take(z, targets[:, None])[:, 0] - _take(z, labels[:, None])[:, 0]

  def body(_, s):
    x1, adv, dist_best = s
    df, pullback = jax.vjp(difference, x1)
    w = pullback(jnp.ones_like(df))[0].reshape(n, -1)
    b = -df + jnp.sum(w * x1.reshape(n, -1), axis=1)
    d3 = project_hyperplane(jnp.concatenate([x1.reshape(n, -1), x0]),
                            jnp.concatenate([w, w]), jnp.concatenate([b, b]))
    a0 = jnp.maximum(_distance(d3, norm), 1e-8)
    a1, a2 = a0[:n], a0[n:]
    alpha = per_point(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max), x.ndim)
    d1, d2 = d3[:n].reshape(x.shape), d3[n:].reshape(x.shape)
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0.0, 1.0)
    is_adv = ~predicts(model_fn(x1).logits, labels)
    dist = _distance((x1 - x).reshape(n, -1), norm)
    closer = is_adv & (dist < dist_best)
    adv = jnp.where(per_point(closer, x.ndim), x1, adv)
    dist_best = jnp.where(closer, dist, dist_best)
    x1 = jnp.where(per_point(is_adv, x.ndim), x + (x1 - x) * beta, x1)
    return x1, adv, dist_best

  init = (x_start, x, jnp.full((n,), 1e10, jnp.float32))
  _, adv, dist_best = jax.lax.fori_loop(0, steps, body, init, unroll=unroll)
  return adv, dist_best


def fab_targeted(model_fn: ModelFn, x: jax.Array, labels: jax.Array, key: jax.Array, *,
                 eps, norm: str = "linf", steps: int = 100, n_target: int = 9,
                 restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, active: jax.Array | None = None,
                 unroll: int | None = None) -> jax.Array:
  """FAB-T (L-inf or L2): the adversarial points (inside the eps-ball), x where not fooled.

  Each of the n_target targets gets `restarts` runs on the points not yet fooled; restarts
  after the first start from x + eps/2 t / ||t||, t ~ U[-1, 1] (L-inf) or N(0, I) (L2)."""
  check_eps(eps)
  check_norm(norm, NORMS, "fab_targeted")
  check_positive("steps", steps)
  if not isinstance(restarts, (int, np.integer)) or restarts < 0:
    raise ValueError(f"restarts must be an integer >= 0, got {restarts!r}")
  x = x.astype(jnp.float32)
  forward = make_forward(model_fn, False)
  check_n_target(n_target, num_classes(forward, x, None), "fab_targeted")
  keys, _ = example_keys(key, x.shape[0], None, False)
  unroll = default_unroll(steps) if unroll is None else unroll

  def run_fn(r, run_keys, run_model_key, x, attacked):
    del run_model_key, attacked
    targets = target_classes(model_fn(x).logits, 2 + r // restarts)
    x_start = jnp.where(r % restarts > 0, random_start(run_keys, x, eps / 2, norm), x)
    adv, dist = _fab_run(model_fn, x, labels, targets, x_start, steps=steps,
                         alpha_max=alpha_max, eta=eta, beta=beta, unroll=unroll, norm=norm)
    adv = jnp.where(per_point(dist < 1e10, x.ndim), adv, x)
    still_correct = predicts(model_fn(adv).logits, labels) | \
        (_distance((adv - x).reshape(x.shape[0], -1), norm) > eps)
    return project(adv, x, eps, norm), still_correct
  return run_on_robust(forward, x, labels, keys, None, active, n_target * restarts,
                              run_fn)
