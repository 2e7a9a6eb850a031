"""FGSM and PGD under L-inf and L2 (Goodfellow et al. 2015; Madry et al. 2018).

Attacks are pure, traceable functions of a `model_fn: x -> ModelOutput` (the model as
deployed, parameters closed over) and are meant to be called inside `jax.jit` (the train
and eval steps do; `attacks.make` wraps one for standalone use). The whole step loop is
one XLA loop. The result lies in the eps-ball around x and in [0, 1] exactly, in the
float32 arithmetic a user checks it with.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdefense.attacks import losses
from jaxdefense.models.common import ModelOutput

ModelFn = Callable[[jax.Array], ModelOutput]
NORMS = ("linf", "l2")


def input_gradient(model_fn: ModelFn, loss_fn: losses.LossFn, x: jax.Array,
                   labels: jax.Array) -> jax.Array:
  """d sum_i loss_i / d x: per-example input gradients (examples are independent in eval mode)."""
  return jax.grad(lambda v: jnp.sum(loss_fn(model_fn(v), labels)))(x)


def _per_example_norm(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


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


def accurate_l2_norm(v: jax.Array) -> jax.Array:
  """Per-example ||v_i||_2 (shaped to broadcast against v), the squares summed with a
  compensated (TwoSum) reduction: within about one float32 ulp of the exact norm."""
  squares = jnp.square(v.astype(jnp.float32))
  axes = tuple(range(1, v.ndim))
  zero = jnp.zeros((), jnp.float32)
  hi, lo = jax.lax.reduce((squares, jnp.zeros_like(squares)), (zero, zero), _two_sum, axes)
  return jnp.sqrt(hi + lo).reshape(v.shape[:1] + (1,) * (v.ndim - 1))


def project(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """Nearest point (L-inf: exactly; L2: radially, to radius eps (1 - 2^-19)) of the
  eps-ball around x, then [0, 1]."""
  if norm == "linf":
    lo, hi = linf_bounds(x, eps)
    return jnp.clip(jnp.clip(x_adv, lo, hi), 0.0, 1.0)
  radius = eps * (1 - L2_MARGIN)
  delta = x_adv - x
  delta = delta * jnp.minimum(1.0, radius / jnp.maximum(accurate_l2_norm(delta), 1e-12))

  # Rounding in x + delta can leave the ball by a few ulps: shrink those points until not.
  outside = lambda d: accurate_l2_norm(jnp.clip(x + d, 0.0, 1.0) - x) > radius
  delta = jax.lax.while_loop(lambda d: jnp.any(outside(d)),
                             lambda d: jnp.where(outside(d), d * (1 - L2_MARGIN), d), delta)
  return jnp.clip(x + delta, 0.0, 1.0)


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(_per_example_norm(grad), 1e-12)


def uniform_start(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """A uniform point of the L-inf ball, or a uniform point of the L2 ball, inside [0, 1]."""
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0) * eps
  else:
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, x.shape, jnp.float32)
    direction = direction / _per_example_norm(direction)
    dim = x[0].size
    radius = jax.random.uniform(radius_key, (x.shape[0],) + (1,) * (x.ndim - 1)) ** (1 / dim)
    delta = direction * radius * eps
  return project(x + delta, x, eps, norm)


def _check(eps, steps: int, norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
  if not isinstance(eps, jax.core.Tracer) and eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")


def fgsm(model_fn: ModelFn, x: jax.Array, labels: jax.Array, *, eps,
         norm: str = "linf", loss: losses.LossFn = losses.cross_entropy) -> jax.Array:
  """One step of size eps along the loss gradient's sign (L-inf) or direction (L2)."""
  _check(eps, 1, norm)
  x = x.astype(jnp.float32)
  grad = input_gradient(model_fn, loss, x, labels)
  return project(x + eps * _ascent_direction(grad, norm), x, eps, norm)


def default_unroll(steps: int) -> int:
  """Loop unrolling by measurement (benchmarks/RESULTS.md, ResNet-18 + FSR, batch 32, CPU):
  with `jaxdefense.conv`'s convolution a `fori_loop` runs as fast as unrolled code to within
  5% (PGD-10: 2.93 s at unroll 1, 2.78 s whole; PGD-50: 13.4 s at 1, 12.8 s at 10), so
  attacks of up to 20 steps are unrolled whole and longer ones by 10, which keeps compile
  times to seconds. Unmeasured on accelerators."""
  return max(steps, 1) if steps <= 20 else 10


def eot_gradient(model_fn: Callable[[jax.Array, jax.Array], ModelOutput],
                 loss_fn: losses.LossFn, x: jax.Array, labels: jax.Array, key: jax.Array,
                 samples: int) -> jax.Array:
  """Expectation over transformation (Athalye et al. 2018): the input gradient averaged
  over `samples` draws of a stochastic model `model_fn(x, key)`."""
  def add(i, total):
    sample_fn = lambda v: model_fn(v, jax.random.fold_in(key, i))
    return total + input_gradient(sample_fn, loss_fn, x, labels)
  return jax.lax.fori_loop(0, samples, add, jnp.zeros_like(x)) / samples


def pgd(model_fn: ModelFn, x: jax.Array, labels: jax.Array, key: jax.Array | None = None, *,
        eps, step_size, steps: int, norm: str = "linf", random_start: bool = True,
        loss: losses.LossFn = losses.cross_entropy, x_init: jax.Array | None = None,
        eot_samples: int = 0, unroll: int | None = None) -> jax.Array:
  """Projected gradient ascent on `loss`:
  x_{t+1} = P_{B(x, eps) ∩ [0,1]}(x_t + step_size * sign(grad))  (L-inf; L2 uses grad/||grad||),
  from `x_init` (projected; e.g. TRADES' x + 0.001 N(0, 1)) if given, else from a uniform
  random point of the ball (`random_start`, needs `key`), else from x.

  `eot_samples > 0` attacks a stochastic model `model_fn(x, key)` with each step's gradient
  averaged over that many fresh draws (needs `key`)."""
  _check(eps, steps, norm)
  if eot_samples < 0:
    raise ValueError(f"eot_samples must be >= 0, got {eot_samples}")
  if (random_start or eot_samples) and x_init is None and key is None:
    raise ValueError("pgd with random_start=True or eot_samples > 0 needs a PRNG key")
  x = x.astype(jnp.float32)
  if x_init is not None:
    x_adv = project(x_init.astype(jnp.float32), x, eps, norm)
  elif random_start:
    x_adv = uniform_start(key, x, eps, norm)
  else:
    x_adv = x

  def step(i, x_adv):
    if eot_samples:
      grad = eot_gradient(model_fn, loss, x_adv, labels, jax.random.fold_in(key, i + 1),
                          eot_samples)
    else:
      grad = input_gradient(model_fn, loss, x_adv, labels)
    return project(x_adv + step_size * _ascent_direction(grad, norm), x, eps, norm)

  unroll = default_unroll(steps) if unroll is None else unroll
  return jax.lax.fori_loop(0, steps, step, x_adv, unroll=unroll)
