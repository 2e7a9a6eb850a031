"""CAS: Channel-wise Activation Suppressing (Bai et al., ICLR 2021), docs/method.md section 1."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdefense.defenses import outputs


class CAS(nn.Module):
  """Class-indexed channel mask driven by an auxiliary linear head.

  g = mean_{H,W}(f);  a = g W^T + b;  M = W[y];  output f * M[:, None, None, :].
  y is the ground-truth label in training mode and argmax(a) in eval mode. The raw head
  weights are the mask (no normalisation), as in the authors' code. Returns (output, a).
  """
  num_classes: int
  inits: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f: jax.Array, labels: jax.Array | None, *, train: bool):
    channels = f.shape[-1]
    kernel = self.param("kernel", self.inits.dense_kernel, (channels, self.num_classes))
    bias = self.param("bias", self.inits.dense_bias(channels), (self.num_classes,))
    kernel = kernel.astype(self.dtype)
    pooled = jnp.mean(f, axis=(1, 2))
    logits = pooled @ kernel + bias.astype(self.dtype)
    index = labels if train else jnp.argmax(logits, axis=-1)
    mask = jnp.take(kernel, index, axis=1).T  # (N, C): row W[y] of the PyTorch (K, C) weight.
    self.sow("intermediates", "mask", mask)
    return f * mask[:, None, None, :], logits


def aux_loss(aux: dict[str, jax.Array], labels: jax.Array, *, beta: float):
  """beta * mean_k CE(a_k, y) over the CAS modules k, per example."""
  ces = [optax.softmax_cross_entropy_with_integer_labels(v.astype(jnp.float32), labels)
         for v in outputs.of(aux, "cas")]
  if not ces:
    raise ValueError("defense 'cas' is configured but the model produced no CAS outputs")
  ce = sum(ces) / len(ces)
  return beta * ce, {"cas_ce": ce}
