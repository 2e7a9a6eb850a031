"""Adversarial weight perturbation (AWP; Wu et al., NeurIPS 2020, github csdongxian/AWP).

Before each update the weights are moved layer-wise in the direction that increases the
training loss on the step's adversarial examples x', the update is computed and applied at
the moved weights, and the move is taken back (`AT_AWP/train_cifar10.py:338-363`,
`trades_AWP/train_trades_cifar.py:177-206`):

```
d   = w_proxy - w = proxy_lr * grad_w L(w; x')      one SGD ascent step of a proxy copy
v_l = gamma * ||w_l|| * d_l / (||d_l|| + 1e-20)     per tensor with ndim > 1; 0 for the rest
w  <- (w + v) + SGD(grad_w L(w + v; x'), at w + v) - v
```

(`utils_awp.py:8-26`: `diff_in_weights`, `add_into_weights`.) The proxy's loss is the
training loss in train mode (AT: CE(f(x'), y); TRADES: CE(f(x), y) + beta KL(f(x) || f(x'))),
its BatchNorm statistics discarded; the optimizer's weight decay and momentum see the
perturbed weights w + v, as torch.optim.SGD does. The train step, with an `Objective`:

```
x_adv = objective.attack(params, batch_stats, batch, key)
loss_at = lambda p: objective.loss(p, batch_stats, batch, x_adv, key)
v = awp.perturbation(lambda p: loss_at(p)[0], params, gamma=gamma, active=step >= warmup)
perturbed = awp.perturb(params, v)
(_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_at, has_aux=True)(perturbed)
updates, opt_state = tx.update(grads, opt_state, perturbed)
params = awp.restore(optax.apply_updates(perturbed, updates), v)
```
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

EPS = 1e-20  # utils_awp.py:5
Params = Any


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def perturbation(loss_fn: Callable[[Params], jax.Array], params: Params, *, gamma: float,
                 proxy_lr: float = 0.01, active: jax.Array | bool = True) -> Params:
  """The weight perturbation v (params-shaped): d = proxy_lr * grad(loss_fn)(params), v_l =
  gamma ||w_l|| d_l / (||d_l|| + 1e-20) for every tensor with ndim > 1, 0 for the others
  (biases, BatchNorm scales and offsets). `proxy_lr` is the proxy's SGD rate (AT_AWP: 0.01,
  trades_AWP: the model's lr; it only matters through the 1e-20). v = 0, and the gradient is
  not computed, where `active` (a traced boolean, e.g. past the warm-up) is false."""
  def compute(p: Params) -> Params:
    grads = jax.grad(loss_fn)(p)

    def one(w: jax.Array, g: jax.Array) -> jax.Array:
      if w.ndim <= 1:
        return jnp.zeros_like(w)
      d = proxy_lr * g
      return gamma * _norm(w) / (_norm(d) + EPS) * d
    return jax.tree.map(one, p, grads)

  return jax.lax.cond(active, compute, lambda p: jax.tree.map(jnp.zeros_like, p), params)


def perturb(params: Params, v: Params) -> Params:
  """w + v: the weights at which the update is computed (`AdvWeightPerturb.perturb`)."""
  return jax.tree.map(lambda w, d: w + d, params, v)


def restore(params: Params, v: Params) -> Params:
  """w - v: the perturbation taken back after the update (`AdvWeightPerturb.restore`)."""
  return jax.tree.map(lambda w, d: w - d, params, v)
