"""FAB-T: targeted Fast Adaptive Boundary attack, L-inf, L2 and L1 (Croce & Hein, ICML 2020).

Follows the reference implementation (github fra31/auto-attack, `fab_base.py`, `fab_pt.py`,
`fab_projections.py`): at x_k the decision boundary between the true class y and the target
t is linearised, f_t - f_y + <grad(f_t - f_y), v - x_k> = 0, and both x_k and the clean x
are projected onto it (box-constrained, minimal L-inf, L2 or L1 norm). The step is the convex
combination

  x_{k+1} = clip01((1 - alpha)(x_k + eta d_k) + alpha (x + eta d_0)),
  alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max),

and a point that became adversarial is kept if closer to x than the best so far and pulled
back towards x: x_{k+1} <- x + beta (x_{k+1} - x). Targets are the 2nd..(n_target+1)th most
likely clean classes; a point counts as fooled when its closest adversarial point lies in
the eps-ball. Masked execution and per-example keys as in `auto_pgd.apgd`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdefense.attacks.common import (
    ModelFn, bisect_decreasing, check_eps, check_n_target, check_norm, check_positive,
    check_restarts, example_keys, loop_unroll, make_forward, num_classes, per_example_norm,
    per_point, predicts, project, random_start, run_on_robust, target_classes)


def _take(v: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(v, index, axis=1)


def project_linf_hyperplane(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Per row, the d of least ||d||_inf with <w, t + d> = b and 0 <= t + d <= 1 (where the
  box allows it; otherwise the box corner closest to the hyperplane), rows of (M, D).

  With the sign chosen so that <w, t> >= b, moving every coordinate by min(lambda, p_i)
  towards its box face p_i away changes <w, .> by g(lambda) = -sum_i |w_i| min(lambda, p_i),
  piecewise linear and decreasing; the reference finds the segment holding g = b - <w, t>
  by a binary search over the sorted p, here the same segment is bracketed by bisection on
  lambda (the p_i above it stay unsaturated) and lambda solved on it, as the reference does."""
  side = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0)
  w = w * side[:, None]
  toward_one = (w < 0).astype(t.dtype)
  nonzero = (w != 0).astype(t.dtype)
  sign = 2 * toward_one - 1
  p = toward_one - t * sign  # Distance to the face that lowers <w, .>.
  weight = jnp.abs(w)
  change = b * side - jnp.sum(w * t, axis=1)  # <= 0: what <w, .> must change by.
  full = -jnp.sum(weight * p, axis=1)  # The change with every coordinate at its face.
  total = jnp.sum(weight, axis=1)
  smallest_p = jnp.min(p, axis=1)
  below_smallest = change > -total * smallest_p  # Even lambda = min p overshoots.
  searched = (change - full > 0) & ~below_smallest

  g = lambda lam: -jnp.sum(weight * jnp.minimum(lam[:, None], p), axis=1)
  # Rows not searched start converged (lo = hi): the loop runs for the searched ones only.
  lo, hi = bisect_decreasing(g, change, jnp.where(searched, smallest_p, 0.0),
                   jnp.where(searched, jnp.max(p, axis=1), 0.0))
  free = p > lo[:, None]  # Unsaturated on the segment: p_i >= hi.
  lam = jnp.maximum((-jnp.sum(jnp.where(free, 0.0, weight * p), axis=1) - change)
                    / jnp.maximum(jnp.sum(jnp.where(free, weight, 0.0), axis=1), 1e-30), 0.0)
  lam_all = jnp.maximum(-change / total, 0.0)
  d = jnp.where(below_smallest[:, None], sign * lam_all[:, None],
                jnp.where(searched[:, None], sign * jnp.minimum(lam[:, None], p), sign * p))
  return d * nonzero


