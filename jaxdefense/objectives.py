"""Training objectives (docs/method.md section 3), each with the defense's auxiliary loss.

Every objective is a pure function `(params, batch_stats, batch, rng) -> (loss, (metrics,
new_batch_stats))` built by `make`; `batch` holds float32 images in [0, 1] (augmented) and
int labels. Adversarial examples are generated with the model as deployed (eval mode), the
update runs in train mode, as in the authors' code.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxdefense import attacks, defenses
from jaxdefense.attacks import losses
from jaxdefense.defenses import outputs

NAMES = ("pgd_at", "trades", "mart", "natural")
Objective = Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The training attack: L-inf PGD (docs/method.md section 3; section 7 for SVHN's step).

  `loss` is resolved by `losses.attacks_defense_loss`: "auto" is the authors' choice, CAS
  and CIFS attacking their full loss (main CE + beta x the mean auxiliary CE), FSR and the
  baseline the main CE.
  """
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  loss: str = "auto"

  def __post_init__(self):
    if self.eps < 0:
      raise ValueError(f"objective.attack.eps must be >= 0, got {self.eps}")
    if self.step_size <= 0 and self.steps > 0:
      raise ValueError(f"objective.attack.step_size must be > 0, got {self.step_size}")
    if self.steps < 0:
      raise ValueError(f"objective.attack.steps must be >= 0, got {self.steps}")
    if self.loss not in losses.ATTACK_LOSSES:
      raise ValueError(f"unknown objective.attack.loss {self.loss!r}; allowed: "
                       f"{', '.join(losses.ATTACK_LOSSES)}")


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def _cas_logits(aux: dict[str, jax.Array]) -> list[jax.Array]:
  return outputs.of(aux, "cas")


def check_name(name: str, defense: str) -> None:
  """ValueError unless objective `name` is defined for `defense`."""
  if name not in NAMES:
    raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(NAMES)}")
  if defense == "cifs" and name in ("trades", "mart"):
    raise ValueError(f"objective {name!r} is not defined for CIFS (its authors train it with "
                     "PGD-AT only); allowed: pgd_at, natural")


def make(name: str, model: Any, defense: defenses.DefenseConfig, attack: AttackConfig, *,
         beta: float = 6.0) -> Objective:
  """The objective `name` for `model` hosting `defense`; `beta` is TRADES' / MART's."""
  check_name(name, defense.name)
  if beta < 0:
    raise ValueError(f"objective.beta must be >= 0, got {beta}")
  fn = {"pgd_at": pgd_at, "trades": trades, "mart": mart, "natural": natural}[name]
  return functools.partial(fn, model=model, defense=defense, attack=attack, beta=beta)


def _forward_train(model, params, batch_stats, x, labels, key):
  out, state = model.apply({"params": params, "batch_stats": batch_stats}, x, labels,
                           train=True, rngs={"gumbel": key}, mutable=["batch_stats"])
  return out, state["batch_stats"]


def _deployed(model, params, batch_stats):
  variables = jax.lax.stop_gradient({"params": params, "batch_stats": batch_stats})
  return attacks.deployed(model, variables)


def _aux_mean(defense, out, labels) -> tuple[jax.Array, dict[str, jax.Array]]:
  aux, parts = defenses.aux_loss(defense, out.logits, out.aux, labels)
  return jnp.mean(aux), {k: jnp.mean(v) for k, v in parts.items()}


def natural(params, batch_stats, batch, rng, *, model, defense, attack, beta):
  """Standard training: CE(f(x), y) + the defense's auxiliary loss."""
  del attack, beta
  labels = batch["labels"]
  out, new_stats = _forward_train(model, params, batch_stats, batch["images"], labels, rng)
  ce = jnp.mean(_ce(out.logits, labels))
  aux, parts = _aux_mean(defense, out, labels)
  loss = ce + aux
  return loss, ({"loss": loss, "ce": ce, "accuracy": _accuracy(out.logits, labels), **parts},
                new_stats)


def pgd_at(params, batch_stats, batch, rng, *, model, defense, attack, beta):
  """Madry et al.: CE on PGD examples (+ the defense's auxiliary loss on them)."""
  del beta
  attack_key, gumbel_key = jax.random.split(rng)
  x, labels = batch["images"], batch["labels"]
  x_adv = attacks.pgd(_deployed(model, params, batch_stats), x, labels, attack_key,
                      eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
                      loss=losses.attack_loss(attack.loss, defense))
  out, new_stats = _forward_train(model, params, batch_stats, jax.lax.stop_gradient(x_adv),
                                  labels, gumbel_key)
  ce = jnp.mean(_ce(out.logits, labels))
  aux, parts = _aux_mean(defense, out, labels)
  loss = ce + aux
  return loss, ({"loss": loss, "ce": ce, "adv_accuracy": _accuracy(out.logits, labels),
                 **parts}, new_stats)


def _cas_kl(nat_aux, adv_aux) -> list[jax.Array]:
  """Per-example KL(CAS_k(x) || CAS_k(x')) for each CAS module k."""
  return [losses.kl_divergence(n, a) for n, a in zip(_cas_logits(nat_aux), _cas_logits(adv_aux))]


def _combine(defense, nat, adv, labels, natural_term, robust, beta, metrics, stats):
  """natural_term + beta * robust (+ FSR's auxiliary loss on x'), with the common metrics."""
  fsr_loss = jnp.zeros(())
  if defense.name == "fsr":
    fsr_loss, parts = _aux_mean(defense, adv, labels)
    metrics.update(parts)
  loss = natural_term + beta * robust + fsr_loss
  metrics.update(loss=loss, accuracy=_accuracy(nat.logits, labels),
                 adv_accuracy=_accuracy(adv.logits, labels))
  return loss, (metrics, stats)


