"""Building a run from its config: the data, the model, the optimizer, the train state and
restored variables. Training, evaluation, analysis, the converter and the benchmarks all
build their run here (the config is checked first, by `jaxdefense.validation`).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from jaxdefense import checkpoint, data, defenses, errors, models, objectives, parallel, paths
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


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """Piecewise-constant (x decay_factor after each milestone epoch), cosine or constant."""
  o = config.optim
  if o.schedule == "piecewise":
    boundaries = {int(m * steps_per_epoch): o.decay_factor for m in o.milestones}
    return optax.piecewise_constant_schedule(o.lr, boundaries)
  if o.schedule == "cosine":
    return optax.cosine_decay_schedule(o.lr, max(config.train.epochs * steps_per_epoch, 1))
  if o.schedule == "constant":
    return optax.constant_schedule(o.lr)
  raise ValueError(f"unknown optim.schedule {o.schedule!r}; allowed: piecewise, cosine, constant")


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and L2 weight decay on every parameter, as torch.optim.SGD does:
  g <- g + wd * w, then the (Nesterov) momentum step at the schedule's rate."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                   optax.sgd(schedule, momentum=config.optim.momentum,
                             nesterov=config.optim.nesterov))
  return tx, schedule


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
