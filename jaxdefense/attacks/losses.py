"""Per-example attack losses, each `(ModelOutput, labels) -> (N,)`, maximised by attacks."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdefense import defenses
from jaxdefense.defenses import outputs
from jaxdefense.models.common import ModelOutput

LossFn = Callable[[ModelOutput, jax.Array], jax.Array]


def cross_entropy(output: ModelOutput, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(output.logits.astype(jnp.float32), labels)


def _true_and_best_other(logits: jax.Array, labels: jax.Array):
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return true, jnp.max(others, axis=-1)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{j != y} z_j: positive iff the point is classified correctly."""
  true, other = _true_and_best_other(logits.astype(jnp.float32), labels)
  return true - other


def cw(kappa: float = 50.0) -> LossFn:
  """The C&W margin loss -max(z_y - max_{j != y} z_j + kappa, 0) (FSR's test protocol)."""
  def loss(output: ModelOutput, labels: jax.Array) -> jax.Array:
    return -jax.nn.relu(margin(output.logits, labels) + kappa)
  return loss


def dlr(output: ModelOutput, labels: jax.Array) -> jax.Array:
  """Croce & Hein's DLR loss -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)."""
  z = output.logits.astype(jnp.float32)
  if z.shape[-1] < 3:
    raise ValueError(f"the DLR loss needs >= 3 classes, got {z.shape[-1]}")
  top = jax.lax.top_k(z, 3)[0]
  return -margin(z, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(targets: jax.Array) -> LossFn:
  """Targeted DLR -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)."""
  def loss(output: ModelOutput, labels: jax.Array) -> jax.Array:
    z = output.logits.astype(jnp.float32)
    if z.shape[-1] < 4:
      raise ValueError(f"the targeted DLR loss needs >= 4 classes, got {z.shape[-1]}")
    top = jax.lax.top_k(z, 4)[0]
    z_y = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
    z_t = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
  return loss


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(softmax(p) || softmax(q)) per example."""
  p_log = jax.nn.log_softmax(p_logits.astype(jnp.float32))
  q_log = jax.nn.log_softmax(q_logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def trades_kl(clean_logits: jax.Array) -> LossFn:
  """TRADES' inner loss KL(f(x) || f(x')) with the clean logits held fixed."""
  clean = jax.lax.stop_gradient(clean_logits)

  def loss(output: ModelOutput, labels: jax.Array) -> jax.Array:
    del labels
    return kl_divergence(clean, output.logits)
  return loss


def defense_loss(defense: defenses.DefenseConfig) -> LossFn:
  """The defense's full training loss CE(main) + auxiliary terms: the adaptive attack."""
  def loss(output: ModelOutput, labels: jax.Array) -> jax.Array:
    aux, _ = defenses.aux_loss(defense, output.logits, output.aux, labels)
    return cross_entropy(output, labels) + aux
  return loss


def with_aux_heads(base: LossFn, beta: float) -> LossFn:
  """`base` on the main logits + beta x the mean of `base` on each CAS head's or CIFS
  probe's logits (the joint attack loss of the CAS evaluation, Bai et al.'s
  pgd_attack_cifar10_cas.py, and of CIFS's, CIFAR10_Res18_CIFS_test.py); `base` alone for a
  model without such heads."""
  def loss(output: ModelOutput, labels: jax.Array) -> jax.Array:
    heads = outputs.class_heads(output.aux)
    total = base(output, labels)
    if heads:
      total = total + beta * sum(base(ModelOutput(h, {}), labels) for h in heads) / len(heads)
    return total
  return loss


# What an attack maximises, as `objective.attack.loss` and `eval_pgd.loss` choose it.
ATTACK_LOSSES = ("auto", "ce", "defense")


def attacks_defense_loss(choice: str, defense: str) -> bool:
  """Whether an attack with loss `choice` maximises the defense's own loss: "defense"
  always, "ce" never, "auto" for CAS and CIFS (their authors attack their joint loss, and
  CAS's eval-mode mask, chosen by its own head, blunts the main CE's gradient) but not for
  FSR (its own loss is the weaker attack on it) or an undefended model."""
  if choice not in ATTACK_LOSSES:
    raise ValueError(f"unknown attack loss {choice!r}; allowed: {', '.join(ATTACK_LOSSES)}")
  return choice == "defense" or (choice == "auto" and defense in defenses.LABELLED)


def attack_loss(choice: str, defense: defenses.DefenseConfig) -> LossFn:
  """The loss an attack with loss `choice` maximises (`attacks_defense_loss`)."""
  if attacks_defense_loss(choice, defense.name):
    return defense_loss(defense)
  return cross_entropy
