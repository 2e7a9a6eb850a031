"""Training objectives (docs/method.md section 3), each with the defense's auxiliary loss.

`make` builds an `Objective`, split at the adversarial examples: `attack(params, batch_stats,
batch, rng) -> x'` generates them with the model as deployed (eval mode, parameters held
fixed), `loss(params, batch_stats, batch, x', rng) -> (loss, (metrics, new_batch_stats))` is
the training loss in train mode, as in the authors' code; calling the objective is `loss` at
`attack`'s x'. `batch` holds float32 images in [0, 1] (augmented), int labels and, optionally,
each example's label smoothing s (`"label_smoothing"`, (N,)): CE_s below is the CE on the
targets (1 - s) onehot(y) + s / K, the plain CE without it. Only the main head's supervised CE
is smoothed (natural's, PGD-AT's, TRADES' natural term); the defenses' auxiliary CEs, the KL
terms and the attacks keep the hard labels; MART refuses s > 0 (`check_label_smoothing`).
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
LABEL_SMOOTHING_ON = ("all", "extra")
LossOutput = tuple[jax.Array, tuple[dict[str, jax.Array], Any]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective as its attack and its loss (module docstring).

  Both parts take the step's `rng` and draw disjoint subkeys from it, so
  `objective(params, batch_stats, batch, rng)` = `loss(params, batch_stats, batch,
  attack(params, batch_stats, batch, rng), rng)`, differentiable in `params` through the
  loss only; AWP (`jaxdefense.training.awp`) evaluates `loss` at other weights on the same x'.
  """
  attack: Callable[..., jax.Array | None]
  loss: Callable[..., LossOutput]

  def __call__(self, params, batch_stats, batch: dict, rng: jax.Array) -> LossOutput:
    x_adv = self.attack(params, batch_stats, batch, rng)
    return self.loss(params, batch_stats, batch, x_adv, rng)


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


def _supervised_ce(logits: jax.Array, labels: jax.Array, batch: dict) -> jax.Array:
  """Per-example CE on the targets (1 - s) onehot(y) + s / K, s = batch["label_smoothing"]:
  (1 - s) CE(z, y) + s mean_k(-log softmax(z)_k); the plain CE(z, y) when the batch has no s."""
  ce = _ce(logits, labels)
  if "label_smoothing" not in batch:
    return ce
  s = batch["label_smoothing"]
  uniform = -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
  return (1 - s) * ce + s * uniform


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


def _check_smoothing_on(on: str) -> None:
  if on not in LABEL_SMOOTHING_ON:
    raise ValueError(f"unknown objective.label_smoothing_on {on!r}; allowed: "
                     f"{', '.join(LABEL_SMOOTHING_ON)}")


def check_label_smoothing(name: str, smoothing: float, on: str = "all") -> None:
  """ValueError unless label smoothing `smoothing` on the examples `on` fits objective `name`.

  MART refuses s > 0: its boosted CE is no CE on a target distribution, and the code with
  label smoothing (wzekai99/DM-Improves-AT) smooths TRADES' natural CE only."""
  if not 0 <= smoothing < 1:
    raise ValueError(f"objective.label_smoothing must be in [0, 1), got {smoothing}")
  _check_smoothing_on(on)
  if name == "mart" and smoothing > 0:
    raise ValueError(f"objective.label_smoothing={smoothing} is not defined for MART (its "
                     "boosted CE is no cross-entropy on smoothed targets); use 0 with mart")


def smoothing_per_example(smoothing: float, on: str, extra: jax.Array) -> jax.Array:
  """The batch's `"label_smoothing"` (N,) float32: s on every example (`on="all"`, Wang et
  al. 2023) or on the extra (generated) ones only (`"extra"`, Gowal et al. 2021); `extra` is
  the batch's (N,) bool mask of extra examples."""
  _check_smoothing_on(on)
  chosen = jnp.ones(extra.shape, bool) if on == "all" else extra.astype(bool)
  return jnp.where(chosen, smoothing, 0.0).astype(jnp.float32)


def make(name: str, model: Any, defense: defenses.DefenseConfig, attack: AttackConfig, *,
         beta: float = 6.0, label_smoothing: float = 0.0) -> Objective:
  """The objective `name` for `model` hosting `defense`; `beta` is TRADES' / MART's.
  `label_smoothing` is the configured s, only checked here (`check_label_smoothing`): the
  loss reads each example's s from the batch."""
  check_name(name, defense.name)
  check_label_smoothing(name, label_smoothing)
  if beta < 0:
    raise ValueError(f"objective.beta must be >= 0, got {beta}")
  loss = {"pgd_at": pgd_at, "trades": trades, "mart": mart, "natural": natural}[name]
  loss = functools.partial(loss, model=model, defense=defense, beta=beta)
  if name == "natural":
    return Objective(attack=no_attack, loss=loss)
  attack_fn = {"pgd_at": pgd_at_attack, "trades": trades_attack, "mart": mart_attack}[name]
  return Objective(attack=functools.partial(attack_fn, model=model, defense=defense,
                                            attack=attack), loss=loss)


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


def no_attack(params, batch_stats, batch, rng) -> None:
  """Natural training's attack: no adversarial examples."""
  del params, batch_stats, batch, rng


