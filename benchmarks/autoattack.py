r"""AutoAttack side by side: jaxdefense against the PyTorch implementations on the same
weights, points and eps: fra31/auto-attack (PyPI `pyautoattack`, the reference) and
torchattacks' AutoAttack.

    pip install -e ".[benchmark]"
    pip install --no-deps torchattacks==3.5.1    # optional second peer, see below
    python main.py --config=configs/quickstart.py --workdir=workdirs/quickstart
    python benchmarks/autoattack.py --workdir=workdirs/quickstart --points=120 \
        --components=standard
    python benchmarks/autoattack.py --workdir=workdirs/quickstart --points=60 \
        --components=apgd_ce,apgd_t,fab_t,square
    python benchmarks/autoattack.py --model=resnet18 --points=8 --budget=0.05
    python benchmarks/autoattack.py --workdir=workdirs/quickstart --points=120 --norm=l1 \
        --eps=2 --peers=auto-attack

Models. `quickstart` (default): the quick-start checkpoint in `--workdir`, moved to PyTorch
with `jaxdefense.interop.convert` (layout `resnet18`: kuangliu's ResNet, here with three stages of
one block) on the digits test points. `resnet18` (layout `resnet18`) and `wrn34_10` (layout
`trades_wrn`): random weights on random CIFAR-shaped inputs, for timing only, in a "full
budget" mode: the labels are the model's own predictions and eps is tiny (0.1/255 by
default), so no attack succeeds and every point runs every iteration, restart and target on
every side (the robust accuracy printed shows it).

Components: `standard` is the whole standard version (APGD-CE, APGD-T, FAB-T, Square, each
on the points still robust); the others (`apgd_ce`, `apgd_t`, `fab_t`, `square`: jaxdefense's
names, as in `eval.autoattack_options`) run one attack alone with the standard version's
budget (APGD-T and FAB-T 9 targets, Square 5000 queries). `--budget` scales every
iteration count and query budget on all sides alike (for the big models on a CPU).

torchattacks: `pip install --no-deps torchattacks==3.5.1` (its pinned requirements would
replace the CPU torch by a CUDA build and downgrade `requests`; its AutoAttack needs neither
torchvision nor requests). Its `AutoAttack` runs APGD, APGD-T and FAB-T with 10 iterations
(its classes' default), not the paper's 100; this benchmark builds the same `MultiAttack`
of its APGD / APGDT / FAB(multi_targeted) / Square with the standard budget instead. It is
given the correctly classified points, as the reference's first step does.

The PyTorch peers run on `--torch_device` (default: cuda where available, so that on a
GPU host both sides use the same GPU). Each component runs on every side alternately,
`--repeats` times; jaxdefense's first run
includes compilation, reported apart. Printed per component and side: seconds, points per
second, forward and backward passes (examples x model calls, as adv-lib counts them),
robust accuracy, the ratio of the times, and the points one side breaks and jaxdefense
does not (or the reverse).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdefense import attacks, data, models, parallel, xla_flags  # noqa: E402
from jaxdefense.interop import convert, torch_layouts  # noqa: E402
from jaxdefense.training import train_state  # noqa: E402
from jaxdefense.workdir import paths  # noqa: E402

COMPONENTS = ("standard", "apgd_ce", "apgd_t", "fab_t", "square")
# fra31/auto-attack's names for them (its `attacks_to_run`).
REFERENCE_NAMES = {"apgd_ce": "apgd-ce", "apgd_t": "apgd-t", "fab_t": "fab-t", "square": "square"}
REFERENCE_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
PEERS = ("auto-attack", "torchattacks")
# model -> (config file, its argument, layout); the random models' PyTorch modules below.
MODELS = {"quickstart": ("quickstart.py", "none", "resnet18"),
          "resnet18": ("mart.py", "resnet18", "resnet18"),
          "wrn34_10": ("trades.py", "wrn34_10", "trades_wrn")}
STEPS, QUERIES = 100, 5000  # The standard version's iterations and Square's queries.


def _config(name: str, argument: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument)


def load_quickstart(workdir: str):
  """The quick-start config, its model, the workdir's latest variables and its step."""
  config = _config("quickstart.py", "none")
  dataset = data.from_config(config)
  model = models.from_config(config, dataset.num_classes)
  variables, step = train_state.restore_variables(config, paths.resolve(workdir), "latest",
                                            model, dataset.image_shape, parallel.make_mesh())
  return config, dataset, model, jax.device_get(variables), step


