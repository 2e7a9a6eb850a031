"""The compiled steps of a training run: a pure `train_step` (augmentation, the objective's
attack and loss, SGD, EMA) and the in-training `eval_step` (natural and PGD counts).
`jaxdefense.train` jits them in its loop; the benchmarks time them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdefense import attacks, data, objectives
from jaxdefense.attacks import losses
from jaxdefense.build import TrainState


def train_step(state: TrainState, batch: dict, *, objective: objectives.Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               augment: Callable[[jax.Array, jax.Array], jax.Array],
               ema_decay: float) -> tuple[TrainState, dict]:
  """One update with key = fold_in(run key, step): x <- augment(x); (loss, grads) of the
  objective; SGD; ema <- d ema + (1 - d) (params, batch_stats) when EMA is on."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  augment_key, objective_key = jax.random.split(key)
  inputs = {"images": augment(augment_key, batch["images"]), "labels": batch["labels"]}
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  (_, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, inputs,
                                               objective_key)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema is not None:
    new = {"params": params, "batch_stats": batch_stats}
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, new)
  metrics = dict(metrics, lr=schedule(state.step), grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state, ema=ema), metrics


def eval_step(variables: dict, batch: dict, key: jax.Array, *, model,
              pgd: ml_collections.ConfigDict,
              loss: losses.LossFn = losses.cross_entropy) -> dict[str, jax.Array]:
  """Counts of the valid points correct naturally and under PGD on `loss` (the model as
  deployed), and of the valid points."""
  x = data.to_float(batch["images"])
  labels, valid = batch["labels"], batch["mask"]
  deployed = attacks.deployed(model, variables)
  x_adv = attacks.pgd(deployed, x, labels, key, eps=pgd.eps, step_size=pgd.step_size,
                      steps=pgd.steps, random_start=pgd.random_start, loss=loss)
  correct = lambda v: jnp.sum((jnp.argmax(deployed(v).logits, -1) == labels) & valid)
  return {"natural": correct(x), "pgd": correct(x_adv), "count": jnp.sum(valid)}
