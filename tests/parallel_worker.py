"""Runs training steps of a tiny model on device meshes and saves the results (.npz).

Used by test_parallel.py in a subprocess (device counts must be set before JAX starts):

  python tests/parallel_worker.py OUT_PREFIX --devices 8 --mesh-devices 1,8 \
      --cases fsr:pgd_at,cas:trades,autoattack

writes OUT_PREFIX-<defense>-<objective>-<mesh devices>.npz for every case and mesh size
(the first M devices of the process), all from the same global batches and rngs; the case
`autoattack` runs the standard version (reduced budgets) on a batch sharded over the mesh
and writes OUT_PREFIX-autoattack-<mesh devices>.npz.
"""
import argparse
import functools

import jax

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
parser.add_argument("--mesh-devices", default=None,
                    help="comma-separated mesh sizes, each the first M devices (default: all)")
parser.add_argument("--cases", default="fsr:pgd_at", help="comma-separated defense:objective")
parser.add_argument("--steps", type=int, default=1)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--eps", type=float, default=0.12, help="the autoattack case's L-inf eps")
args = parser.parse_args()

jax.config.update("jax_num_cpu_devices", args.devices)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402  (after the device count is set)
import optax  # noqa: E402

from jaxdefense import attacks, defenses, models, parallel  # noqa: E402
from jaxdefense.evaluation import indicators  # noqa: E402
from jaxdefense.training import objectives, steps, train_state  # noqa: E402


def run(defense_name: str, objective_name: str, mesh) -> dict[str, np.ndarray]:
  parallel.check_batch_size(args.batch, mesh)
  defense = defenses.DefenseConfig(name=defense_name)
  model = models.create("wide_resnet", num_classes=4, defense=defense, depth=10, width=1)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  state = parallel.replicate(mesh, train_state.create(model, tx, jax.random.key(0),
                                                            (8, 8, 1), ema=True))
  objective = objectives.make(objective_name, model, defense,
                              objectives.AttackConfig(eps=0.1, step_size=0.03, steps=3))
  step = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx,
                                   schedule=optax.constant_schedule(0.1),
                                   augment=lambda key, x: x.astype(np.float32) / 255,
                                   recipe=steps.Recipe(ema_decay=lambda step: 0.9,
                                                       awp_gamma=0.01, label_smoothing=0.1)),
                  donate_argnums=0)
  rng = np.random.default_rng(0)
  for _ in range(args.steps):
    images = rng.integers(0, 256, (args.batch, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, (args.batch,)).astype(np.int32)
    state, metrics = step(state, parallel.shard_batch(mesh, {"images": images,
                                                             "labels": labels}))
  flat = {f"state/{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path({"params": state.params,
                                               "batch_stats": state.batch_stats,
                                               "ema": state.ema})}
  flat.update({f"metrics/{k}": np.asarray(v) for k, v in metrics.items()})
  return flat


AUTOATTACK_BUDGET = {"apgd_ce": {"steps": 10, "unroll": 1},
                     "apgd_t": {"steps": 5, "n_target": 2, "unroll": 1},
                     "fab_t": {"steps": 5, "n_target": 2, "unroll": 1},
                     "square": {"queries": 100}}


def run_autoattack(mesh) -> dict[str, np.ndarray]:
  """Standard AutoAttack on a tiny random model's own predictions, the batch sharded over
  `mesh`: each attack's per-point results and the adversarial points."""
  parallel.check_batch_size(args.batch, mesh)
  model = models.create("wide_resnet", num_classes=4,
                        defense=defenses.DefenseConfig(name="none"), depth=10, width=1)
  variables = parallel.replicate(mesh, models.init(model, jax.random.key(0), (8, 8, 1)))
  x = np.random.default_rng(0).uniform(size=(args.batch, 8, 8, 1)).astype(np.float32)
  labels = np.asarray(attacks.deployed(model, variables)(x).logits.argmax(-1), np.int32)
  batch = parallel.shard_batch(mesh, {"x": x, "labels": labels})
  result = jax.jit(lambda v, x, y: attacks.autoattack(
      attacks.deployed(model, v), x, y, jax.random.key(1), eps=args.eps,
      options=AUTOATTACK_BUDGET))(variables, batch["x"], batch["labels"])
  # The batch stays split over every device of the mesh.
  assert result.x_adv.sharding.device_set == set(mesh.devices.flat), result.x_adv.sharding
  assert mesh.size == 1 or not result.x_adv.sharding.is_fully_replicated
  out = {"x_adv": np.asarray(result.x_adv), "robust": np.asarray(result.robust),
         "clean": np.asarray(result.clean)}
  out.update({f"after/{k}": np.asarray(v) for k, v in result.robust_after.items()})
  return out


def run_indicators(mesh) -> dict[str, np.ndarray]:
  """The indicators of attack failure on the same tiny model, the batch sharded over
  `mesh` (the surrogate: the same architecture, other weights): every per-point value."""
  model = models.create("wide_resnet", num_classes=4,
                        defense=defenses.DefenseConfig(name="none"), depth=10, width=1)
  variables = parallel.replicate(mesh, models.init(model, jax.random.key(0), (8, 8, 1)))
  other = parallel.replicate(mesh, models.init(model, jax.random.key(1), (8, 8, 1)))
  x = np.random.default_rng(0).uniform(size=(args.batch, 8, 8, 1)).astype(np.float32)
  labels = np.asarray(attacks.deployed(model, variables)(x).logits.argmax(-1), np.int32)
  batch = parallel.shard_batch(mesh, {"x": x, "labels": labels})
  values = jax.jit(lambda v, o, x, y: indicators.batch(
      attacks.deployed(model, v), attacks.deployed(model, v), attacks.losses.cross_entropy,
      x, y, jax.random.key(2), eps=args.eps, step_size=args.eps / 4, steps=5, norm="linf",
      random_start=True, iterations=(1, 5), surrogate_fn=attacks.deployed(model, o)))(
          variables, other, batch["x"], batch["labels"])
  assert values["correct"].sharding.device_set == set(mesh.devices.flat)
  return {k: np.asarray(v) for k, v in values.items()}


sizes = [int(m) for m in args.mesh_devices.split(",")] if args.mesh_devices else [args.devices]
for case in args.cases.split(","):
  for size in sizes:
    mesh = parallel.make_mesh(jax.devices()[:size])
    if case == "autoattack":
      np.savez(f"{args.out}-autoattack-{size}.npz", **run_autoattack(mesh))
      continue
    if case == "indicators":
      np.savez(f"{args.out}-indicators-{size}.npz", **run_indicators(mesh))
      continue
    defense_name, objective_name = case.split(":")
    result = run(defense_name, objective_name, mesh)
    np.savez(f"{args.out}-{defense_name}-{objective_name}-{size}.npz", **result)
