r"""Weights across frameworks: PyTorch state_dicts to jaxdefense workdirs and back.

    python -m jaxdefense.interop.convert import --layout=fsr_resnet18 --torch=model.pt \
        --config=configs/fsr.py:resnet18,fsr --workdir=workdirs/fsr_authors
    python main.py --mode=eval --checkpoint=last --config=configs/fsr.py:resnet18,fsr \
        --workdir=workdirs/fsr_authors --config.eval.protocol=fsr
    python -m jaxdefense.interop.convert export --layout=resnet18 --config=... --workdir=DIR \
        --torch=model.pt [--checkpoint=last]

`import` checks every tensor of the file against the model the config builds (no missing,
unexpected or misshapen key; a `module.` or `model.` prefix is stripped) and saves it as
step 0 of DIR's checkpoints, with a fresh optimizer state and DIR/config.json as a
training writes it: `main.py --mode=eval|analyze --checkpoint=last` evaluates it,
`main.py` in DIR fine-tunes it, and `--config.init_from=DIR` starts another training from
it. `export` writes a checkpoint's weights as a state_dict that loads with
`load_state_dict(strict=True)` into the layout's PyTorch module. BatchNorm running
variances are copied as stored (PyTorch's running average uses the unbiased batch variance,
Flax's the biased one: a factor n/(n-1), n = batch x height x width, in continued training).
`--layout` lists the layouts (`jaxdefense/torch_layouts.py`). Needs PyTorch (`.[torch]`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import re
import sys
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath

from jaxdefense import checkpoint, cli, data, errors, models, parallel
from jaxdefense.config import validation
from jaxdefense.interop import torch_layouts
from jaxdefense.training import optim, train_state
from jaxdefense.workdir import lock, paths, run_config

CONV_TO_TORCH = (3, 2, 0, 1)   # HWIO -> OIHW
CONV_TO_FLAX = (2, 3, 1, 0)    # OIHW -> HWIO
PREFIXES = ("module.", "model.")  # DataParallel's and RobustBench's wrappers.


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One PyTorch tensor and where it lives in the jaxdefense variables."""
  key: str                      # PyTorch state_dict key.
  collection: str               # params | batch_stats
  path: tuple[str, ...]         # Path inside the collection.
  torch_shape: tuple[int, ...]
  kind: str                     # conv | dense | vector


def _modules(abstract: dict) -> dict[str, dict[str, dict[str, tuple]]]:
  """module path -> collection -> leaf name -> shape, for every leaf of `abstract`."""
  out: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    collection, *names, leaf_name = [k.key for k in path]
    out["/".join(names)][collection][leaf_name] = tuple(leaf.shape)
  return out


def tensors(layout: torch_layouts.Layout, abstract: dict) -> list[Tensor]:
  """Every PyTorch tensor the layout maps to a leaf of `abstract` (the model's variables)."""
  out = []
  for module, leaves in _modules(abstract).items():
    prefix = torch_layouts.torch_prefix(layout, module)
    if prefix is None:
      raise errors.WeightsMismatch(
          f"the config's model has a module {module!r} that the layout does not hold "
          f"({layout.description}); check model.arch, model.kwargs and defense.sites "
          "(the layout needs the authors' placement: defense.sites unset)")
    params, stats = leaves.get("params", {}), leaves.get("batch_stats", {})
    if "scale" in params:  # BatchNorm
      out += [Tensor(f"{prefix}.weight", "params", (*module.split("/"), "scale"),
                     params["scale"], "vector"),
              Tensor(f"{prefix}.bias", "params", (*module.split("/"), "bias"),
                     params["bias"], "vector")]
      out += [Tensor(f"{prefix}.running_{name}", "batch_stats", (*module.split("/"), name),
                     stats[name], "vector") for name in ("mean", "var")]
      continue
    if "hidden_kernel" in params:  # A CIFS nonlinear probe's hidden layer.
      out += [Tensor(f"{prefix}{layout.probe_hidden}.weight", "params",
                     (*module.split("/"), "hidden_kernel"), params["hidden_kernel"][::-1],
                     "dense"),
              Tensor(f"{prefix}{layout.probe_hidden}.bias", "params",
                     (*module.split("/"), "hidden_bias"), params["hidden_bias"], "vector")]
    if module.split("/")[-1].startswith("cifs_"):
      prefix += layout.probe_out
    kernel = params["kernel"]
    kind = "conv" if len(kernel) == 4 else "dense"
    shape = (tuple(kernel[i] for i in CONV_TO_TORCH) if kind == "conv" else kernel[::-1])
    out.append(Tensor(f"{prefix}.weight", "params", (*module.split("/"), "kernel"), shape, kind))
    if "bias" in params:
      out.append(Tensor(f"{prefix}.bias", "params", (*module.split("/"), "bias"),
                        params["bias"], "vector"))
  return out


