"""The state a training run carries from step to step and saves (`TrainState`), the weight
EMA's decay, and the variables a run's checkpoint restores to for evaluation or to start
another run from.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from etils import epath

from jaxdefense import checkpoint, errors, models, parallel
from jaxdefense.training import optim
from jaxdefense.workdir import paths

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


def uses_ema(config: ml_collections.ConfigDict) -> bool:
  """Whether the run keeps a weight EMA (and so evaluates it)."""
  return config.train.ema_decay > 0


EMA_SCHEDULES = ("constant", "warmup")  # config.train.ema_schedule


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


def create(model, tx: optax.GradientTransformation, key: jax.Array, image_shape,
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


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  """Whether every entry of every array of `tree` is finite (one device computation)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def restore_variables(config: ml_collections.ConfigDict, workdir: epath.Path, which: str, model,
                      image_shape, mesh) -> tuple[dict, int]:
  """A checkpoint's variables (its EMA when the run kept one), replicated on the mesh. Only
  they are read: the rest of the saved train state (the optimizer state above all) is a
  placeholder of the target, whose structure is checked all the same.

  `which`: "latest", "best" (by the in-training PGD) or a step number."""
  tx, _ = optim.make_optimizer(config, 1)
  ema = uses_ema(config)
  abstract = jax.eval_shape(lambda: create(
      model, tx, jax.random.key(0), image_shape, ema=ema))
  sharding = parallel.replicated(mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)
  read = ("ema",) if ema else ("params", "batch_stats")
  target = target.replace(**{f.name: jax.tree.map(lambda _: ocp.PLACEHOLDER,
                                                  getattr(target, f.name))
                             for f in dataclasses.fields(TrainState) if f.name not in read})
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
  checkpoint (a workdir: trained here, or imported by `jaxdefense.interop.convert`); the optimizer
  state, step and EMA start afresh (the EMA from the loaded weights)."""
  source = paths.resolve(config.init_from)
  variables, step = restore_variables(config, source, "latest", model, image_shape, mesh)
  if jax.process_index() == 0:
    print(f"initialised from step {step} of {source}", flush=True)
  ema = (jax.tree.map(jnp.copy, variables) if state.ema is not None else None)
  return state.replace(params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}), ema=ema)