def torch_module(name: str, variables, config):
  """The same weights in the PyTorch module of the model's layout, eval mode."""
  import torch
  from tests import torch_models
  if name == "quickstart":
    kwargs = config.model.kwargs
    module = torch_models.ResNet(blocks=tuple(kwargs.stage_sizes), width=kwargs.width,
                                 in_channels=1)
  elif name == "resnet18":
    module = torch_models.ResNet()
  else:
    module = torch_models.WideResNet(34, 10, sub_block1=True)
  sd = convert.to_state_dict(variables, torch_layouts.LAYOUTS[MODELS[name][2]])
  module.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  return module.eval()


def problem(a):
  """(description, jax model, variables, torch module, x NHWC, labels, eps, classes)."""
  config_file, argument, _ = MODELS[a.model]
  if a.model == "quickstart":
    config, dataset, model, variables, step = load_quickstart(a.workdir)
    x = dataset.test_images[:a.points].astype(np.float32) / 255
    y = dataset.test_labels[:a.points].astype(np.int32)
    eps = a.eps if a.eps is not None else config.eval.eps
    what = f"quick-start model (step {step}), {a.points} digits test points"
    return what, model, variables, torch_module(a.model, variables, config), x, y, eps, \
        dataset.num_classes
  config = _config(config_file, argument)
  model = models.from_config(config, 10)
  x = np.random.default_rng(a.seed).uniform(size=(a.points, 32, 32, 3)).astype(np.float32)
  variables = jax.device_get(models.init(model, jax.random.key(a.seed), x.shape[1:]))
  y = np.asarray(jnp.argmax(attacks.deployed(model, variables)(x).logits, -1), np.int32)
  eps = a.eps if a.eps is not None else 0.1 / 255
  what = (f"{a.model}, random weights, {a.points} random 32x32x3 inputs labelled with its own "
          f"predictions (full budget: timing only)")
  return what, model, variables, torch_module(a.model, variables, config), x, y, eps, 10


def budget(scale: float) -> tuple[int, int]:
  """(iterations, Square queries) at `scale` times the standard version's."""
  return max(1, round(STEPS * scale)), max(1, round(QUERIES * scale))


def counted_torch(module):
  """A logits-only PyTorch module that counts forward and backward passes per example
  (`.passes`: [forward, backward]; the peers' own start-up checks' calls included)."""
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


def jax_runner(model, variables, eps, component, seed, scale, chunks, norm):
  """A function (x, y) -> (robust, seconds, forward, backward), compiled on its first call."""
  counter = attacks.PassCounter()
  names = None if component == "standard" else (component,)
  steps, queries = budget(scale)
  options = {"apgd_ce": {"steps": steps}, "apgd_t": {"steps": steps},
             "fab_t": {"steps": steps}, "square": {"queries": queries}}

  @jax.jit
  def attack(x, y):
    fn = counter.wrap(attacks.deployed(model, variables))
    return attacks.autoattack(fn, x, y, jax.random.key(seed), eps=eps, norm=norm,
                              attacks=names, options=options, chunks=chunks).robust

  def run(x, y):
    before = counter.forward, counter.backward
    start = time.perf_counter()
    robust = np.asarray(attack(x, y))
    jax.effects_barrier()
    return (robust, time.perf_counter() - start, counter.forward - before[0],
            counter.backward - before[1])
  return run


def _nchw(x, y, device: str):
  import torch
  return (torch.tensor(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)), device=device),
          torch.tensor(np.asarray(y), dtype=torch.long, device=device))