def _bn_counters(ts: list[Tensor]) -> list[str]:
  return [t.key.replace("running_mean", "num_batches_tracked") for t in ts
          if t.key.endswith(".running_mean")]


def strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
  """The state_dict without a wrapper's prefix common to all its keys."""
  for prefix in PREFIXES:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
      return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _unwrap(obj: Any, source: str) -> dict[str, Any]:
  """The state_dict in a saved object: itself, or under a usual key of a training checkpoint."""
  if isinstance(obj, dict):
    for key in ("state_dict", "model_state_dict", "model", "net"):
      if isinstance(obj.get(key), dict):
        return obj[key]
    if all(isinstance(k, str) for k in obj):
      return obj
  raise errors.WeightsMismatch(f"{source} holds a {type(obj).__name__}, not a state_dict "
                        "(a dict of tensor names to tensors)")


def to_variables(state_dict: dict[str, Any], layout: torch_layouts.Layout, abstract: dict,
                 num_classes: int) -> dict:
  """The jaxdefense variables ({"params", "batch_stats"}, numpy float32) held by a
  PyTorch state_dict of `layout`, shaped as `abstract`; WeightsMismatch naming every
  missing or unexpected key, or the first misshapen one."""
  sd = {k: _numpy(v) for k, v in strip_prefix(state_dict).items()}
  ts = tensors(layout, abstract)
  known = {t.key for t in ts} | set(_bn_counters(ts))
  unused = re.compile(layout.unused) if layout.unused else None
  unexpected = sorted(k for k in sd if k not in known and not (unused and unused.match(k)))
  missing = [t.key for t in ts if t.key not in sd]
  if missing or unexpected:
    raise errors.WeightsMismatch(
        f"the state_dict does not fit layout ({layout.description}) with this config's "
        f"model: {len(missing)} missing key(s) {_listing(missing)}; {len(unexpected)} "
        f"unexpected key(s) {_listing(unexpected)}")
  variables: dict = {"params": {}, "batch_stats": {}}
  for t in ts:
    value = sd[t.key]
    if value.shape != t.torch_shape:
      raise errors.WeightsMismatch(_shape_message(t, value.shape, num_classes, layout))
    if t.kind == "conv":
      value = value.transpose(CONV_TO_FLAX)
    elif t.kind == "dense":
      value = value.T
    node = variables[t.collection]
    for name in t.path[:-1]:
      node = node.setdefault(name, {})
    node[t.path[-1]] = np.ascontiguousarray(value, np.float32)
  if not variables["batch_stats"]:
    del variables["batch_stats"]
  return variables


def _shape_message(t: Tensor, got: tuple, num_classes: int, layout: torch_layouts.Layout) -> str:
  message = f"{t.key} has shape {tuple(got)}; the config's model needs {t.torch_shape}"
  if t.kind == "dense" and len(got) == 2 and got[1] == t.torch_shape[1]:
    message += (f": a class-count mismatch, the file has {got[0]} classes and the config's "
                f"data set {num_classes}")
    if layout.defense == "cas" and "fc" in t.key and t.torch_shape[0] != 10 and got[0] == 10:
      message += " (the CAS code hard-codes 10 classes in its CAS heads)"
  return message


def _listing(keys: list[str], limit: int = 8) -> str:
  if not keys:
    return "[]"
  shown = ", ".join(keys[:limit])
  return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor
    return value.detach().cpu().numpy()
  return np.asarray(value)


