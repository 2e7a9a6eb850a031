"""Adversarial training: the train state, a pure `train_step`, evaluation, and the loop.

The loop is resumable at any step: data order is a function of (seed, epoch), every
step's randomness is `fold_in(seed key, step)`, and the checkpoint holds the whole state.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from etils import epath

from jaxdefense import (attacks, checkpoint, data, defenses, errors, guard, metric_writer, models,
                        objectives, parallel, paths)
from jaxdefense.metric_writer import MetricWriter


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


def defense_config(config: ml_collections.ConfigDict) -> defenses.DefenseConfig:
  d = config.defense
  sites = tuple(d.sites) if d.get("sites") else None
  return defenses.DefenseConfig(
      name=d.name, sites=sites, beta=d.beta, tau=d.tau, lam_sep=d.lam_sep, lam_rec=d.lam_rec,
      hidden=d.hidden, probe_hidden=d.probe_hidden or None,
      linear_sites=tuple(d.linear_sites) if d.linear_sites else None, mask_scale=d.mask_scale,
      loss_rescale=d.loss_rescale)


def build_model(config: ml_collections.ConfigDict, num_classes: int, dtype: str | None = None):
  """The config's model; `dtype` overrides its compute dtype (the parameters stay float32)."""
  return models.create(config.model.arch, num_classes=num_classes,
                       defense=defense_config(config), dtype=dtype or config.model.dtype,
                       **dict(config.model.get("kwargs", {})))


def attack_config(config: ml_collections.ConfigDict) -> objectives.AttackConfig:
  a = config.objective.attack
  return objectives.AttackConfig(eps=a.eps, step_size=a.step_size, steps=a.steps, loss=a.loss)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Piecewise-constant (x decay_factor after each milestone epoch) or cosine."""
  o = config.optim
  if o.schedule == "piecewise":
    boundaries = {int(m * steps_per_epoch): o.decay_factor for m in o.milestones}
    return optax.piecewise_constant_schedule(o.lr, boundaries)
  if o.schedule == "cosine":
    return optax.cosine_decay_schedule(o.lr, max(config.train.epochs * steps_per_epoch, 1))
  if o.schedule == "constant":
    return optax.constant_schedule(o.lr)
  raise ValueError(f"unknown optim.schedule {o.schedule!r}; allowed: piecewise, cosine, constant")


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """SGD with momentum and L2 weight decay on every parameter, as torch.optim.SGD does."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                   optax.sgd(schedule, momentum=config.optim.momentum,
                             nesterov=config.optim.get("nesterov", False)))
  return tx, schedule


def create_train_state(model, tx, key: jax.Array, image_shape, ema: bool) -> TrainState:
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
  """A checkpoint's variables (its EMA when the run kept one), replicated on the mesh.

  `which`: "latest", "best" (by the in-training PGD) or a step number."""
  tx, _ = make_optimizer(config, 1)
  ema = config.train.ema_decay > 0
  abstract = jax.eval_shape(lambda: create_train_state(
      model, tx, jax.random.key(0), image_shape, ema=ema))
  sharding = parallel.replicated(mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)
  directory = workdir / "checkpoints"
  ckpt = checkpoint.Checkpointer(directory, save_every_steps=1, keep=1,
                                 best_metric="pgd_accuracy", read_only=True)
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


def train_step(state: TrainState, batch: dict, *, objective: objectives.Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               augment: Callable[[jax.Array, jax.Array], jax.Array],
               ema_decay: float) -> tuple[TrainState, dict]:
  """One update: on-device augmentation, the objective's attack and loss, SGD, EMA."""
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


EVAL_PGD_LOSSES = ("auto", "ce", "defense")


def _eval_pgd_on_defense_loss(config: ml_collections.ConfigDict) -> bool:
  """Whether the in-training PGD, which also picks the "best" checkpoint, attacks the
  defense's own loss: `eval_pgd.loss`, "auto" meaning yes for CAS (whose eval-mode mask,
  chosen by its own head, blunts the main CE's gradient: plain PGD overstates its
  robustness) and CIFS (whose authors select by it), no for the others (FSR's own loss is
  the weaker attack on it)."""
  loss = config.eval_pgd.get("loss", "auto")
  if loss not in EVAL_PGD_LOSSES:
    raise ValueError(f"unknown eval_pgd.loss {loss!r}; allowed: {', '.join(EVAL_PGD_LOSSES)}")
  return loss == "defense" or (loss == "auto" and config.defense.name in defenses.LABELLED)