def run_reference(module, x, y, eps, component, seed, scale, num_classes, norm):
  """fra31/auto-attack's standard version (or one of its attacks with that budget)."""
  del num_classes
  import pyautoattack
  counted = counted_torch(module)
  adversary = pyautoattack.AutoAttack(counted, norm=REFERENCE_NORMS[norm], eps=eps,
                                      version="standard", device=_device(module), seed=seed)
  steps, queries = budget(scale)
  adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = steps
  # Under L1 its APGDs run `n_iter_orig` iterations (the decreasing-eps schedule).
  adversary.apgd.n_iter_orig = adversary.apgd_targeted.n_iter_orig = steps
  adversary.square.n_queries = queries
  if component != "standard":
    adversary.attacks_to_run = [REFERENCE_NAMES[component]]
  adversary.verbose = False
  xt, yt = _nchw(x, y, _device(module))
  start = time.perf_counter()
  x_adv, _ = adversary.run_standard_evaluation(xt, yt, batch_size=len(yt))
  _synchronize(xt.device)
  seconds = time.perf_counter() - start
  return _robust(module, x_adv, yt), seconds, *counted.passes


def run_torchattacks(module, x, y, eps, component, seed, scale, num_classes, norm):
  """torchattacks' APGD / APGDT / FAB-T / Square (its AutoAttack's MultiAttack at the
  standard budget) on the correctly classified points (L-inf only here)."""
  import torch
  import torchattacks
  del norm
  counted = counted_torch(module)
  steps, queries = budget(scale)
  make = {
      "apgd_ce": lambda: torchattacks.APGD(counted, norm="Linf", eps=eps, steps=steps,
                                           n_restarts=1, seed=seed, loss="ce"),
      "apgd_t": lambda: torchattacks.APGDT(counted, norm="Linf", eps=eps, steps=steps,
                                           n_restarts=1, seed=seed, n_classes=num_classes),
      "fab_t": lambda: torchattacks.FAB(counted, norm="Linf", eps=eps, steps=steps,
                                        n_restarts=1, seed=seed, multi_targeted=True,
                                        n_classes=num_classes),
      "square": lambda: torchattacks.Square(counted, norm="Linf", eps=eps, n_queries=queries,
                                            n_restarts=1, seed=seed)}
  if component == "standard":
    attack = torchattacks.MultiAttack([make[c]() for c in COMPONENTS[1:]])
  else:
    attack = make[component]()
  xt, yt = _nchw(x, y, _device(module))
  start = time.perf_counter()
  with torch.no_grad():
    clean = counted(xt).argmax(1) == yt
  x_adv = xt.clone()
  if clean.any():
    x_adv[clean] = attack(xt[clean], yt[clean])
  _synchronize(xt.device)
  seconds = time.perf_counter() - start
  return _robust(module, x_adv, yt) & clean.cpu().numpy(), seconds, *counted.passes


def _robust(module, x_adv, yt) -> np.ndarray:
  import torch
  with torch.no_grad():
    return (module(x_adv)[0].argmax(1) == yt).cpu().numpy()


def _device(module) -> str:
  return str(next(module.parameters()).device)


def _synchronize(device) -> None:
  """The GPU's queued work done, so that the timer stops after it."""
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize(device)


RUNNERS = {"auto-attack": run_reference, "torchattacks": run_torchattacks}


