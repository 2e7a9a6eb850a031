"""What --mode=eval, audit and analyze do before they attack (`load`): resolve the workdir,
build the mesh, validate the config once, check that the workdir holds a model this config
builds, load the data, build the model in the evaluation's compute dtype (`compute_dtype`),
restore its variables, and take the first `eval.num_examples` test points; for the audit,
also its surrogate (another workdir's model of the same data).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from jaxdefense import data, errors, models, parallel
from jaxdefense.config import validation
from jaxdefense.training import train_state
from jaxdefense.workdir import paths, run_config

SURROGATE_FLAG = "--config.audit.surrogate_workdir"


@dataclasses.dataclass(frozen=True)
class Setup:
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  dataset: data.Dataset
  model: Any
  variables: dict
  step: int                   # The restored checkpoint's step.
  images: np.ndarray          # The first eval.num_examples test points (uint8 NHWC) ...
  labels: np.ndarray          # ... and their labels.
  dtype: str                  # The model's compute dtype (`compute_dtype`).
  surrogate: tuple[Any, dict] | None = None  # The audit's (model, variables), if asked for.

  def progress(self, kind: str, config: ml_collections.ConfigDict,
               **identity: Any) -> epath.Path:
    """`workdir/kind/KEY`: where an interrupted run keeps its finished batches, KEY the first
    16 hex digits of the SHA-256 of what decides them (this step, `config.eval`, `identity`,
    the number of points, the model's parameter fields), so that only the same run reuses
    them."""
    text = json.dumps({"step": self.step, "eval": config.eval.to_dict(), **identity,
                       "points": len(self.labels),
                       "model": run_config.parameter_fields(config)},
                      sort_keys=True, default=str)
    return self.workdir / kind / hashlib.sha256(text.encode()).hexdigest()[:16]


def compute_dtype(config: ml_collections.ConfigDict) -> str:
  """eval.dtype, else the model's: the dtype the evaluation computes in (inputs,
  perturbations, logits and losses stay float32: the backbones cast inputs in and logits
  out)."""
  return config.eval.dtype or config.model.dtype


def surrogate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The config `audit.surrogate_workdir` was trained with, checked against ours (data set,
  classes, input size); None without a surrogate."""
  directory = config.audit.surrogate_workdir
  if not directory:
    return None
  other = run_config.recorded_config(paths.resolve(directory), SURROGATE_FLAG)
  ours = (config.data.name, data.NUM_CLASSES[config.data.name], config.data.image_size)
  theirs = (other.data.name, data.NUM_CLASSES.get(other.data.name), other.data.image_size)
  if theirs != ours:
    raise errors.ConfigError(
        f"{SURROGATE_FLAG}={directory} holds a model of data set {theirs[0]!r} ({theirs[1]} "
        f"classes, image size {theirs[2]}); this audit's is {ours[0]!r} ({ours[1]} classes, "
        f"image size {ours[2]}): give a surrogate trained on the same data")
  return other


def restored(config: ml_collections.ConfigDict, workdir: epath.Path, which: str,
             dataset: data.Dataset, mesh, dtype: str) -> tuple[Any, dict, int]:
  """(model, variables, step): `config`'s model computing in `dtype`, with the variables of
  `workdir`'s checkpoint `which` ("latest", "best" or a step)."""
  model = models.from_config(config, dataset.num_classes, dtype=dtype)
  variables, step = train_state.restore_variables(config, workdir, which, model,
                                                  dataset.image_shape, mesh)
  return model, variables, step


def load(config: ml_collections.ConfigDict, workdir: epath.PathLike, which: str, *,
         attacks: tuple[str, ...] = (), surrogate: bool = False) -> Setup:
  """The set-up of an evaluation of `workdir`'s checkpoint `which`. Everything is checked
  before any data loads: the config (with `attacks`, the evaluation attacks this mode runs
  instead of eval's protocol: the audit's AutoAttack), the surrogate's config (with
  `surrogate`), and that the workdir was
  trained with a config that builds this model. The surrogate is its workdir's latest
  checkpoint, computing in eval.dtype, else in its own config's."""
  workdir = paths.resolve(workdir)
  mesh = parallel.make_mesh()
  validation.validate(config, mesh, eval_attacks=attacks or None)
  other = surrogate_config(config) if surrogate else None
  run_config.check_trained(workdir, config)
  dataset = data.from_config(config)
  dtype = compute_dtype(config)
  model, variables, step = restored(config, workdir, which, dataset, mesh, dtype)
  if other is not None:
    surrogate_model, surrogate_variables, _ = restored(
        other, paths.resolve(config.audit.surrogate_workdir), "latest", dataset, mesh,
        config.eval.dtype or compute_dtype(other))
  n = config.eval.num_examples or len(dataset.test_labels)
  return Setup(workdir=workdir, mesh=mesh, dataset=dataset, model=model, variables=variables,
               step=step, images=dataset.test_images[:n], labels=dataset.test_labels[:n],
               dtype=dtype,
               surrogate=None if other is None else (surrogate_model, surrogate_variables))
