"""FSR: Feature Separation and Recalibration (Kim et al., CVPR 2023), docs/method.md section 2."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdefense import convolution
from jaxdefense.defenses import outputs

EPS = 1e-8  # The authors' constant inside every log and beside tau.
PARTS = ("robust", "non_robust", "recalibrated")


def gumbel_sigmoid(scores: jax.Array, tau: float, key: jax.Array | None) -> jax.Array:
  """Soft robustness mask m from per-activation scores r (docs/method.md section 2.2).

  p = sigmoid(r); l1 = log(p + e) + G1; l2 = log(1 - p + e) + G2; G = -log(-log(U + e) + e);
  m = softmax([l1, l2] / tau)[0] = sigmoid((l1 - l2) / tau), the stable form, with the logs
  taken in log space.
  key=None fixes U = 0.5 (eval mode: G1 = G2 cancel); else U ~ Uniform(0, 1), independent
  for both logits and every activation. Computed in float32.
  """
  r = scores.astype(jnp.float32)
  # log(p + e) = logaddexp(log p, log e), with log p = log_sigmoid(r): exact, and finite in
  # value and gradient for saturated scores (the direct form's gradient is 0/0 = NaN under
  # XLA once sigmoid(r) rounds to 1).
  log_eps = jnp.log(jnp.float32(EPS))
  diff = (jnp.logaddexp(jax.nn.log_sigmoid(r), log_eps)
          - jnp.logaddexp(jax.nn.log_sigmoid(-r), log_eps))
  if key is not None:
    u1, u2 = jax.random.uniform(key, (2,) + r.shape, jnp.float32)
    gumbel = lambda u: -jnp.log(-jnp.log(u + EPS) + EPS)
    diff = diff + gumbel(u1) - gumbel(u2)
  return jax.nn.sigmoid(diff / (tau + EPS))


class ConvNet(nn.Module):
  """conv3x3(C->h) - BN - ReLU - conv3x3(h->h) - BN - ReLU - conv3x3(h->C), no biases."""
  hidden: int
  inits: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    channels = x.shape[-1]
    for width in (self.hidden, self.hidden):
      x = convolution.Conv(width, (3, 3), use_bias=False, kernel_init=self.inits.conv,
                           dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype)(x)
      x = nn.relu(x)
    return convolution.Conv(channels, (3, 3), use_bias=False, kernel_init=self.inits.conv,
                   dtype=self.dtype)(x)


class FSR(nn.Module):
  """Separation, Gumbel-sigmoid mask, Recalibration and the shared auxiliary head.

  r = S(f); m = gumbel_sigmoid(r); f_r = f m; f_nr = f (1 - m);
  f_rec = f_nr + R(f_nr) (1 - m); output f_r + f_rec.
  Returns (output, {"robust", "non_robust", "recalibrated"} logits of the shared head h
  on the global average pools of f_r, f_nr, f_rec).
  """
  num_classes: int
  inits: Any
  tau: float = 0.1
  hidden: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f: jax.Array, *, train: bool, stochastic: bool):
    scores = ConvNet(self.hidden, self.inits, self.dtype, name="separation")(f, train=train)
    key = self.make_rng("gumbel") if stochastic else None
    mask = gumbel_sigmoid(scores, self.tau, key).astype(f.dtype)
    robust = f * mask
    non_robust = f * (1 - mask)
    recal = ConvNet(self.hidden, self.inits, self.dtype, name="recalibration")(
        non_robust, train=train)
    recalibrated = non_robust + recal * (1 - mask)
    head = nn.Dense(self.num_classes, kernel_init=self.inits.dense_kernel,
                    bias_init=self.inits.dense_bias(f.shape[-1]), dtype=self.dtype, name="head")
    self.sow("intermediates", "mask", mask)
    parts = {name: head(jnp.mean(v, axis=(1, 2)))
             for name, v in zip(PARTS, (robust, non_robust, recalibrated))}
    return robust + recalibrated, parts


def most_likely_wrong(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The main head's top class if it is wrong, else its second-ranked class."""
  top2 = jax.lax.top_k(logits, 2)[1]
  return jnp.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])


def aux_loss(logits: jax.Array, aux: dict[str, jax.Array], labels: jax.Array, *,
             lam_sep: float, lam_rec: float):
  """lam_sep (CE(h(f_r), y) + CE(h(f_nr), y_wrong)) + lam_rec CE(h(f_rec), y), per example,
  averaged over the FSR modules (as the authors' training loop does)."""
  sites = outputs.fsr_sites(aux)
  if not sites:
    raise ValueError("defense 'fsr' is configured but the model produced no FSR outputs")
  y_wrong = most_likely_wrong(logits, labels)
  ce = lambda site, part, y: optax.softmax_cross_entropy_with_integer_labels(
      aux[outputs.aux_key("fsr", site, part)].astype(jnp.float32), y)
  robust = sum(ce(s, "robust", labels) for s in sites) / len(sites)
  non_robust = sum(ce(s, "non_robust", y_wrong) for s in sites) / len(sites)
  recal = sum(ce(s, "recalibrated", labels) for s in sites) / len(sites)
  loss = lam_sep * (robust + non_robust) + lam_rec * recal
  return loss, {"fsr_robust_ce": robust, "fsr_non_robust_ce": non_robust,
                "fsr_recalibrated_ce": recal}
