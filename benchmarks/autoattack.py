r"""AutoAttack side by side: jaxdefense against fra31/auto-attack (PyPI `pyautoattack`) on the
same weights, points and eps.

    pip install -e ".[benchmark]"
    python main.py --config=configs/quickstart.py --workdir=workdirs/quickstart
    python benchmarks/autoattack.py --workdir=workdirs/quickstart --points=60
    python benchmarks/autoattack.py --workdir=workdirs/quickstart --points=16 \
        --components=apgd-ce,square --repeats=2

The quick-start model's checkpoint is moved to PyTorch with `jaxdefense.convert` (layout
`resnet18`: kuangliu's ResNet, here with three stages of one block) and loaded into the
PyTorch module of that layout (tests/torch_models.py). Each component (`standard` is the
whole standard version, else one attack alone: apgd-ce, apgd-t, fab-t, square) runs on
both sides alternately, `--repeats` times; jaxdefense's first run includes compilation,
reported apart. Printed per component and side: seconds, points per second, forward and
backward passes (examples x model calls, as adv-lib counts them), robust accuracy, the
ratio of the times, and the points one side breaks and the other does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdefense import attacks, convert, layouts, parallel, paths, train, xla_flags  # noqa: E402

COMPONENTS = ("standard", "apgd-ce", "apgd-t", "fab-t", "square")


def load_quickstart(workdir: str):
  """The quick-start config, its model and the workdir's latest variables."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("qs", os.path.join(ROOT, "configs",
                                                                    "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("none")
  dataset = train.load_data(config)
  model = train.build_model(config, dataset.num_classes)
  variables, step = train.restore_variables(config, paths.resolve(workdir), "latest",
                                            model, dataset.image_shape, parallel.make_mesh())
  return config, dataset, model, jax.device_get(variables), step


def torch_model(variables, config):
  """The same weights in the PyTorch module of layout `resnet18`, eval mode, NCHW logits."""
  import torch
  from tests import torch_models
  sd = convert.to_state_dict(variables, layouts.LAYOUTS["resnet18"])
  kwargs = config.model.kwargs
  module = torch_models.ResNet(blocks=tuple(kwargs.stage_sizes), width=kwargs.width,
                               in_channels=1)
  module.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  module.eval()
  return module


