"""Building a run from its config: the data, the model, the optimizer, the train state and
restored variables. Training, evaluation, analysis, the converter and the benchmarks all
build their run here (the config is checked first, by `jaxdefense.validation`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from jaxdefense import (checkpoint, data, defenses, errors, extra, models, objectives, parallel,
                        paths)
from jaxdefense.attacks import losses

# The metric that ranks checkpoints for `--checkpoint=best`: the in-training PGD accuracy.
BEST_METRIC = "pgd_accuracy"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any          # {"params", "batch_stats"} averaged, or None when EMA is off.
  rng: jax.Array    # Raw key data of the run's base PRNG key.

  def variables(self, use_ema: bool = False) -> dict:
    if use_ema and self.ema is not None:
      return dict(self.ema)
    return {"params": self.params, "batch_stats": self.batch_stats}


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
  d = config.data
  return data.load(d.name, data_dir=d.data_dir, num_train=d.num_train, num_test=d.num_test,
                   image_size=d.image_size)


def open_extra(config: ml_collections.ConfigDict) -> extra.ExtraSource | None:
  """The extra (generated) images of `data.extra`, checked against the real data's image
  shape and classes without loading it (one `errors.DataError` line naming a faulty file);
  None without extra data."""
  d = config.data
  if not d.extra:
    return None
  return extra.open_sources(tuple(d.extra), image_shape=data.image_shape(d.name, d.image_size),
                            num_classes=data.NUM_CLASSES[d.name])


def steps_per_epoch(config: ml_collections.ConfigDict, num_real: int) -> int:
  """Steps per epoch: full batches of the real set (num_real // B) without extra data;
  with it, by `data.epoch_steps`: "real", one pass over the real images at R real ones a
  batch (num_real // R), or "batch", ceil(num_real / B) steps (DM-Improves-AT's count)."""
  batch_size = config.train.batch_size
  if not config.data.extra:
    return data.steps_per_epoch(num_real, batch_size)
  if config.data.epoch_steps == "real":
    real, _ = extra.check_batch(batch_size, config.data.extra_fraction)
    return num_real // real
  return -(-num_real // batch_size)


def defense_config(config: ml_collections.ConfigDict) -> defenses.DefenseConfig:
  d = config.defense
  return defenses.DefenseConfig(
      name=d.name, sites=tuple(d.sites) or None, beta=d.beta, tau=d.tau, lam_sep=d.lam_sep,
      lam_rec=d.lam_rec, hidden=d.hidden, probe_hidden=d.probe_hidden or None,
      linear_sites=tuple(d.linear_sites) or None, mask_scale=d.mask_scale,
      loss_rescale=d.loss_rescale)


def attack_config(config: ml_collections.ConfigDict) -> objectives.AttackConfig:
  a = config.objective.attack
  return objectives.AttackConfig(eps=a.eps, step_size=a.step_size, steps=a.steps, loss=a.loss)


def build_model(config: ml_collections.ConfigDict, num_classes: int, dtype: str | None = None):
  """The config's model; `dtype` overrides its compute dtype (the parameters stay float32)."""
  return models.create(config.model.arch, num_classes=num_classes,
                       defense=defense_config(config), dtype=dtype or config.model.dtype,
                       **config.model.kwargs.to_dict())


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


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """A linear warm-up from 0 over `optim.warmup_epochs`, then piecewise-constant
  (x decay_factor after each milestone epoch, counted from step 0), cosine decay to 0 at
  the last step (over the steps after the warm-up) or constant. `onecycle` is PyTorch's
  OneCycleLR stepped per epoch (DM-Improves-AT's `cosinew`): a cosine from lr / 25 to lr
  over the first `warmup_epochs` epochs, then a cosine to lr / 25 / 1e4 at the last."""
  o = config.optim
  lr = peak_learning_rate(config)
  total = config.train.epochs * steps_per_epoch
  if o.schedule == "onecycle":
    start = lr / ONECYCLE_DIV
    return _onecycle(start, lr, start / ONECYCLE_FINAL_DIV, steps_per_epoch,
                     int(o.warmup_epochs), config.train.epochs)
  warmup = int(round(o.warmup_epochs * steps_per_epoch))
  if o.schedule == "piecewise":
    boundaries = {int(m * steps_per_epoch): o.decay_factor for m in o.milestones}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  elif o.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    main = lambda step: cosine(step - warmup)
  elif o.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown optim.schedule {o.schedule!r}; allowed: piecewise, cosine, "
                     "constant, onecycle")
  if not warmup:
    return main
  return lambda step: jnp.where(step < warmup, lr * step / warmup, main(step))


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


def ema_decay(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """The EMA's decay at update `step` (0-based): train.ema_decay, or with the "warmup"
  schedule 0 for the first ema_warmup_steps updates and then
  min(ema_decay, (1 + d) / (10 + d)), d = step - ema_warmup_steps."""
  t = config.train
  if t.ema_schedule == "constant":
    return lambda step: jnp.asarray(t.ema_decay, jnp.float32)

  def decay(step):
    d = (step - t.ema_warmup_steps).astype(jnp.float32)
    return jnp.where(d < 0, 0.0, jnp.minimum(t.ema_decay, (1 + d) / (10 + d)))
  return decay


def create_train_state(model, tx: optax.GradientTransformation, key: jax.Array, image_shape,
                       ema: bool) -> TrainState:
  init_key, run_key = jax.random.split(key)
  variables = models.init(model, init_key, image_shape)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params),
                    # A copy: the step donates the state, and one buffer cannot be donated twice.
                    ema=jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
                    if ema else None,
                    rng=jax.random.key_data(run_key))


def uses_ema(config: ml_collections.ConfigDict) -> bool:
  """Whether the run keeps a weight EMA (and so evaluates it)."""
  return config.train.ema_decay > 0


def in_training_pgd_loss(config: ml_collections.ConfigDict) -> losses.LossFn:
  """The in-training PGD's loss, which also ranks checkpoints for "best"
  (`eval_pgd.loss`, resolved by `losses.attack_loss`)."""
  return losses.attack_loss(config.eval_pgd.loss, defense_config(config))


def in_training_pgd_title(config: ml_collections.ConfigDict) -> str:
  """e.g. "PGD-20", or "PGD-20 on the CAS loss" when it attacks the defense's own loss."""
  on_defense = losses.attacks_defense_loss(config.eval_pgd.loss, config.defense.name)
  return (f"PGD-{config.eval_pgd.steps}"
          + (f" on the {config.defense.name.upper()} loss" if on_defense else ""))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  """Whether every entry of every array of `tree` is finite (one device computation)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def restore_variables(config: ml_collections.ConfigDict, workdir: epath.Path, which: str, model,
                      image_shape, mesh) -> tuple[dict, int]:
  """A checkpoint's variables (its EMA when the run kept one), replicated on the mesh.

  `which`: "latest", "best" (by the in-training PGD) or a step number."""
  tx, _ = make_optimizer(config, 1)
  ema = uses_ema(config)
  abstract = jax.eval_shape(lambda: create_train_state(
      model, tx, jax.random.key(0), image_shape, ema=ema))
  sharding = parallel.replicated(mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)
  directory = workdir / "checkpoints"
  ckpt = checkpoint.Checkpointer(directory, save_every_steps=1, keep=1,
                                 best_metric=BEST_METRIC, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise errors.NoCheckpoint(f"no checkpoint in {directory}")
    try:
      state, step, _ = ckpt.restore(target, which=which)
    except FileNotFoundError as e:
      if isinstance(e, errors.RunError):
        raise
      raise errors.NoCheckpoint(f"{e}; a run without an in-training evaluation (or imported "
                                "weights) has no best checkpoint: use --checkpoint=last") from e
  finally:
    ckpt.close()
  variables = state.variables(use_ema=ema)
  if not bool(_all_finite(variables)):
    raise errors.NoIntactCheckpoint(
        f"checkpoint step {step} in {directory} holds non-finite parameters (a diverged "
        "run); evaluate another step or retrain")
  return variables, step


def initialize_from(config: ml_collections.ConfigDict, state: TrainState, model, image_shape,
                    mesh) -> TrainState:
  """`state` with the parameters and BatchNorm statistics of `config.init_from`'s latest
  checkpoint (a workdir: trained here, or imported by `jaxdefense.convert`); the optimizer
  state, step and EMA start afresh (the EMA from the loaded weights)."""
  source = paths.resolve(config.init_from)
  variables, step = restore_variables(config, source, "latest", model, image_shape, mesh)
  if jax.process_index() == 0:
    print(f"initialised from step {step} of {source}", flush=True)
  ema = (jax.tree.map(jnp.copy, variables) if state.ema is not None else None)
  return state.replace(params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}), ema=ema)
