"""The compiled steps of a training run: a pure `train_step` (augmentation, the objective's
attack and loss, optionally at adversarially perturbed weights, SGD, EMA) and the
in-training `eval_step` (natural and PGD counts). `jaxdefense.training.train` jits them in its loop;
the benchmarks time them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdefense import attacks, data, defenses
from jaxdefense.training import awp, objectives, train_state
from jaxdefense.attacks import losses
from jaxdefense.training.train_state import TrainState


EMA_BATCH_STATS = ("average", "live")  # config.train.ema_batch_stats


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The parts of a training step around the objective (defaults: none of them).

  - `label_smoothing` s on the examples `label_smoothing_on` ("all", or "extra": those the
    batch's `"is_extra"` mask marks), read by the objective's supervised CE;
  - AWP of relative size `awp_gamma` from update `awp_start_step` on
    (`jaxdefense.training.awp`), its proxy step `awp_proxy_lr`;
  - the EMA's decay at each update, `ema_decay(step)`, and whether it averages BatchNorm's
    statistics too (`ema_batch_stats="average"`) or takes the model's ("live").
  """
  ema_decay: Callable[[jax.Array], jax.Array] = lambda step: jnp.zeros((), jnp.float32)
  ema_batch_stats: str = "average"
  label_smoothing: float = 0.0
  label_smoothing_on: str = "all"
  awp_gamma: float = 0.0
  awp_start_step: int = 0
  awp_proxy_lr: float = 0.01

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> Recipe:
    o, t = config.objective, config.train
    return cls(ema_decay=train_state.ema_decay(config), ema_batch_stats=t.ema_batch_stats,
               label_smoothing=o.label_smoothing, label_smoothing_on=o.label_smoothing_on,
               awp_gamma=o.awp_gamma, awp_start_step=o.awp_warmup_epochs * steps_per_epoch)


def _with_smoothing(inputs: dict, batch: dict, recipe: Recipe) -> dict:
  if not recipe.label_smoothing:
    return inputs
  is_extra = batch.get("is_extra", jnp.zeros(batch["labels"].shape, bool))
  return dict(inputs, label_smoothing=objectives.smoothing_per_example(
      recipe.label_smoothing, recipe.label_smoothing_on, is_extra))


def train_step(state: TrainState, batch: dict, *, objective: objectives.Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               augment: Callable[[jax.Array, jax.Array], jax.Array],
               recipe: Recipe = Recipe()) -> tuple[TrainState, dict]:
  """One update with key = fold_in(run key, step): x <- augment(x); x' = the objective's
  attack at w; with AWP, v = the weight perturbation at w and w + v the weights the loss is
  differentiated at; (loss, grads) of the objective's loss; SGD at those weights; w <- the
  update's result - v; ema <- d ema + (1 - d) w with d = recipe.ema_decay(step) when the
  state keeps an EMA."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  augment_key, objective_key = jax.random.split(key)
  inputs = _with_smoothing({"images": augment(augment_key, batch["images"]),
                            "labels": batch["labels"]}, batch, recipe)
  x_adv = objective.attack(state.params, state.batch_stats, inputs, objective_key)

  def loss_at(params):
    return objective.loss(params, state.batch_stats, inputs, x_adv, objective_key)

  params = state.params
  v = None
  if recipe.awp_gamma:
    v = awp.perturbation(lambda p: loss_at(p)[0], params, gamma=recipe.awp_gamma,
                         proxy_lr=recipe.awp_proxy_lr,
                         active=state.step >= recipe.awp_start_step)
    params = awp.perturb(params, v)
  (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_at, has_aux=True)(params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  if v is not None:
    params = awp.restore(params, v)
  ema = state.ema
  if ema is not None:
    decay = recipe.ema_decay(state.step)
    average = lambda e, p: decay * e + (1 - decay) * p
    ema = {"params": jax.tree.map(average, ema["params"], params),
           "batch_stats": (jax.tree.map(average, ema["batch_stats"], batch_stats)
                           if recipe.ema_batch_stats == "average" else batch_stats)}
  metrics = dict(metrics, lr=schedule(state.step), grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state, ema=ema), metrics


def eval_step(variables: dict, batch: dict, key: jax.Array, *, model,
              pgd: ml_collections.ConfigDict,
              loss: losses.LossFn = losses.cross_entropy) -> dict[str, jax.Array]:
  """Counts of the valid points correct naturally, of those robust under PGD on `loss` (the
  model as deployed), and of the valid points. Robust: correct naturally and on the PGD
  point, as --mode=eval counts it (`attacks.correct_points`), so never above natural."""
  x = data.to_float(batch["images"])
  labels, valid = batch["labels"], batch["mask"]
  x_adv = attacks.pgd(attacks.deployed(model, variables), x, labels, key, eps=pgd.eps,
                      step_size=pgd.step_size, steps=pgd.steps, random_start=pgd.random_start,
                      loss=loss)
  natural = attacks.correct_points(model, variables, x, labels)[0] & valid
  robust = natural & attacks.correct_points(model, variables, x_adv, labels)[0]
  return {"natural": jnp.sum(natural), "pgd": jnp.sum(robust), "count": jnp.sum(valid)}


def in_training_pgd_loss(config: ml_collections.ConfigDict) -> losses.LossFn:
  """The in-training PGD's loss, which also ranks checkpoints for "best"
  (`eval_pgd.loss`, resolved by `losses.attack_loss`)."""
  return losses.attack_loss(config.eval_pgd.loss, defenses.from_config(config))


def in_training_pgd_title(config: ml_collections.ConfigDict) -> str:
  """e.g. "PGD-20", or "PGD-20 on the CAS loss" when it attacks the defense's own loss."""
  on_defense = losses.attacks_defense_loss(config.eval_pgd.loss, config.defense.name)
  return (f"PGD-{config.eval_pgd.steps}"
          + (f" on the {config.defense.name.upper()} loss" if on_defense else ""))