def trades(params, batch_stats, batch, rng, *, model, defense, attack, beta):
  """Zhang et al.: CE(f(x), y) + beta KL(f(x) || f(x')), x' maximising that KL from
  x + 0.001 N(0, 1); BatchNorm's running statistics updated on x, x', x as the original
  code's three train-mode passes do. With CAS (Bai et al.'s trades_reg; two passes, x and
  x'): + CAS-beta * mean CAS CE on x in
  the natural part and + CAS-beta * mean_k KL(CAS_k(x) || CAS_k(x')) in the robust part,
  also in the attack's KL. With FSR: + its auxiliary loss on x'."""
  start_key, nat_key, adv_key = jax.random.split(rng, 3)
  x, labels = batch["images"], batch["labels"]
  deployed = _deployed(model, params, batch_stats)
  clean = deployed(x)

  def attack_kl(out, _):
    kl = losses.kl_divergence(clean.logits, out.logits)
    cas = _cas_kl(clean.aux, out.aux)
    return kl + defense.beta * sum(cas) / len(cas) if cas else kl

  x_init = x + 0.001 * jax.random.normal(start_key, x.shape)
  x_adv = attacks.pgd(deployed, x, labels, eps=attack.eps, step_size=attack.step_size,
                      steps=attack.steps, random_start=False, x_init=x_init,
                      loss=attack_kl if defense.name == "cas" else losses.trades_kl(clean.logits))
  x_adv = jax.lax.stop_gradient(x_adv)
  nat, stats = _forward_train(model, params, batch_stats, x, labels, nat_key)
  adv, stats = _forward_train(model, params, stats, x_adv, labels, adv_key)
  if defense.name != "cas":
    # The original TRADES (trades.py) takes the KL's f(x) from a third train-mode forward
    # pass: the same logits as `nat` (batch statistics, same rng), one more update of
    # BatchNorm's running statistics. CAS's trades_reg makes two passes.
    _, stats = _forward_train(model, params, stats, x, labels, nat_key)
  ce = jnp.mean(_ce(nat.logits, labels))
  robust = jnp.mean(losses.kl_divergence(nat.logits, adv.logits))
  metrics = {"ce": ce, "kl": robust}
  if defense.name == "cas":
    nat_cas = _cas_logits(nat.aux)
    cas_ce = jnp.mean(sum(_ce(a, labels) for a in nat_cas) / len(nat_cas))
    cas_kl = jnp.mean(sum(_cas_kl(nat.aux, adv.aux)) / len(nat_cas))
    ce, robust = ce + defense.beta * cas_ce, robust + defense.beta * cas_kl
    metrics.update(cas_ce=cas_ce, cas_kl=cas_kl)
  return _combine(defense, nat, adv, labels, ce, robust, beta, metrics, stats)


def _boosted_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """MART's BCE: CE(p', y) - log(1.0001 - p'_{y_wrong} + 1e-12), y_wrong the most likely
  wrong class of the adversarial prediction."""
  probs = jax.nn.softmax(logits.astype(jnp.float32))
  top2 = jax.lax.top_k(probs, 2)[1]
  wrong = jnp.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
  p_wrong = jnp.take_along_axis(probs, wrong[:, None], axis=-1)[:, 0]
  return _ce(logits, labels) - jnp.log(1.0001 - p_wrong + 1e-12)


def mart(params, batch_stats, batch, rng, *, model, defense, attack, beta):
  """Wang et al.: BCE(f(x'), y) + beta KL(f(x) || f(x')) (1 - p_y(x)), x' from PGD on the
  attack loss starting at x + 0.001 N(0, 1). With CAS (Bai et al.'s mart_reg): the same
  BCE and weighted KL on every CAS head, averaged and scaled by CAS-beta, the weight
  1 - p_y(x) taken from the main head. With FSR: + its auxiliary loss on x'."""
  start_key, nat_key, adv_key = jax.random.split(rng, 3)
  x, labels = batch["images"], batch["labels"]
  x_init = x + 0.001 * jax.random.normal(start_key, x.shape)
  x_adv = attacks.pgd(_deployed(model, params, batch_stats), x, labels, eps=attack.eps,
                      step_size=attack.step_size, steps=attack.steps, random_start=False,
                      x_init=x_init, loss=losses.attack_loss(attack.loss, defense))
  x_adv = jax.lax.stop_gradient(x_adv)
  nat, stats = _forward_train(model, params, batch_stats, x, labels, nat_key)
  adv, stats = _forward_train(model, params, stats, x_adv, labels, adv_key)
  p_true = jnp.take_along_axis(jax.nn.softmax(nat.logits.astype(jnp.float32)),
                               labels[:, None], axis=-1)[:, 0]
  weight = 1.0000001 - p_true
  bce = jnp.mean(_boosted_ce(adv.logits, labels))
  robust = jnp.mean(losses.kl_divergence(nat.logits, adv.logits) * weight)
  metrics = {"bce": bce, "kl": robust}
  if defense.name == "cas":
    nat_cas, adv_cas = _cas_logits(nat.aux), _cas_logits(adv.aux)
    cas_bce = jnp.mean(sum(_boosted_ce(a, labels) for a in adv_cas) / len(adv_cas))
    cas_kl = jnp.mean(sum(losses.kl_divergence(n, a) * weight
                          for n, a in zip(nat_cas, adv_cas)) / len(adv_cas))
    bce, robust = bce + defense.beta * cas_bce, robust + defense.beta * cas_kl
    metrics.update(cas_bce=cas_bce, cas_kl=cas_kl)
  return _combine(defense, nat, adv, labels, bce, robust, beta, metrics, stats)