def eval_pgd_loss(config: ml_collections.ConfigDict) -> attacks.losses.LossFn:
  """The in-training PGD's loss (`_eval_pgd_on_defense_loss`)."""
  if _eval_pgd_on_defense_loss(config):
    return attacks.losses.defense_loss(defense_config(config))
  return attacks.losses.cross_entropy


def eval_pgd_title(config: ml_collections.ConfigDict) -> str:
  on_defense = _eval_pgd_on_defense_loss(config)
  return (f"PGD-{config.eval_pgd.steps}"
          + (f" on the {config.defense.name.upper()} loss" if on_defense else ""))


def eval_step(variables: dict, batch: dict, key: jax.Array, *, model,
              pgd: ml_collections.ConfigDict,
              loss: attacks.losses.LossFn = attacks.losses.cross_entropy) -> dict[str, jax.Array]:
  """Counts of points correct naturally and under PGD on `loss` (the model as deployed)."""
  x = data.to_float(batch["images"])
  labels, valid = batch["labels"], batch["mask"]
  deployed = attacks.deployed(model, variables)
  x_adv = attacks.pgd(deployed, x, labels, key, eps=pgd.eps, step_size=pgd.step_size,
                      steps=pgd.steps, random_start=pgd.random_start, loss=loss)
  correct = lambda v: jnp.sum((jnp.argmax(deployed(v).logits, -1) == labels) & valid)
  return {"natural": correct(x), "pgd": correct(x_adv), "count": jnp.sum(valid)}


def validate(config: ml_collections.ConfigDict, mesh) -> None:
  """Fails at start-up, with the bad value and what is allowed, for a bad config."""
  if config.data.name not in data.NAMES:
    raise ValueError(f"unknown data set {config.data.name!r}; allowed: {', '.join(data.NAMES)}")
  if config.objective.name not in objectives.NAMES:
    raise ValueError(f"unknown objective {config.objective.name!r}; allowed: "
                     f"{', '.join(objectives.NAMES)}")
  if config.model.arch not in models.ARCHITECTURES:
    raise ValueError(f"unknown model.arch {config.model.arch!r}; allowed: "
                     f"{', '.join(models.ARCHITECTURES)}")
  defense_config(config)
  attack_config(config)
  if config.eval_pgd.eps < 0:
    raise ValueError(f"eval_pgd.eps must be >= 0, got {config.eval_pgd.eps}")
  _eval_pgd_on_defense_loss(config)
  if config.train.epochs < 1:
    raise ValueError(f"train.epochs must be >= 1, got {config.train.epochs}")
  if not 0 <= config.train.ema_decay < 1:
    raise ValueError(f"train.ema_decay must be in [0, 1) (0 turns EMA off), got "
                     f"{config.train.ema_decay}")
  parallel.check_batch_size(config.train.batch_size, mesh)
  parallel.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")


def evaluate_accuracy(eval_fn, variables, images: np.ndarray, labels: np.ndarray, mesh,
                      batch_size: int, seed: int) -> dict[str, float]:
  """Natural and PGD accuracy over all given points (last batch padded and masked)."""
  totals = {"natural": 0, "pgd": 0, "count": 0}
  key = jax.random.key(seed)
  for i, (x, y, mask) in enumerate(data.eval_batches(
      images, labels, batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())):
    batch = parallel.shard_batch(mesh, {"images": x, "labels": y, "mask": mask})
    counts = eval_fn(variables, batch, jax.random.fold_in(key, i))
    for k in totals:
      totals[k] += int(counts[k])
  n = max(totals["count"], 1)
  return {"natural_accuracy": totals["natural"] / n, "pgd_accuracy": totals["pgd"] / n,
          "num_examples": totals["count"]}


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
  d = config.data
  return data.load(d.name, data_dir=d.data_dir, num_train=d.num_train, num_test=d.num_test,
                   image_size=d.image_size)


def _eval_subset(dataset: data.Dataset, num: int | None):
  if num:
    return dataset.test_images[:num], dataset.test_labels[:num]
  return dataset.test_images, dataset.test_labels