def to_state_dict(variables: dict, layout: torch_layouts.Layout) -> dict[str, np.ndarray]:
  """The PyTorch state_dict (numpy values; int64 BN counters) of jaxdefense `variables`."""
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.float32), variables)
  ts = tensors(layout, abstract)
  sd: dict[str, np.ndarray] = {}
  for t in ts:
    value = np.asarray(_get(variables[t.collection], t.path), np.float32)
    if t.kind == "conv":
      value = value.transpose(CONV_TO_TORCH)
    elif t.kind == "dense":
      value = value.T
    sd[t.key] = np.ascontiguousarray(value)
  for key in _bn_counters(ts):
    sd[key] = np.zeros((), np.int64)
  if layout.unused_source:
    sd.update(_unused_tensors(sd, layout))
  return sd


def _unused_tensors(sd: dict[str, np.ndarray], layout: torch_layouts.Layout) -> Iterator:
  """The never-read module (WRN's sub_block1), shaped as its twin: BN defaults, zero weights."""
  target = layout.unused.replace("\\", "")
  for key, value in list(sd.items()):
    if key.startswith(layout.unused_source):
      name = target + key[len(layout.unused_source):]
      fill = 1 if key.endswith((".running_var",)) or (
          key.endswith(".weight") and value.ndim == 1) else 0
      yield name, np.full_like(value, fill)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _torch():
  try:
    import torch  # noqa: PLC0415  (the optional dependency)
  except ImportError as e:
    raise errors.RunError(f"reading or writing PyTorch files needs PyTorch ({e}): "
                          'pip install -e ".[torch]"') from e
  return torch


def get_layout(name: str) -> torch_layouts.Layout:
  if name not in torch_layouts.LAYOUTS:
    raise errors.WeightsMismatch(f"unknown layout {name!r}; allowed: "
                                 f"{', '.join(torch_layouts.LAYOUTS)}")
  return torch_layouts.LAYOUTS[name]


def check_config(config: ml_collections.ConfigDict, layout: torch_layouts.Layout,
                 name: str) -> None:
  """WeightsMismatch if the config's model cannot be the layout's."""
  problems = []
  if config.model.arch not in layout.archs:
    problems.append(f"model.arch={config.model.arch!r} (allowed: {', '.join(layout.archs)})")
  if config.defense.name != layout.defense:
    problems.append(f"defense.name={config.defense.name!r} (needs {layout.defense!r})")
  kwargs = config.model.kwargs.to_dict()
  for field, value in layout.model_kwargs.items():
    if kwargs.get(field) != value:
      problems.append(f"model.kwargs.{field}={kwargs.get(field)!r} (needs {value!r})")
  if problems:
    raise errors.WeightsMismatch(f"layout {name} ({layout.description}) does not fit the config: "
                          + "; ".join(problems))


def _data_spec(config: ml_collections.ConfigDict) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, image shape) of the config's data set, without reading CIFAR / SVHN."""
  name = config.data.name
  if name in data.TFDS_NAMES:
    return data.NUM_CLASSES[name], (32, 32, 3)
  dataset = data.from_config(config)
  return dataset.num_classes, dataset.image_shape


def _train_state(config: ml_collections.ConfigDict):
  num_classes, image_shape = _data_spec(config)
  model = models.from_config(config, num_classes)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  state = train_state.create(model, tx, jax.random.key(config.seed), image_shape,
                                   ema=train_state.uses_ema(config))
  return state, num_classes


