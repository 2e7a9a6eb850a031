"""Attacks on models as deployed (eval mode, gradients through the defense's masks).

Modules: `projected_gradient` (FGSM, PGD, uniform start, EOT gradient), `auto_pgd` (APGD,
APGD-T), `fab` (FAB-T), `square_attack` (Square), `auto_attack` (AutoAttack), `losses`,
and `common` (what they share: norms, the eps-ball projection, checks, per-example keys,
runs on the robust points). Use the functions through this package: `attacks.pgd(...)`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdefense.attacks import losses
from jaxdefense.attacks.auto_attack import AutoAttackResult, autoattack
from jaxdefense.attacks.auto_pgd import apgd, apgd_checkpoints, apgd_targeted, step_size_halving
from jaxdefense.attacks.common import ModelFn, project
from jaxdefense.attacks.fab import fab_targeted
from jaxdefense.attacks.projected_gradient import (PGDTrace, fgsm, input_gradient, pgd, pgd_trace,
                                                  uniform_start)
from jaxdefense.attacks.square_attack import square


def deployed(model: Any, variables: Any) -> ModelFn:
  """The model as deployed: eval mode (BN running statistics, CAS mask from its own
  prediction, FSR's fixed U = 0.5 Gumbel mask)."""
  return lambda x: model.apply(variables, x, train=False)


def correct_points(model: Any, variables: Any, x_adv: jax.Array,
                   labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per point, whether the deployed model classifies x' correctly, and whether x' and its
  logits are finite. A point where the attack went non-finite (NaN gradients make NaN
  steps) is never counted correct: argmax of NaN logits would pick a class anyway."""
  logits = deployed(model, variables)(x_adv).logits
  finite = (jnp.all(jnp.isfinite(logits), axis=-1)
            & jnp.all(jnp.isfinite(x_adv), axis=tuple(range(1, x_adv.ndim))))
  return (jnp.argmax(logits, -1) == labels) & finite, finite


class PassCounter:
  """Forward and backward passes through a model inside compiled attacks, one per example
  and call as adv-lib reports them, counted on the host by debug callbacks (run in the
  compiled loops, asynchronously: read the counts after `jax.effects_barrier()`).
  `wrap(model_fn)` counts the calls of `model_fn(x, *rest)`."""

  def __init__(self):
    self.forward = 0
    self.backward = 0

  def _add(self, kind: str, n: int) -> None:
    setattr(self, kind, getattr(self, kind) + n)

  def wrap(self, model_fn: Callable[..., Any]) -> Callable[..., Any]:
    def counted(x, *rest):
      n = x.shape[0]
      fn = lambda v: model_fn(v, *rest)

      @jax.custom_vjp
      def call(v):
        jax.debug.callback(functools.partial(self._add, "forward", n))
        return fn(v)

      def forward(v):
        jax.debug.callback(functools.partial(self._add, "forward", n))
        return jax.vjp(fn, v)

      def backward(vjp, cotangent):
        jax.debug.callback(functools.partial(self._add, "backward", n))
        return vjp(cotangent)

      call.defvjp(forward, backward)
      return call(x)
    return counted


def make(model: Any, attack: Callable[..., jax.Array], **options) -> Callable[..., jax.Array]:
  """A jit-compiled `(variables, x, labels, key) -> x_adv` for standalone use, e.g.
  `attacks.make(model, attacks.pgd, eps=8/255, step_size=2/255, steps=10)`."""
  @jax.jit
  def run(variables, x, labels, key=None):
    fn = deployed(model, variables)
    if attack is fgsm:
      return fgsm(fn, x, labels, **options)
    return attack(fn, x, labels, key, **options)
  return run


__all__ = ["AutoAttackResult", "ModelFn", "PGDTrace", "PassCounter", "apgd", "apgd_checkpoints",
           "apgd_targeted", "autoattack", "deployed", "fab_targeted", "fgsm", "input_gradient",
           "losses", "make", "pgd", "pgd_trace", "project", "square", "step_size_halving",
           "uniform_start"]