def _first_non_finite(fetched: list[tuple[int, dict]]) -> tuple[int, dict] | None:
  """The first (step, metrics) whose loss or gradient norm is not finite."""
  for step, m in fetched:
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      return step, m
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
  """Trains (resuming from the workdir's latest checkpoint), evaluates, writes results.

  Before anything is loaded, the workdir must be writable, free (`guard.Lock`: one training
  per workdir) and, if trained before, trained with a config that builds the same model
  (`guard.check_config`). Returns the results, or `{"preempted": True, "step": ...}` after
  SIGTERM; raises `errors.Diverged` at a non-finite loss or gradient norm, having saved
  nothing from that step on."""
  workdir = paths.resolve(workdir)
  mesh = parallel.make_mesh()
  validate(config, mesh)
  is_main = jax.process_index() == 0
  guard.check_config(workdir, config)
  lock = guard.Lock(workdir)
  if is_main:
    paths.check_writable(workdir)
    metric_writer.check_supported(workdir)
    lock.acquire()
  try:
    if is_main:
      guard.record_config(workdir, config)
    return _train(config, workdir, mesh)
  finally:
    lock.release()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> dict:
  is_main = jax.process_index() == 0
  dataset = load_data(config)
  model = build_model(config, dataset.num_classes)
  batch_size = config.train.batch_size
  steps_per_epoch = len(dataset.train_labels) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={batch_size} exceeds the {len(dataset.train_labels)} "
                     f"training points of {dataset.name}")
  total_steps = config.train.epochs * steps_per_epoch
  if is_main:
    print(f"config:\n{config}", flush=True)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
          f"({jax.process_count()} process(es)); data set {dataset.name}: "
          f"{len(dataset.train_labels)} train / {len(dataset.test_labels)} test, "
          f"{dataset.num_classes} classes, images {dataset.image_shape}; "
          f"{config.train.epochs} epochs x {steps_per_epoch} steps = {total_steps} steps",
          flush=True)

  tx, schedule = make_optimizer(config, steps_per_epoch)
  ema_decay = float(config.train.ema_decay)
  state = create_train_state(model, tx, jax.random.key(config.seed), dataset.image_shape,
                             ema=ema_decay > 0)
  state = parallel.replicate(mesh, state)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints",
                                 save_every_steps=config.train.checkpoint_every_steps,
                                 keep=config.train.keep_checkpoints, best_metric="pgd_accuracy")
  writer = None
  try:
    restored = ckpt.restore(state)
    if restored is not None:
      state, _, _ = restored
      if is_main:
        print(f"resumed from step {int(state.step)} in {workdir}", flush=True)
    elif config.get("init_from"):
      state = initialize_from(config, state, model, dataset.image_shape, mesh)
    # Rows and events logged after the checkpoint (by a run killed later) are dropped.
    writer = MetricWriter(workdir, resume_step=int(state.step) if restored else None)
    return _loop(config, workdir, mesh, dataset, model, tx, schedule, state, ckpt, writer,
                 steps_per_epoch, total_steps)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def _loop(config, workdir, mesh, dataset, model, tx, schedule, state, ckpt, writer,
          steps_per_epoch: int, total_steps: int) -> dict:
  is_main = jax.process_index() == 0
  ema_decay = float(config.train.ema_decay)
  objective = objectives.make(config.objective.name, model, defense_config(config),
                              attack_config(config), beta=config.objective.beta)
  augment = functools.partial(data.augment, **data.augmentation_for(dataset.name))
  step_fn = jax.jit(functools.partial(train_step, objective=objective, tx=tx, schedule=schedule,
                                      augment=augment, ema_decay=ema_decay), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model, pgd=config.eval_pgd,
                                      loss=eval_pgd_loss(config)))
  eval_images, eval_labels = _eval_subset(dataset, config.train.get("eval_examples"))
  use_ema = ema_decay > 0

  def run_eval(step: int, epoch: int) -> dict:
    result = evaluate_accuracy(eval_fn, state.variables(use_ema), eval_images, eval_labels,
                               mesh, config.train.eval_batch_size, config.seed + 1)
    writer.write(step, {f"eval/{k}": v for k, v in result.items()}, epoch=epoch)
    if is_main:
      print(f"step {step} (epoch {epoch}): natural {100 * result['natural_accuracy']:.2f}%  "
            f"{eval_pgd_title(config)} {100 * result['pgd_accuracy']:.2f}% "
            f"on {result['num_examples']} test points", flush=True)
    return result

  step = int(state.step)
  pending: list[tuple[int, Any]] = []  # (step, metrics) not yet logged.

  def fetch() -> None:
    """Brings pending metrics to the host; raises Diverged at the first non-finite one.
    Called before every save, so no saved state ever follows a non-finite step."""
    pending[:] = jax.device_get(pending)
    bad = _first_non_finite(pending)
    if bad is not None:
      bad_step, m = bad
      ckpt.wait()
      newest = ckpt.latest_step()
      kept = (f"newest checkpoint in {workdir}: step {newest}" if newest is not None
              else "no checkpoint was saved")
      raise errors.Diverged(
          f"training diverged at step {bad_step}: loss {float(m['loss'])}, gradient norm "
          f"{float(m['grad_norm'])}; nothing from that step on was saved ({kept}). Lower "
          "optim.lr or check the data.")

  def log_train(step: int, epoch: int) -> None:
    if not pending:
      return
    fetch()
    fetched = [m for _, m in pending]
    pending.clear()
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    writer.write(step, {f"train/{k}": v for k, v in summary.items()}, epoch=epoch,
                 elapsed_s=time.time() - start_time)
    bar.set_postfix({k: f"{v:.3f}" for k, v in summary.items()
                     if k in ("loss", "accuracy", "adv_accuracy")})

  last_eval = None
  start_time = time.time()
  with ckpt.preemption_guard(), tqdm.tqdm(total=total_steps, initial=step, disable=not is_main,
                                          desc=config.get("name", "train"), unit="step") as bar:
    while step < total_steps:
      epoch = step // steps_per_epoch
      for images, labels in data.train_batches(
          dataset, batch_size=config.train.batch_size, seed=config.seed, epoch=epoch,
          start_step=step % steps_per_epoch, process_index=jax.process_index(),
          process_count=jax.process_count()):
        batch = parallel.shard_batch(mesh, {"images": images, "labels": labels})
        state, metrics = step_fn(state, batch)
        step += 1
        pending.append((step, metrics))
        if step % config.train.log_every_steps == 0 or step == total_steps:
          log_train(step, epoch)
        bar.update(1)
        end_of_epoch = step % steps_per_epoch == 0
        completed = step // steps_per_epoch
        metadata = {"epoch": completed, "config": config.get("name", "")}
        if end_of_epoch and (completed % config.train.eval_every_epochs == 0
                             or step == total_steps):
          fetch()
          last_eval = run_eval(step, completed)
          ckpt.save(step, state, force=True, metadata=metadata,
                    metrics={"pgd_accuracy": last_eval["pgd_accuracy"]})
        elif step % config.train.checkpoint_every_steps == 0:
          fetch()
          ckpt.save(step, state, metadata=metadata)
        # The last step finishes the run (results below) even if SIGTERM came meanwhile.
        if ckpt.reached_preemption(step) and step < total_steps:
          log_train(step, epoch)
          ckpt.save(step, state, force=True, metadata=dict(metadata, preempted=True))
          if is_main:
            print(f"preempted: saved step {step} to {workdir}; rerun the same command to "
                  "resume", flush=True)
          return {"preempted": True, "step": step}
        if end_of_epoch:
          break

  if last_eval is None:  # Resumed a finished run: evaluate its final state again.
    last_eval = run_eval(step, config.train.epochs)
  ckpt.save(step, state, force=True, metrics={"pgd_accuracy": last_eval["pgd_accuracy"]},
            metadata={"epoch": config.train.epochs, "config": config.get("name", "")})
  ckpt.wait()
  results = {"config": config.get("name", ""), "epochs": config.train.epochs, "steps": step,
             "natural_accuracy": last_eval["natural_accuracy"],
             "robust_accuracy": last_eval["pgd_accuracy"],
             "robust_attack": eval_pgd_title(config),
             "num_examples": last_eval["num_examples"], "ema": use_ema}
  if is_main:
    paths.write_text(workdir / "results.json", json.dumps(results, indent=2))
  return results
