"""CIFS: Channel-wise Importance-based Feature Selection (Yan et al., ICML 2021), docs/cifs.md.

Written from the authors' code (github HanshuYAN/CIFS, models/nets/resnet_CIFS.py and
CIFAR10_Res18_CIFS.py), which the spec cites line by line.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdefense.defenses import outputs

PROBES = ("linear", "nonlinear")
SOFTPLUS_BETA = 5.0
SOFTPLUS_THRESHOLD = 20.0  # PyTorch's Softplus: linear where beta * x > threshold.


def softplus5(u: jax.Array) -> jax.Array:
  """PyTorch's Softplus(beta=5): log(1 + exp(5u)) / 5, and u where 5u > 20."""
  bu = SOFTPLUS_BETA * u
  return jnp.where(bu > SOFTPLUS_THRESHOLD, u, jax.nn.softplus(bu) / SOFTPLUS_BETA)


def select_classes(probe_logits: jax.Array, labels: jax.Array | None, train: bool,
                   topk: int = 2) -> jax.Array:
  """The classes (N, topk) whose probe logits define each example's relevance: in training
  the label and the probe's second-ranked class (the label counted twice when it is
  ranked second; the probe's top class unused when the label is not), in eval the probe's
  top two (docs/cifs.md section 2, step 2). No gradient."""
  ranked = jax.lax.top_k(jax.lax.stop_gradient(probe_logits), topk)[1]
  if train:
    return jnp.concatenate([labels[:, None].astype(ranked.dtype), ranked[:, 1:]], axis=1)
  return ranked


class CIFS(nn.Module):
  """Probe-driven channel mask (IMGF).

  g = mean_{H,W}(z); p = A(g) (the probe: linear g K + b, or nonlinear
  softplus5(g K1 + b1) K2 + b2); r = d/dg' [sum_c A(g')_c] at g' = stop_gradient(g) over
  the selected classes c; m = mask_scale * softmax_C(r); output z * m[:, None, None, :].
  The relevance is a `jax.vjp` of the probe at the pooled vector, so an outer gradient
  reaches the probe weights through the mask (second order, the authors'
  `create_graph=True`) and, with `mask_stop_gradient` (the authors'), never reaches z
  through it; `mask_stop_gradient=False` lets attacks see the mask's input dependence.
  Returns (output, p).
  """
  num_classes: int
  inits: Any
  probe: str = "linear"
  hidden: int = 128
  mask_scale: float = 1.0
  mask_stop_gradient: bool = True
  topk: int = 2
  dtype: Any = jnp.float32

  def _probe_fn(self, channels: int) -> tuple[Callable, Any]:
    """A pure function (params, g) -> probe logits, and its parameters (float32)."""
    inits, k = self.inits, self.num_classes
    if self.probe == "linear":
      params = (self.param("kernel", inits.dense_kernel, (channels, k)),
                self.param("bias", inits.dense_bias(channels), (k,)))
      return (lambda p, g: g @ p[0] + p[1]), params
    params = (self.param("hidden_kernel", inits.dense_kernel, (channels, self.hidden)),
              self.param("hidden_bias", inits.dense_bias(channels), (self.hidden,)),
              self.param("kernel", inits.dense_kernel, (self.hidden, k)),
              self.param("bias", inits.dense_bias(self.hidden), (k,)))
    return (lambda p, g: softplus5(g @ p[0] + p[1]) @ p[2] + p[3]), params

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array | None, *, train: bool):
    if self.probe not in PROBES:
      raise ValueError(f"unknown CIFS probe {self.probe!r}; allowed: {', '.join(PROBES)}")
    if not 1 <= self.topk <= self.num_classes:
      raise ValueError(f"CIFS topk must lie in [1, num_classes={self.num_classes}], "
                       f"got {self.topk}")
    fn, params = self._probe_fn(z.shape[-1])
    g = jnp.mean(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=(1, 2))
    logits = fn(params, g)
    at = jax.lax.stop_gradient(g) if self.mask_stop_gradient else g
    selected_logits, vjp = jax.vjp(lambda u: fn(params, u), at)
    classes = select_classes(selected_logits, labels, train, self.topk)
    cotangent = jnp.sum(jax.nn.one_hot(classes, self.num_classes,
                                       dtype=selected_logits.dtype), axis=1)
    relevance = vjp(cotangent)[0]
    mask = self.mask_scale * jax.nn.softmax(relevance, axis=-1)
    self.sow("intermediates", "mask", mask)
    return z * mask[:, None, None, :].astype(z.dtype), logits


def aux_loss(logits: jax.Array, aux: dict[str, jax.Array], labels: jax.Array, *,
             beta: float, rescale: bool):
  """The authors' joint loss, less the main CE that the objective adds: with
  s = 3 / (beta + 1) when `rescale` (CIFAR10_Res18_CIFS.py joint_CE_loss) else 1,
  s (CE(main) + beta mean_l CE(p_l)) - CE(main), per example; = beta mean_l CE(p_l) at
  the authors' beta = 2."""
  ces = [optax.softmax_cross_entropy_with_integer_labels(v.astype(jnp.float32), labels)
         for v in outputs.of(aux, "cifs")]
  if not ces:
    raise ValueError("defense 'cifs' is configured but the model produced no CIFS outputs")
  probe_ce = sum(ces) / len(ces)
  scale = 3.0 / (beta + 1.0) if rescale else 1.0
  main_ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return (scale - 1.0) * main_ce + scale * beta * probe_ce, {"cifs_ce": probe_ce}