def natural(params, batch_stats, batch, x_adv, rng, *, model, defense, beta):
  """Standard training: CE_s(f(x), y) + the defense's auxiliary loss."""
  del x_adv, beta
  labels = batch["labels"]
  out, new_stats = _forward_train(model, params, batch_stats, batch["images"], labels, rng)
  ce = jnp.mean(_supervised_ce(out.logits, labels, batch))
  aux, parts = _aux_mean(defense, out, labels)
  loss = ce + aux
  return loss, ({"loss": loss, "ce": ce, "accuracy": _accuracy(out.logits, labels), **parts},
                new_stats)


def pgd_at_attack(params, batch_stats, batch, rng, *, model, defense, attack):
  """PGD-AT's x': PGD on the attack loss from a uniform random start (section 3.2)."""
  attack_key, _ = jax.random.split(rng)
  x_adv = attacks.pgd(_deployed(model, params, batch_stats), batch["images"], batch["labels"],
                      attack_key, eps=attack.eps, step_size=attack.step_size,
                      steps=attack.steps, loss=losses.attack_loss(attack.loss, defense))
  return jax.lax.stop_gradient(x_adv)


def pgd_at(params, batch_stats, batch, x_adv, rng, *, model, defense, beta):
  """Madry et al.: CE_s(f(x'), y) on the PGD examples (+ the defense's auxiliary loss on
  them)."""
  del beta
  _, gumbel_key = jax.random.split(rng)
  labels = batch["labels"]
  out, new_stats = _forward_train(model, params, batch_stats, x_adv, labels, gumbel_key)
  ce = jnp.mean(_supervised_ce(out.logits, labels, batch))
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


def _start(rng: jax.Array, x: jax.Array) -> jax.Array:
  """TRADES' and MART's PGD start x + 0.001 N(0, 1), from the first of rng's three subkeys."""
  start_key, _, _ = jax.random.split(rng, 3)
  return x + 0.001 * jax.random.normal(start_key, x.shape)


def trades_attack(params, batch_stats, batch, rng, *, model, defense, attack):
  """TRADES' x': PGD on KL(f(x) || f(x')), f(x) the deployed model's and held fixed, from
  x + 0.001 N(0, 1); with CAS (Bai et al.'s trades_reg) + CAS-beta * mean_k
  KL(CAS_k(x) || CAS_k(x'))."""
  x, labels = batch["images"], batch["labels"]
  deployed = _deployed(model, params, batch_stats)
  clean = deployed(x)

  def attack_kl(out, _):
    kl = losses.kl_divergence(clean.logits, out.logits)
    cas = _cas_kl(clean.aux, out.aux)
    return kl + defense.beta * sum(cas) / len(cas) if cas else kl

  x_adv = attacks.pgd(deployed, x, labels, eps=attack.eps, step_size=attack.step_size,
                      steps=attack.steps, random_start=False, x_init=_start(rng, x),
                      loss=attack_kl if defense.name == "cas" else losses.trades_kl(clean.logits))
  return jax.lax.stop_gradient(x_adv)


def trades(params, batch_stats, batch, x_adv, rng, *, model, defense, beta):
  """Zhang et al.: CE_s(f(x), y) + beta KL(f(x) || f(x')), f(x) from the train-mode pass;
  BatchNorm's running statistics updated on x, x', x as the original code's three train-mode
  passes do. With CAS (Bai et al.'s trades_reg; two passes, x and x'): + CAS-beta * mean CAS
  CE on x in the natural part and + CAS-beta * mean_k KL(CAS_k(x) || CAS_k(x')) in the
  robust part. With FSR: + its auxiliary loss on x'."""
  _, nat_key, adv_key = jax.random.split(rng, 3)
  x, labels = batch["images"], batch["labels"]
  nat, stats = _forward_train(model, params, batch_stats, x, labels, nat_key)
  adv, stats = _forward_train(model, params, stats, x_adv, labels, adv_key)
  if defense.name != "cas":
    # The original TRADES (trades.py) takes the KL's f(x) from a third train-mode forward
    # pass: the same logits as `nat` (batch statistics, same rng), one more update of
    # BatchNorm's running statistics. CAS's trades_reg makes two passes.
    _, stats = _forward_train(model, params, stats, x, labels, nat_key)
  ce = jnp.mean(_supervised_ce(nat.logits, labels, batch))
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


def mart_attack(params, batch_stats, batch, rng, *, model, defense, attack):
  """MART's x': PGD on the attack loss from x + 0.001 N(0, 1)."""
  x = batch["images"]
  x_adv = attacks.pgd(_deployed(model, params, batch_stats), x, batch["labels"],
                      eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
                      random_start=False, x_init=_start(rng, x),
                      loss=losses.attack_loss(attack.loss, defense))
  return jax.lax.stop_gradient(x_adv)


def mart(params, batch_stats, batch, x_adv, rng, *, model, defense, beta):
  """Wang et al.: BCE(f(x'), y) + beta KL(f(x) || f(x')) (1 - p_y(x)). With CAS (Bai et
  al.'s mart_reg): the same BCE and weighted KL on every CAS head, averaged and scaled by
  CAS-beta, the weight 1 - p_y(x) taken from the main head. With FSR: + its auxiliary loss
  on x'. Label smoothing does not apply (`check_label_smoothing`)."""
  _, nat_key, adv_key = jax.random.split(rng, 3)
  x, labels = batch["images"], batch["labels"]
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


def attack_config(config) -> AttackConfig:
  """The training attack of a run's `config.objective.attack`."""
  a = config.objective.attack
  return AttackConfig(eps=a.eps, step_size=a.step_size, steps=a.steps, loss=a.loss)