def installed_peers() -> list[str]:
  found = {"auto-attack": "pyautoattack", "torchattacks": "torchattacks"}
  return [p for p in PEERS if importlib.util.find_spec(found[p]) is not None]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="quickstart", choices=sorted(MODELS))
  p.add_argument("--workdir", default="workdirs/quickstart", help="quickstart: its workdir")
  p.add_argument("--points", type=int, default=60)
  p.add_argument("--norm", default="linf", choices=sorted(REFERENCE_NORMS),
                 help="the threat model (l2, l1: give --eps; torchattacks: linf only)")
  p.add_argument("--eps", type=float, default=None,
                 help="default: the quick-start config's eval.eps; 0.1/255 for random models")
  p.add_argument("--components", default=",".join(COMPONENTS))
  p.add_argument("--peers", default=None, help=f"from {', '.join(PEERS)}; default: installed")
  p.add_argument("--budget", type=float, default=1.0,
                 help="iterations and queries as a fraction of the standard version's")
  p.add_argument("--chunks", type=int, default=1,
                 help="jaxdefense: attack the robust points gathered, in this many batches")
  p.add_argument("--torch_device", default=None,
                 help="the PyTorch peers' device (default: cuda if available, else cpu)")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="also write the rows here")
  a = p.parse_args()
  components = a.components.split(",")
  bad = [c for c in components if c not in COMPONENTS]
  if bad:
    p.error(f"--components: {bad} not in {', '.join(COMPONENTS)}")
  peers = installed_peers() if a.peers is None else a.peers.split(",")
  bad = [c for c in peers if c not in PEERS]
  if bad:
    p.error(f"--peers: {bad} not in {', '.join(PEERS)}")
  if not peers:
    p.error('no PyTorch peer installed: pip install -e ".[benchmark]"')
  if not 0 < a.budget <= 1:
    p.error(f"--budget must lie in (0, 1], got {a.budget}")
  if a.repeats < 1 or a.points < 1:
    p.error("--repeats and --points must be >= 1")
  if a.norm != "linf" and (a.eps is None or "torchattacks" in peers):
    p.error(f"--norm={a.norm} needs --eps and --peers=auto-attack (torchattacks: linf only)")
  xla_flags.set_cpu_defaults()
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  if a.torch_device is None:
    a.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  what, model, variables, module, x, y, eps, num_classes = problem(a)
  with torch.no_grad():
    module = module.to(a.torch_device)
    torch_clean = module(_nchw(x, y, a.torch_device)[0])[0].argmax(1).cpu().numpy() == y
  jax_clean = np.asarray(jnp.argmax(attacks.deployed(model, variables)(x).logits, -1)) == y
  steps, queries = budget(a.budget)
  print(f"{what}; eps {eps:.5f} {a.norm}; {steps} iterations, {queries} Square queries; clean "
        f"accuracy jaxdefense {jax_clean.mean():.2%}, PyTorch {torch_clean.mean():.2%}; "
        f"jax on {jax.devices()[0].platform}, torch {torch.__version__} on {a.torch_device} "
        f"({torch.get_num_threads()} CPU threads); peers: {', '.join(peers)}", flush=True)
  rows = []
  for component in components:
    run_jax = jax_runner(model, variables, eps, component, a.seed, a.budget, a.chunks, a.norm)
    runs = {side: [] for side in ["jaxdefense", *peers]}
    for repeat in range(a.repeats + 1):  # jax's first run compiles: an extra run.
      runs["jaxdefense"].append(run_jax(x, y))
      if repeat < a.repeats:
        for peer in peers:
          runs[peer].append(RUNNERS[peer](module, x, y, eps, component, a.seed, a.budget,
                                          num_classes, a.norm))
    row = {"model": a.model, "component": component, "points": a.points, "eps": eps,
           "norm": a.norm,
           "iterations": steps, "queries": queries, "chunks": a.chunks}
    jax_robust = runs["jaxdefense"][-1][0]
    for side, results in runs.items():
      timed = results[1:] if side == "jaxdefense" else results
      robust, seconds, forward, backward = min(timed, key=lambda r: r[1])
      row[side] = {"seconds": seconds, "points_per_s": a.points / seconds,
                   "forward": forward, "backward": backward,
                   "robust_accuracy": float(robust.mean())}
      if side == "jaxdefense":
        row[side]["first_run_seconds"] = results[0][1]
      else:
        row[side]["ratio_jax_over_this"] = row["jaxdefense"]["seconds"] / seconds
        row[side]["broken_by_jax_only"] = np.flatnonzero(~jax_robust & robust).tolist()
        row[side]["broken_by_this_only"] = np.flatnonzero(jax_robust & ~robust).tolist()
    rows.append(row)
    j = row["jaxdefense"]
    line = (f"{component:9s} jaxdefense {j['seconds']:8.1f} s ({j['points_per_s']:6.2f} pt/s, "
            f"first run {j['first_run_seconds']:.1f} s; {j['forward']} fwd / {j['backward']} "
            f"bwd; robust {j['robust_accuracy']:.2%})")
    for peer in peers:
      r = row[peer]
      line += (f"\n{'':9s} {peer:12s} {r['seconds']:8.1f} s ({r['points_per_s']:6.2f} pt/s; "
               f"{r['forward']} fwd / {r['backward']} bwd; robust {r['robust_accuracy']:.2%}) "
               f"| jax / {peer} {r['ratio_jax_over_this']:.2f}; broken by jax only "
               f"{r['broken_by_jax_only']}, by {peer} only {r['broken_by_this_only']}")
    print(line, flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