def project_l2_hyperplane(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Per row, the d of least ||d||_2 with <w, t + d> = b and 0 <= t + d <= 1 (where the
  box allows it; otherwise the box corner closest to the hyperplane), rows of (M, D).

  With the sign chosen so that c = <w, t> - b >= 0, the minimiser is
  d(lambda) = clip(-lambda w, -t, 1 - t) for the lambda >= 0 with <w, d(lambda)> = -c
  (KKT). <w, d(lambda)> falls piecewise linearly in lambda, bending where coordinate i
  reaches its box face, at r_i = |face_i| / |w_i|; the segment holding -c is bracketed by
  bisection on lambda and lambda solved on it (the reference reaches the same point
  through a binary search over the sorted r)."""
  c = jnp.sum(w * t, axis=1) - b
  side = jnp.where(c >= 0, 1.0, -1.0)
  w, c = w * side[:, None], c * side
  nonzero = w != 0
  face = jnp.where(w > 0, -t, 1.0 - t)  # Where -lambda w_i stops.
  r = jnp.where(nonzero, face / jnp.where(nonzero, -w, 1.0), jnp.inf)
  largest_r = jnp.max(jnp.where(nonzero, r, 0.0), axis=1)
  w_face = jnp.where(nonzero, w * face, 0.0)
  reachable = jnp.sum(w_face, axis=1) <= -c  # Every coordinate at its face reaches the plane.

  h = lambda lam: jnp.sum(jnp.where(r <= lam[:, None], w_face, -lam[:, None] * w * w), axis=1)
  lo, hi = bisect_decreasing(h, -c, jnp.zeros_like(c), jnp.where(reachable, largest_r, 0.0))
  free = nonzero & (r > lo[:, None])
  remaining = jnp.sum(jnp.where(free, w * w, 0.0), axis=1)
  lam = jnp.where(remaining > 0,
                  (jnp.sum(jnp.where(free, 0.0, w_face), axis=1) + c)
                  / jnp.where(remaining > 0, remaining, 1.0), hi)
  lam = jnp.where(reachable, lam, jnp.inf)
  d = jnp.clip(-lam[:, None] * jnp.where(nonzero, w, 0.0), -t, 1.0 - t)
  return jnp.where(nonzero, d, 0.0)


def project_l1_hyperplane(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Per row, the d of least ||d||_1 with <w, t + d> = b and 0 <= t + d <= 1 (where the
  box allows it; otherwise the box corner closest to the hyperplane), rows of (M, D).

  With the sign chosen so that c = <w, t> - b >= 0, moving coordinate i to the face that
  lowers <w, .> changes it by s_i = min(-w_i t_i, w_i (1 - t_i)) at a cost of
  r_i = 1 / |w_i| per unit change: the cheapest coordinates (smallest r) move whole, in
  order, until the next one, moved part way, closes the remaining gap (the reference sorts
  by r and binary-searches the cumulative sums; here the r at which the gap closes is
  bracketed by bisection and the coordinates with that r share the partial move). Entries
  with |w_i| <= 1e-8 are left at zero, as in the reference."""
  c = jnp.sum(w * t, axis=1) - b
  side = jnp.where(c >= 0, 1.0, -1.0)
  w, c = w * side[:, None], c * side
  nonzero = w != 0
  face = jnp.where(w < 0, 1.0 - t, -t) * nonzero  # The move to the lowering face.
  change = jnp.minimum(-w * t, w * (1.0 - t))     # <= 0: what that move does to <w, .>.
  r = jnp.where(nonzero, 1.0 / jnp.abs(jnp.where(nonzero, w, 1.0)), jnp.inf)
  gap = lambda rho: c + jnp.sum(jnp.where(r <= rho[:, None], change, 0.0), axis=1)
  largest_r = jnp.max(jnp.where(nonzero, r, 0.0), axis=1)
  reachable = (c + jnp.sum(change, axis=1) < 0) & (c > 0)
  lo, hi = bisect_decreasing(gap, jnp.zeros_like(c), jnp.zeros_like(c),
                             jnp.where(reachable, largest_r, 0.0))
  whole = r <= lo[:, None]
  partial = nonzero & ~whole & (r <= hi[:, None])
  share = gap(lo) / jnp.maximum(-jnp.sum(jnp.where(partial, change, 0.0), axis=1), 1e-30)
  d = jnp.where(whole, face, jnp.where(partial, face * share[:, None], 0.0))
  d = jnp.where(reachable[:, None], d, jnp.where((c > 0)[:, None], face, 0.0))
  return d * (jnp.abs(w) > 1e-8)


PROJECTIONS = {"linf": project_linf_hyperplane, "l2": project_l2_hyperplane,
               "l1": project_l1_hyperplane}


def fab_random_start(keys: jax.Array, x: jax.Array, radius, norm: str) -> jax.Array:
  """FAB's restart point: clip01(x + radius t / ||t||), t ~ U[-1, 1]^D (L-inf) or N(0, I)
  (L2, L1; the reference's, with no epsilon in the division under L1)."""
  if norm != "l1":
    return random_start(keys, x, radius, norm)
  t = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
  return jnp.clip(x + radius * t / per_example_norm(t, "l1"), 0.0, 1.0)


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
    a0 = jnp.maximum(per_example_norm(d3, norm, keepdims=False), 1e-8)
    a1, a2 = a0[:n], a0[n:]
    alpha = per_point(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max), x.ndim)
    d1, d2 = d3[:n].reshape(x.shape), d3[n:].reshape(x.shape)
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0.0, 1.0)
    is_adv = ~predicts(model_fn(x1).logits, labels)
    dist = per_example_norm((x1 - x).reshape(n, -1), norm, keepdims=False)
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
                 unroll: int | None = None, chunks: int = 1) -> jax.Array:
  """FAB-T (L-inf, L2 or L1): the adversarial points (inside the eps-ball), x where not fooled.

  Each of the n_target targets gets `restarts` runs on the points not yet fooled; restarts
  after the first start from x + eps/2 t / ||t||, t ~ U[-1, 1] (L-inf) or N(0, I) (L2, L1);
  `chunks`: those points gathered, see `common.run_on_robust`."""
  check_eps(eps)
  check_norm(norm, attack="fab_targeted")
  check_positive("steps", steps)
  check_restarts(restarts)
  x = x.astype(jnp.float32)
  forward = make_forward(model_fn, False)
  check_n_target(n_target, num_classes(forward, x, None), "fab_targeted")
  keys, _ = example_keys(key, x.shape[0], None, False)
  unroll = loop_unroll(steps, unroll)

  def run_fn(r, run_keys, run_model_key, x, labels, attacked):
    del run_model_key, attacked
    targets = target_classes(model_fn(x).logits, 2 + r // restarts)
    x_start = jnp.where(r % restarts > 0, fab_random_start(run_keys, x, eps / 2, norm), x)
    adv, dist = _fab_run(model_fn, x, labels, targets, x_start, steps=steps,
                         alpha_max=alpha_max, eta=eta, beta=beta, unroll=unroll, norm=norm)
    adv = jnp.where(per_point(dist < 1e10, x.ndim), adv, x)
    still_correct = predicts(model_fn(adv).logits, labels) | \
        (per_example_norm((adv - x).reshape(x.shape[0], -1), norm, keepdims=False) > eps)
    return project(adv, x, eps, norm), still_correct
  return run_on_robust(forward, x, labels, keys, None, active, n_target * restarts, run_fn,
                       chunks)