def import_torch(config: ml_collections.ConfigDict, workdir: epath.PathLike, layout_name: str,
                 torch_path: str) -> epath.Path:
  """Writes the weights in `torch_path` as step 0 of `workdir`'s checkpoints."""
  torch = _torch()
  validation.validate(config, parallel.make_mesh())
  layout = get_layout(layout_name)
  check_config(config, layout, layout_name)
  workdir = paths.resolve(workdir)
  source = epath.Path(torch_path)
  if not source.is_file():
    raise errors.WeightsMismatch(f"--torch={torch_path}: no such file")
  raw = source.read_bytes()
  try:
    obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
  except Exception as e:  # torch.load raises pickle, zip and runtime errors alike.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise errors.WeightsMismatch(f"--torch={torch_path} is not a PyTorch state_dict that "
                                 f"torch.load reads with weights_only=True ({reason})") from e
  state, num_classes = _train_state(config)
  abstract = state.variables()
  variables = to_variables(_unwrap(obj, torch_path), layout, abstract, num_classes)
  directory = workdir / "checkpoints"
  paths.check_writable(workdir)
  run_config.check_config(workdir, config)
  with lock.Lease(workdir, config.train.lease_timeout_s):
    ckpt = checkpoint.Checkpointer(directory, save_every_steps=1, keep=1,
                                   best_metric=train_state.BEST_METRIC)
    try:
      if ckpt.all_steps():
        raise errors.RunError(f"{directory} already holds checkpoints "
                                 f"(steps {ckpt.all_steps()}); import into a new workdir")
      params, stats = variables["params"], variables.get("batch_stats", {})
      ema = ({"params": params, "batch_stats": stats} if state.ema is not None else None)
      state = state.replace(params=params, batch_stats=stats, ema=ema)
      ckpt.save(0, state, force=True, metadata={
          "imported_from": str(source), "layout": layout_name,
          "sha256": hashlib.sha256(raw).hexdigest()})
      ckpt.wait()
    finally:
      ckpt.close()
    run_config.record_config(workdir, config)
  return directory


def export_torch(config: ml_collections.ConfigDict, workdir: epath.PathLike, layout_name: str,
                 torch_path: str, which: str = "latest") -> int:
  """Writes a checkpoint of `workdir` as a PyTorch state_dict; returns its step."""
  torch = _torch()
  mesh = parallel.make_mesh()
  validation.validate(config, mesh)
  layout = get_layout(layout_name)
  check_config(config, layout, layout_name)
  workdir = paths.resolve(workdir)
  run_config.check_trained(workdir, config)
  num_classes, image_shape = _data_spec(config)
  model = models.from_config(config, num_classes)
  variables, step = train_state.restore_variables(config, workdir, which, model, image_shape, mesh)
  sd = to_state_dict(jax.device_get(variables), layout)
  buffer = io.BytesIO()
  torch.save(collections.OrderedDict((k, torch.tensor(v)) for k, v in sd.items()), buffer)
  paths.write_bytes(epath.Path(paths.resolve(torch_path)), buffer.getvalue())
  return step


def main(argv: list[str]) -> None:
  from absl import flags  # noqa: PLC0415
  flag_values = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    print(f"error: usage: python -m jaxdefense.interop.convert import|export --layout=... "
          f"(got {' '.join(argv[1:]) or 'no command'}); --help lists the flags",
          file=sys.stderr, flush=True)
    sys.exit(errors.ConfigError.exit_code)
  cli.quiet_logging()
  with cli.faults_as_one_line(flag_values.workdir):
    if argv[1] == "import":
      directory = import_torch(flag_values.config, flag_values.workdir, flag_values.layout,
                               flag_values.torch)
      print(f"imported {flag_values.torch} ({flag_values.layout}) as step 0 of {directory}")
    else:
      step = export_torch(flag_values.config, flag_values.workdir, flag_values.layout,
                          flag_values.torch,
                          which="best" if flag_values.checkpoint == "best" else "latest")
      print(f"exported step {step} of {flag_values.workdir} to {flag_values.torch} "
            f"({flag_values.layout})")


def define_flags() -> None:
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415
  listing = "; ".join(f"{k}: {v.description}" for k, v in torch_layouts.LAYOUTS.items())
  flags.DEFINE_enum("layout", None, list(torch_layouts.LAYOUTS), f"PyTorch layout. {listing}")
  flags.DEFINE_string("torch", None, "The PyTorch state_dict file (read by import, written "
                                     "by export).")
  flags.DEFINE_string("workdir", None, "The jaxdefense workdir (written by import, read by "
                                       "export).")
  flags.DEFINE_enum("checkpoint", "last", ["best", "last", "latest"],
                    "export: which checkpoint (as main.py's --checkpoint; last = latest).")
  config_flags.DEFINE_config_file("config", None, "The config that builds the model "
                                  "(configs/*.py), as for main.py.", lock_config=True)
  flags.mark_flags_as_required(["layout", "torch", "workdir", "config"])


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