def counted_torch(module):
  """A logits-only PyTorch module that counts forward and backward passes per example
  (`.passes`: [forward, backward]; the reference's start-up checks' calls included)."""
  import torch

  passes = [0, 0]

  class Count(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
      passes[0] += x.shape[0]
      return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
      passes[1] += grad.shape[0]
      return grad

  class Counted(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.inner, self.passes = module, passes

    def forward(self, x):
      return self.inner(Count.apply(x))[0]

  return Counted().eval()


def jax_runner(model, variables, eps, component, seed):
  """A function (x, y) -> (robust, seconds, forward, backward), compiled on its first call."""
  counter = attacks.PassCounter()
  names = None if component == "standard" else (component,)

  @jax.jit
  def attack(x, y):
    fn = counter.wrap(attacks.deployed(model, variables))
    return attacks.autoattack(fn, x, y, jax.random.key(seed), eps=eps, attacks=names).robust

  def run(x, y):
    before = counter.forward, counter.backward
    start = time.perf_counter()
    robust = np.asarray(attack(x, y))
    jax.effects_barrier()
    return (robust, time.perf_counter() - start, counter.forward - before[0],
            counter.backward - before[1])
  return run


def run_torch(module, x, y, eps, component, seed):
  import pyautoattack
  import torch
  counted = counted_torch(module)
  adversary = pyautoattack.AutoAttack(counted, norm="Linf", eps=eps, version="standard",
                                      device="cpu", seed=seed)
  if component != "standard":  # One attack with the standard version's budget.
    adversary.attacks_to_run = [component]
  adversary.verbose = False
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))
  yt = torch.tensor(np.asarray(y), dtype=torch.long)
  start = time.perf_counter()
  x_adv, _ = adversary.run_standard_evaluation(xt, yt, batch_size=len(yt))
  seconds = time.perf_counter() - start
  with torch.no_grad():
    robust = (module(x_adv)[0].argmax(1) == yt).numpy()
  return robust, seconds, *counted.passes


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="workdirs/quickstart")
  p.add_argument("--points", type=int, default=60)
  p.add_argument("--eps", type=float, default=None, help="default: the config's eval.eps")
  p.add_argument("--components", default=",".join(COMPONENTS))
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="also write the rows here")
  a = p.parse_args()
  components = a.components.split(",")
  bad = [c for c in components if c not in COMPONENTS]
  if bad:
    p.error(f"--components: {bad} not in {', '.join(COMPONENTS)}")
  xla_flags.set_cpu_defaults()
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  config, dataset, model, variables, step = load_quickstart(a.workdir)
  eps = a.eps if a.eps is not None else config.eval.eps
  x = dataset.test_images[:a.points].astype(np.float32) / 255
  y = dataset.test_labels[:a.points].astype(np.int32)
  module = torch_model(variables, config)
  with torch.no_grad():
    torch_clean = module(torch.tensor(x.transpose(0, 3, 1, 2)))[0].argmax(1).numpy() == y
  jax_clean = np.asarray(jnp.argmax(attacks.deployed(model, variables)(x).logits, -1)) == y
  print(f"quick-start model (step {step}), {a.points} test points, eps {eps:.4f} L-inf; "
        f"clean accuracy jaxdefense {jax_clean.mean():.2%}, PyTorch {torch_clean.mean():.2%}; "
        f"{jax.devices()[0].platform}, torch {torch.__version__} on CPU "
        f"({torch.get_num_threads()} threads)", flush=True)
  rows = []
  for component in components:
    times = {"jax": [], "torch": []}
    run_jax = jax_runner(model, variables, eps, component, a.seed)
    for repeat in range(a.repeats + 1):  # jax's first run compiles: an extra run.
      robust_j, seconds_j, fwd_j, bwd_j = run_jax(x, y)
      times["jax"].append(seconds_j)
      if repeat < a.repeats:
        robust_t, seconds_t, fwd_t, bwd_t = run_torch(module, x, y, eps, component, a.seed)
        times["torch"].append(seconds_t)
    run_j = min(times["jax"][1:]) if a.repeats else times["jax"][0]
    run_t = min(times["torch"])
    row = {"component": component, "points": a.points,
           "jax": {"seconds": run_j, "first_run_seconds": times["jax"][0],
                   "points_per_s": a.points / run_j, "forward": fwd_j, "backward": bwd_j,
                   "robust_accuracy": float(robust_j.mean())},
           "torch": {"seconds": run_t, "points_per_s": a.points / run_t, "forward": fwd_t,
                     "backward": bwd_t, "robust_accuracy": float(robust_t.mean())},
           "ratio_jax_over_torch": run_j / run_t,
           "broken_by_jax_only": np.flatnonzero(~robust_j & robust_t).tolist(),
           "broken_by_torch_only": np.flatnonzero(robust_j & ~robust_t).tolist()}
    rows.append(row)
    print(f"{component:9s} jaxdefense {run_j:8.1f} s ({row['jax']['points_per_s']:6.2f} pt/s, "
          f"first run {times['jax'][0]:.1f} s; {fwd_j} fwd / {bwd_j} bwd; robust "
          f"{robust_j.mean():.2%}) | auto-attack {run_t:8.1f} s "
          f"({row['torch']['points_per_s']:6.2f} pt/s; {fwd_t} fwd / {bwd_t} bwd; robust "
          f"{robust_t.mean():.2%}) | time ratio {row['ratio_jax_over_torch']:.2f}; broken by "
          f"one only: jax {row['broken_by_jax_only']}, torch {row['broken_by_torch_only']}",
          flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
