"""FGSM and PGD under L-inf and L2 (Goodfellow et al. 2015; Madry et al. 2018), their
uniform random start and the EOT gradient (Athalye et al. 2018).

Attacks are pure, traceable functions of a `model_fn: x -> ModelOutput` (the model as
deployed, parameters closed over) and are meant to be called inside `jax.jit` (the train
and eval steps do; `attacks.make` wraps one for standalone use). The whole step loop is
one XLA loop. The result lies in the eps-ball around x and in [0, 1] exactly, in the
float32 arithmetic a user checks it with (`common.project`).
"""
from __future__ import annotations

from typing import Callable

import flax
import jax
import jax.numpy as jnp

from jaxdefense.attacks import losses
from jaxdefense.attacks.common import (
    ModelFn, ascent_direction, check_eps, check_norm, loop_unroll, per_example_norm, project)
from jaxdefense.models.common import ModelOutput


def input_gradient(model_fn: ModelFn, loss_fn: losses.LossFn, x: jax.Array,
                   labels: jax.Array) -> jax.Array:
  """d sum_i loss_i / d x: per-example input gradients (examples are independent in eval mode)."""
  return jax.grad(lambda v: jnp.sum(loss_fn(model_fn(v), labels)))(x)


def uniform_start(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """A uniform point of the L-inf ball, x + eps U[-1, 1]^D, or a uniform point of the L2
  ball, x + eps u^(1/D) z / ||z||_2 with z ~ N(0, I), u ~ U[0, 1]; projected into [0, 1]."""
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0) * eps
  else:
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, x.shape, jnp.float32)
    direction = direction / per_example_norm(direction, "l2")
    dim = x[0].size
    radius = jax.random.uniform(radius_key, (x.shape[0],) + (1,) * (x.ndim - 1)) ** (1 / dim)
    delta = direction * radius * eps
  return project(x + delta, x, eps, norm)


def _check(eps, steps: int, norm: str) -> None:
  check_norm(norm)
  check_eps(eps)
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")


def fgsm(model_fn: ModelFn, x: jax.Array, labels: jax.Array, *, eps,
         norm: str = "linf", loss: losses.LossFn = losses.cross_entropy) -> jax.Array:
  """One step of size eps along the loss gradient's sign (L-inf) or direction (L2):
  x' = P(x + eps sign(g)), resp. P(x + eps g / max(||g||_2, 1e-12))."""
  _check(eps, 1, norm)
  x = x.astype(jnp.float32)
  grad = input_gradient(model_fn, loss, x, labels)
  return project(x + eps * ascent_direction(grad, norm, guard="max"), x, eps, norm)


def eot_gradient(model_fn: Callable[[jax.Array, jax.Array], ModelOutput],
                 loss_fn: losses.LossFn, x: jax.Array, labels: jax.Array, key: jax.Array,
                 samples: int) -> jax.Array:
  """Expectation over transformation (Athalye et al. 2018): the input gradient averaged
  over `samples` draws of a stochastic model `model_fn(x, key)`,
  (1/S) sum_s d loss(model_fn(x, fold_in(key, s))) / d x."""
  def add(i, total):
    sample_fn = lambda v: model_fn(v, jax.random.fold_in(key, i))
    return total + input_gradient(sample_fn, loss_fn, x, labels)
  return jax.lax.fori_loop(0, samples, add, jnp.zeros_like(x)) / samples


def pgd(model_fn: ModelFn, x: jax.Array, labels: jax.Array, key: jax.Array | None = None, *,
        eps, step_size, steps: int, norm: str = "linf", random_start: bool = True,
        loss: losses.LossFn = losses.cross_entropy, x_init: jax.Array | None = None,
        eot_samples: int = 0, unroll: int | None = None) -> jax.Array:
  """Projected gradient ascent on `loss`:
  x_{t+1} = P_{B(x, eps) ∩ [0,1]}(x_t + step_size * sign(grad))  (L-inf; L2 uses
  grad / max(||grad||_2, 1e-12)), from `x_init` (projected; e.g. TRADES' x + 0.001 N(0, 1))
  if given, else from a uniform random point of the ball (`random_start`, needs `key`),
  else from x.

  `eot_samples > 0` attacks a stochastic model `model_fn(x, key)` with each step's gradient
  averaged over that many fresh draws (needs `key`). `unroll`: the loop's unrolling
  (default `common.default_unroll(steps)`)."""
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
    return project(x_adv + step_size * ascent_direction(grad, norm, guard="max"), x, eps,
                   norm)

  return jax.lax.fori_loop(0, steps, step, x_adv, unroll=loop_unroll(steps, unroll))


@flax.struct.dataclass
class PGDTrace:
  """A PGD run, iterate by iterate: x_adv is x_T (what `pgd` returns); loss[t] and
  misclassified[t] are the attack loss at x_t and whether the model misclassifies x_t,
  t = 0..T, each (T + 1, N)."""
  x_adv: jax.Array
  loss: jax.Array
  misclassified: jax.Array


def pgd_trace(model_fn: ModelFn, x: jax.Array, labels: jax.Array, key: jax.Array | None = None,
              *, eps, step_size, steps: int, norm: str = "linf", random_start: bool = True,
              loss: losses.LossFn = losses.cross_entropy, unroll: int | None = None
              ) -> PGDTrace:
  """`pgd` (no EOT) recording each iterate's loss and prediction (the indicators of attack
  failure read them: `jaxdefense.evaluation.indicators`); x_adv equals `pgd`'s result. One forward
  pass more than `pgd` (at x_T)."""
  _check(eps, steps, norm)
  if random_start and key is None:
    raise ValueError("pgd_trace with random_start=True needs a PRNG key")
  x = x.astype(jnp.float32)
  x_adv = uniform_start(key, x, eps, norm) if random_start else x

  def evaluate(v):
    def total(v):
      output = model_fn(v)
      per_point = loss(output, labels)
      return jnp.sum(per_point), (per_point, output.logits)
    (_, (value, logits)), grad = jax.value_and_grad(total, has_aux=True)(v)
    return value, jnp.argmax(logits, -1) != labels, grad

  value, wrong, grad = evaluate(x_adv)
  n = x.shape[0]
  trace = (jnp.zeros((steps + 1, n), jnp.float32).at[0].set(value),
           jnp.zeros((steps + 1, n), bool).at[0].set(wrong))

  def step(i, carry):
    x_adv, grad, (values, wrongs) = carry
    x_adv = project(x_adv + step_size * ascent_direction(grad, norm, guard="max"), x, eps,
                    norm)
    value, wrong, grad = evaluate(x_adv)
    return x_adv, grad, (values.at[i + 1].set(value), wrongs.at[i + 1].set(wrong))

  x_adv, _, (values, wrongs) = jax.lax.fori_loop(0, steps, step, (x_adv, grad, trace),
                                                 unroll=loop_unroll(steps, unroll))
  return PGDTrace(x_adv=x_adv, loss=values, misclassified=wrongs)
