"""The optimizer of a run: SGD with momentum and L2 weight decay as torch.optim.SGD, at the
learning-rate schedule of `config.optim` (docs/method.md section 7; docs/generated.md)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """optim.lr, or optim.lr x batch_size / lr_reference_batch when that is set (DeepMind's
  0.1 x B / 256)."""
  o = config.optim
  if o.lr_reference_batch:
    return o.lr * config.train.batch_size / o.lr_reference_batch
  return o.lr


# PyTorch's OneCycleLR defaults (DM-Improves-AT's `cosinew` keeps them): the rate rises from
# peak / 25 and ends at peak / 25 / 1e4; the momentum goes 0.95 -> 0.85 -> 0.95.
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_MOMENTUM = 25.0, 1e4, (0.85, 0.95)


def _cosine_between(start: float, end: float, fraction: jax.Array) -> jax.Array:
  return end + (start - end) / 2 * (1 + jnp.cos(jnp.pi * fraction))


def _onecycle(start: float, peak: float, end: float, steps_per_epoch: int, rise_epochs: int,
              epochs: int) -> optax.Schedule:
  """torch.optim.lr_scheduler.OneCycleLR(total_steps=epochs, pct_start=rise_epochs /
  epochs) stepped once per epoch: at epoch t (0-based) a cosine from `start` to `peak` over
  t in [0, rise_epochs - 1], then from `peak` to `end` over [rise_epochs - 1, epochs - 1]."""
  peak_epoch, last_epoch = float(rise_epochs - 1), float(epochs - 1)

  def schedule(step):
    t = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    rising = _cosine_between(start, peak, t / max(peak_epoch, 1.0))
    falling = _cosine_between(peak, end, (t - peak_epoch) / max(last_epoch - peak_epoch, 1.0))
    return jnp.where(t <= peak_epoch, rising, falling)
  return schedule


SCHEDULES = ("piecewise", "cosine", "constant", "onecycle")  # config.optim.schedule


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """A linear warm-up from 0 over `optim.warmup_epochs`, then piecewise-constant
  (x decay_factor after each milestone epoch, counted from step 0), cosine decay to 0 at
  the last step (over the steps after the warm-up: optax's warmup_cosine_decay_schedule) or
  constant. `onecycle` is PyTorch's OneCycleLR stepped per epoch (DM-Improves-AT's
  `cosinew`): a cosine from lr / 25 to lr over the first `warmup_epochs` epochs, then a
  cosine to lr / 25 / 1e4 at the last."""
  o = config.optim
  if o.schedule not in SCHEDULES:
    raise ValueError(f"unknown optim.schedule {o.schedule!r}; allowed: {', '.join(SCHEDULES)}")
  lr = peak_learning_rate(config)
  total = config.train.epochs * steps_per_epoch
  if o.schedule == "onecycle":
    start = lr / ONECYCLE_DIV
    return _onecycle(start, lr, start / ONECYCLE_FINAL_DIV, steps_per_epoch,
                     int(o.warmup_epochs), config.train.epochs)
  warmup = int(round(o.warmup_epochs * steps_per_epoch))
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))
  if o.schedule == "piecewise":
    # Milestones count from step 0; after the warm-up, optax counts from its end.
    main = optax.piecewise_constant_schedule(
        lr, {int(m * steps_per_epoch) - warmup: o.decay_factor for m in o.milestones})
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def momentum_schedule(config: ml_collections.ConfigDict,
                      steps_per_epoch: int) -> float | optax.Schedule:
  """optim.momentum; with the `onecycle` schedule OneCycleLR's cycled momentum, 0.95 down
  to 0.85 at the peak rate and back (the same epochs, cosines)."""
  o = config.optim
  if o.schedule != "onecycle":
    return o.momentum
  base, top = ONECYCLE_MOMENTUM
  return _onecycle(top, base, top, steps_per_epoch, int(o.warmup_epochs), config.train.epochs)


def _not_batchnorm(params: Any) -> Any:
  """False for the parameters of BatchNorm layers (the modules holding a `scale`: scale and
  bias), True for every other (convolution and dense kernels and biases)."""
  if not isinstance(params, dict):
    return True
  if "scale" in params:
    return jax.tree.map(lambda _: False, params)
  return {k: _not_batchnorm(v) for k, v in params.items()}


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and L2 weight decay, as torch.optim.SGD does: g <- g + wd * w (on
  every parameter, or all but BatchNorm's with optim.decay_batchnorm=False), then the
  (Nesterov) momentum step at the schedule's rate."""
  o = config.optim
  schedule = learning_rate_schedule(config, steps_per_epoch)
  mask = None if o.decay_batchnorm else _not_batchnorm
  momentum = momentum_schedule(config, steps_per_epoch)
  sgd = (optax.sgd(schedule, momentum=momentum, nesterov=o.nesterov) if not callable(momentum)
         else optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))(
             learning_rate=schedule, momentum=momentum, nesterov=o.nesterov))
  tx = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=mask), sgd)
  return tx, schedule
