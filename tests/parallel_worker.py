"""Runs training steps of a tiny model on a device mesh and saves the result (.npz).

Used by test_parallel.py in subprocesses (device counts must be set before JAX starts):

  python tests/parallel_worker.py OUT --devices N [--mesh-devices M]
  python tests/parallel_worker.py OUT --devices 2 --coordinator 127.0.0.1:PORT \
      --num-processes 2 --process-id I
"""
import argparse
import functools

import jax

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
parser.add_argument("--mesh-devices", type=int, default=None, help="use the first M devices")
parser.add_argument("--defense", default="fsr")
parser.add_argument("--objective", default="pgd_at")
parser.add_argument("--steps", type=int, default=1)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--coordinator", default=None)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
args = parser.parse_args()

jax.config.update("jax_num_cpu_devices", args.devices)
jax.config.update("jax_default_matmul_precision", "highest")
if args.coordinator:
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=60)

import numpy as np  # noqa: E402  (after the device count is set)
import optax  # noqa: E402

from jaxdefense import defenses, models, objectives, parallel, train  # noqa: E402

devices = jax.devices()[:args.mesh_devices] if args.mesh_devices else jax.devices()
mesh = parallel.make_mesh(devices)
parallel.check_batch_size(args.batch, mesh)
defense = defenses.DefenseConfig(name=args.defense)
model = models.create("wide_resnet", num_classes=4, defense=defense, depth=10, width=1)
tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
state = parallel.replicate(mesh, train.create_train_state(model, tx, jax.random.key(0),
                                                          (8, 8, 1), ema=True))
objective = objectives.make(args.objective, model, defense,
                            objectives.AttackConfig(eps=0.1, step_size=0.03, steps=3))
step = jax.jit(functools.partial(train.train_step, objective=objective, tx=tx,
                                 schedule=optax.constant_schedule(0.1),
                                 augment=lambda key, x: x.astype(np.float32) / 255,
                                 ema_decay=0.9), donate_argnums=0)

rng = np.random.default_rng(0)
share = args.batch // jax.process_count()
for _ in range(args.steps):
  images = rng.integers(0, 256, (args.batch, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 4, (args.batch,)).astype(np.int32)
  lo = jax.process_index() * share
  batch = parallel.shard_batch(mesh, {"images": images[lo:lo + share],
                                      "labels": labels[lo:lo + share]})
  state, metrics = step(state, batch)

if jax.process_index() == 0:
  flat = {f"state/{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path({"params": state.params,
                                               "batch_stats": state.batch_stats,
                                               "ema": state.ema})}
  flat.update({f"metrics/{k}": np.asarray(v) for k, v in metrics.items()})
  np.savez(args.out, **flat)
