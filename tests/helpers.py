"""What several test modules share: the repository's root, the tiny quick-start config (as
flags for main.py and as a ConfigDict), running main.py, loading config files, and reading
a saved train state."""
import importlib.util
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxdefense.data import batching

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quick-start config shrunk to seconds on a 2-core CPU, for main.py (TINY, as flags) and
# in-process runs (tiny_config): the same programs, so they share compiled code (conftest).
TINY_OVERRIDES = {
    "data.num_train": 96, "data.num_test": 48, "data.image_size": 8,
    "model.kwargs.stage_sizes": (1, 1), "model.kwargs.width": 8,
    "objective.attack.steps": 2, "eval_pgd.steps": 2, "optim.milestones": (1,),
    "train.epochs": 2, "train.batch_size": 32, "train.eval_batch_size": 24,
    "train.ema_decay": 0.5, "train.log_every_steps": 2, "train.checkpoint_every_steps": 2,
    "train.eval_every_epochs": 1}
TINY = [f"--config.{k}=" + (f"({','.join(map(str, v))},)" if isinstance(v, tuple) else str(v))
        for k, v in TINY_OVERRIDES.items()]


def load_config(name: str, argument: str | None = None) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s config (with `argument` after the path, as `name.py:argument`)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument is not None else module.get_config()


def tiny_config(defense: str = "none", objective: str = "pgd_at") -> ml_collections.ConfigDict:
  """A new copy of the quick-start config with TINY_OVERRIDES (callers may change it)."""
  c = load_config("quickstart", defense)
  c.objective.name = objective
  return override(c, TINY_OVERRIDES)


def override(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """`config` with each dotted field of `values` set (as --config.FIELD=VALUE would)."""
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Training steps per epoch of a config whose data.num_train is set."""
  return batching.steps_per_epoch(config.data.num_train, config.train.batch_size,
                                  extra_fraction=config.data.extra_fraction,
                                  epoch_steps=config.data.epoch_steps)


EXTRA_MARKER = 255  # Every pixel of the extra images `with_generated_recipe` writes.


def write_extra(path, num: int, image_shape, num_classes: int = 10, seed: int = 0,
                value: int | None = EXTRA_MARKER) -> str:
  """An extra-data .npz of `num` images (every pixel `value`, or random if None) and random
  labels; its path."""
  rng = np.random.default_rng(seed)
  images = (rng.integers(0, 256, (num, *image_shape), np.uint8) if value is None else
            np.full((num, *image_shape), value, np.uint8))
  np.savez(path, image=images, label=rng.integers(0, num_classes, num))
  return os.fspath(path)


def with_generated_recipe(config: ml_collections.ConfigDict, extra_path) -> None:
  """`config` (tiny) trained as the generated-data recipes train: half of every batch from
  the extra .npz, label smoothing on the extra labels, AWP from epoch 1, warm-up + cosine,
  Nesterov without BatchNorm decay, the dynamic EMA over parameters only."""
  c = config
  c.data.extra, c.data.extra_fraction = (os.fspath(extra_path),), 0.5
  c.objective.label_smoothing, c.objective.label_smoothing_on = 0.1, "extra"
  c.objective.awp_gamma, c.objective.awp_warmup_epochs = 0.01, 1
  c.optim.schedule, c.optim.warmup_epochs = "cosine", 1
  c.optim.nesterov, c.optim.decay_batchnorm = True, False
  c.train.ema_decay, c.train.ema_schedule, c.train.ema_warmup_steps = 0.9, "warmup", 2
  c.train.ema_batch_stats = "live"


def total_steps(config: ml_collections.ConfigDict) -> int:
  return config.train.epochs * steps_per_epoch(config)


def kept_checkpoints(config: ml_collections.ConfigDict) -> list[int]:
  """The steps a finished run keeps: saved every checkpoint_every_steps and at each
  epoch's end, the last keep_checkpoints of them."""
  k = steps_per_epoch(config)
  saved = [s for s in range(1, total_steps(config) + 1)
           if s % config.train.checkpoint_every_steps == 0 or s % k == 0]
  return saved[-config.train.keep_checkpoints:]


def run_main(workdir, *flags, config: str = "configs/quickstart.py", env: dict | None = None,
             timeout: int = 300, cwd: str = ROOT) -> subprocess.CompletedProcess:
  """`python main.py --config=... --workdir=... FLAGS` in a subprocess, output captured."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), f"--config={config}",
                         f"--workdir={workdir}", *flags], cwd=cwd, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def saved_state(checkpoints, step: int) -> dict[str, np.ndarray]:
  """The train state saved at `step`, as NumPy arrays by key path."""
  path = checkpoints / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        checkpointer.metadata(path).item_metadata.tree)
  state = checkpointer.restore(path, target)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}
