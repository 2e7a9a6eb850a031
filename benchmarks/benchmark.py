r"""Throughput, FLOPs, MFU, compile time and memory of PGD-10, the AT step and evaluation.

    python benchmarks/benchmark.py                    # CPU defaults: ResNet-18, batch 32
    python benchmarks/benchmark.py --models=resnet18,wrn34_10 --batch_sizes=resnet18:32,wrn34_10:8
    python benchmarks/benchmark.py --dtype=bfloat16 --json=results.json   # on a GPU / TPU

For every model, defense (none, CAS, FSR, CIFS) and batch size it reports images per second of
(a) the PGD attack alone (the model as deployed), (b) the full adversarial-training step
(`steps.train_step` with the `pgd_at` objective: augmentation, attack, update; donated
state) and (c) the evaluation forward pass; the step's FLOPs from XLA's cost analysis of
the function lowered for the CPU backend on every platform (on GPUs the compiled function's
analysis skips cuDNN convolutions, nearly all of the work), the achieved FLOP/s as a
fraction of a matmul peak measured in the same run, compile times and memory. Defaults are small on CPU and at training sizes on accelerators. It uses one
device (the default one) and, like main.py, `jaxdefense.xla_flags.CPU_FLAGS`
(`--no-xla_cpu_defaults` measures without them). benchmarks/RESULTS.md has the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdefense import attacks, data, defenses, models, xla_flags
from jaxdefense.config import defaults
from jaxdefense.training import objectives, optim, train_state
from jaxdefense.training.steps import train_step

MODELS = ("resnet18", "wrn34_10", "vgg16")
ISSUE_MODELS = "resnet18,wrn34_10"  # The accelerator default: the two the targets name.
DEFENSES = ("none", "cas", "fsr", "cifs")
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
DEFAULT_BATCH_SIZES = {
    "cpu": "resnet18:32,wrn34_10:8,vgg16:32",
    "accelerator": "resnet18:512,wrn34_10:128,wrn34_10:256,vgg16:512",
}


@dataclasses.dataclass
class Timing:
  """Seconds per call of one compiled function, and what XLA says about it (`flops_source`:
  "cpu lowering", or "compiled <backend>" where there is no CPU backend to lower for)."""
  compile_s: float
  times: list[float]
  flops: float | None
  flops_source: str
  xla_bytes: int | None

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  def as_dict(self, batch: int) -> dict[str, Any]:
    """The JSON record, with throughput for `batch` images per call."""
    return {"compile_s": self.compile_s, "times_s": self.times, "min_s": min(self.times),
            "median_s": self.median, "images_per_s": batch / self.median, "flops": self.flops,
            "flops_source": self.flops_source, "xla_memory_bytes": self.xla_bytes}


def is_accelerator() -> bool:
  """Whether JAX's default backend is a GPU or TPU (this starts the backend)."""
  return jax.default_backend() != "cpu"


def parse_batch_sizes(spec: str, models: list[str]) -> dict[str, list[int]]:
  """`"resnet18:32,wrn34_10:8"` (per model) or `"64,128"` (every model) to {model: sizes}."""
  sizes: dict[str, list[int]] = {m: [] for m in models}
  for item in filter(None, spec.split(",")):
    model, _, size = item.rpartition(":")
    targets = [model] if model else models
    for m in targets:
      if m not in MODELS:
        raise ValueError(f"unknown model {m!r} in --batch_sizes; allowed: {', '.join(MODELS)}")
      if m in sizes:
        sizes[m].append(int(size))
  for m, s in sizes.items():
    if not s:
      raise ValueError(f"--batch_sizes names no batch size for model {m!r}")
    if min(s) < 1:
      raise ValueError(f"batch sizes must be positive, got {s} for {m!r}")
  return sizes


def cpu_model_name() -> str:
  """The CPU's model name from /proc/cpuinfo where there is one."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def device_description() -> dict[str, Any]:
  """The platform, versions and XLA flags the numbers were taken with."""
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "python": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def peak_memory() -> tuple[int, str]:
  """The device's peak bytes in use so far (accelerators), else the process's peak RSS."""
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "rss"


def _flops(cost) -> float | None:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def cpu_flops(fn: Callable, args: tuple) -> float | None:
  """FLOPs of `fn(*args)` by XLA's cost analysis of `fn` lowered (not compiled) for the CPU
  backend, which counts convolutions on any platform; None where JAX has no CPU backend
  (JAX_PLATFORMS names only accelerators)."""
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  except RuntimeError:
    return None
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
  return _flops(jax.jit(fn).lower(*abstract).cost_analysis())


def _memory(compiled) -> int | None:
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def compile_and_time(fn: Callable, args: tuple, repeats: int, *, donate: tuple[int, ...] = (),
                     carry: Callable[[Any, tuple], tuple] | None = None) -> Timing:
  """Compiles `fn` for `args`, runs it once (warm-up), then times `repeats` calls.

  `carry(output, args)` gives the next call's arguments (for a donated train state)."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  compile_s = time.perf_counter() - start
  flops, source = cpu_flops(fn, args), "cpu lowering"
  if flops is None:
    flops, source = _flops(compiled.cost_analysis()), f"compiled {jax.default_backend()}"
  xla_bytes = _memory(compiled)
  times = []
  for i in range(repeats + 1):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    if i:
      times.append(time.perf_counter() - start)
    if carry is not None:
      args = carry(out, args)
  return Timing(compile_s, times, flops, source, xla_bytes)


def matmul_peak(dtype: Any, size: int, repeats: int) -> float:
  """FLOP/s of the best of `repeats` runs of 8 chained (size x size) matmuls."""
  chain = 8
  scale = 1.0 / size**0.5  # Keeps the chained products O(1) in any dtype.

  def run(a, b):
    return jax.lax.fori_loop(0, chain, lambda _, c: (a @ c) * jnp.asarray(scale, dtype), b)

  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), dtype)
  b = jax.random.normal(key_b, (size, size), dtype)
  timing = compile_and_time(run, (a, b), repeats)
  return chain * 2 * size**3 / min(timing.times)


def setup(arch: str, defense: str, dtype: str, steps: int):
  """The model, optimizer, train step and attack of the papers' recipe for arch + defense."""
  config = defaults.paper_recipe(arch, defense)
  config.model.dtype = dtype
  config.objective.attack.steps = steps
  model = models.from_config(config, NUM_CLASSES)
  defense_config, attack_config = defenses.from_config(config), objectives.attack_config(config)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=390)
  objective = objectives.make("pgd_at", model, defense_config, attack_config)
  augment = functools.partial(data.augment, **data.augmentation_for(config.data.name))
  step = functools.partial(train_step, objective=objective, tx=tx, schedule=schedule,
                           augment=augment)
  # The training attack's loss, as `attack.loss="auto"` picks it in the step.
  loss = (attacks.losses.defense_loss(defense_config) if defense in defenses.LABELLED
          else attacks.losses.cross_entropy)

  def attack(variables, x, labels, key):
    return attacks.pgd(attacks.deployed(model, variables), x, labels, key,
                       eps=attack_config.eps, step_size=attack_config.step_size,
                       steps=attack_config.steps, loss=loss)

  def evaluate(variables, x):
    return attacks.deployed(model, variables)(x).logits

  return model, tx, step, attack, evaluate


def benchmark(arch: str, defense: str, batch_size: int, args: argparse.Namespace,
              peak: float) -> dict[str, Any]:
  """Every measurement for one (model, defense, batch size)."""
  model, tx, step, attack, evaluate = setup(arch, defense, args.dtype, args.steps)
  state = train_state.create(model, tx, jax.random.key(0), IMAGE_SHAPE, ema=False)
  synthetic = data.synthetic(num_train=batch_size, num_test=1, image_size=IMAGE_SHAPE[0],
                             channels=IMAGE_SHAPE[2], num_classes=NUM_CLASSES)
  batch = {"images": jnp.asarray(synthetic.train_images),
           "labels": jnp.asarray(synthetic.train_labels)}
  x, labels = data.to_float(batch["images"]), batch["labels"]
  variables = jax.tree.map(jnp.copy, state.variables())
  result: dict[str, Any] = {"model": arch, "defense": defense, "dtype": args.dtype,
                            "batch_size": batch_size, "attack_steps": args.steps}
  timings: dict[str, Timing] = {}
  if "attack" in args.measure:
    timings["attack"] = compile_and_time(attack, (variables, x, labels, jax.random.key(1)),
                                         args.repeats)
  if "eval" in args.measure:
    timings["eval"] = compile_and_time(evaluate, (variables, x), args.repeats)
  if "step" in args.measure:
    timings["step"] = compile_and_time(step, (state, batch), args.repeats, donate=(0,),
                                       carry=lambda out, a: (out[0], a[1]))
  for name, timing in timings.items():
    result[name] = timing.as_dict(batch_size)
    if timing.flops:
      result[name]["flop_per_s"] = timing.flops / timing.median
      result[name]["mfu"] = timing.flops / timing.median / peak
  result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory()
  return result


def _fmt(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
  """A readable table of the step's numbers ('vs none': its time over the undefended
  model's; 'XLA mem': XLA's buffer estimate for it) and the attack's and eval's throughput."""
  header = ("model", "defense", "dtype", "batch", "attack img/s", "step img/s", "eval img/s",
            "step GFLOP", "step TFLOP/s", "MFU", "vs none", "compile s", "XLA mem", "peak mem")
  base = {(r["model"], r["dtype"], r["batch_size"]): r["step"]["median_s"]
          for r in results if r["defense"] == "none" and "step" in r}
  rows = []
  for r in results:
    step, attack, evaluate = r.get("step", {}), r.get("attack", {}), r.get("eval", {})
    none_s = base.get((r["model"], r["dtype"], r["batch_size"]))
    overhead = (step["median_s"] / none_s - 1) if step and none_s else None
    rows.append((
        r["model"], r["defense"], r["dtype"], str(r["batch_size"]),
        _fmt(attack.get("images_per_s"), ".1f"), _fmt(step.get("images_per_s"), ".1f"),
        _fmt(evaluate.get("images_per_s"), ".1f"),
        _fmt(step["flops"] / 1e9 if step.get("flops") else None, ".0f"),
        _fmt(step["flop_per_s"] / 1e12 if step.get("flop_per_s") else None, ".3g"),
        f"{100 * step['mfu']:.1f}%" if step.get("mfu") else "-",
        (f"{100 * overhead:+.1f}%" if overhead is not None else "-"),
        _fmt(step.get("compile_s"), ".1f"),
        f"{step['xla_memory_bytes'] / 2**30:.2f} GiB" if step.get("xla_memory_bytes") else "-",
        f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})"))
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The options; those whose default depends on the platform stay None (`resolve`)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=None,
                 help=f"comma-separated, of {', '.join(MODELS)} (default: resnet18 on CPU, "
                      f"where WRN-34-10 at batch 8 takes minutes per defense; {ISSUE_MODELS} elsewhere)")
  p.add_argument("--defenses", default=",".join(DEFENSES),
                 help=f"comma-separated, of {', '.join(DEFENSES)}")
  p.add_argument("--batch_sizes", default=None,
                 help="model:size pairs or sizes for every model (default: "
                      f"{DEFAULT_BATCH_SIZES['cpu']} on CPU, "
                      f"{DEFAULT_BATCH_SIZES['accelerator']} elsewhere)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (parameters, optimizer state and BN statistics stay float32)")
  p.add_argument("--steps", type=int, default=10, help="PGD steps of the attack and the AT step")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed calls of each function after one warm-up call (default: 2 on "
                      "CPU, 10 elsewhere)")
  p.add_argument("--measure", default="attack,step,eval",
                 help="comma-separated, of attack, step, eval")
  p.add_argument("--peak_size", type=int, default=None,
                 help="matrix size of the matmul peak measurement (default: 2048 on CPU, 8192 "
                      "elsewhere)")
  p.add_argument("--peak_dtype", default=None, choices=("float32", "bfloat16"),
                 help="dtype of the matmul peak (default: float32 on CPU, bfloat16 elsewhere)")
  p.add_argument("--xla_cpu_defaults", default=True, action=argparse.BooleanOptionalAction,
                 help="add jaxdefense.xla_flags.CPU_FLAGS to XLA_FLAGS, as main.py does "
                      "(--no-xla_cpu_defaults: jaxlib's own CPU settings)")
  p.add_argument("--json", default=None, help="also write every measurement to this path")
  args = p.parse_args(argv)
  args.defenses = [d for d in args.defenses.split(",") if d]
  args.measure = [m for m in args.measure.split(",") if m]
  for name, values, allowed in (("--defenses", args.defenses, DEFENSES),
                                ("--measure", args.measure, ("attack", "step", "eval"))):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
      p.error(f"{name} must name one or more of {', '.join(allowed)}; got {', '.join(values)}")
  if args.steps < 1 or (args.repeats is not None and args.repeats < 1):
    p.error("--repeats and --steps must be >= 1")
  return args


def resolve(args: argparse.Namespace) -> argparse.Namespace:
  """Fills in the platform-dependent defaults (this starts JAX's backend)."""
  accelerator = is_accelerator()
  models = args.models or ("resnet18" if not accelerator else ISSUE_MODELS)
  args.models = [m for m in models.split(",") if m]
  bad = [m for m in args.models if m not in MODELS]
  if bad or not args.models:
    raise SystemExit(f"--models must name one or more of {', '.join(MODELS)}; got {models}")
  spec = args.batch_sizes or DEFAULT_BATCH_SIZES["accelerator" if accelerator else "cpu"]
  try:
    args.batch_sizes = parse_batch_sizes(spec, args.models)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  if args.repeats is None:
    args.repeats = 10 if accelerator else 2
  if args.peak_size is None:
    args.peak_size = 8192 if accelerator else 2048
  if args.peak_dtype is None:
    args.peak_dtype = "bfloat16" if accelerator else "float32"
  return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  if args.xla_cpu_defaults:
    xla_flags.set_cpu_defaults()  # Before JAX's first computation, which reads XLA_FLAGS.
  args = resolve(args)
  info = device_description()
  print(" ".join(f"{k}={v}" for k, v in info.items() if v != ""), flush=True)
  peak = matmul_peak(jnp.dtype(args.peak_dtype), args.peak_size, repeats=5)
  print(f"matmul peak ({args.peak_dtype}, {args.peak_size}^2): {peak / 1e12:.3g} TFLOP/s",
        flush=True)
  results = []
  for arch in args.models:
    for batch_size in args.batch_sizes[arch]:
      for defense in args.defenses:
        result = benchmark(arch, defense, batch_size, args, peak)
        results.append(result)
        timings = ", ".join(f"{k} {result[k]['median_s']:.3f} s" for k in args.measure)
        print(f"{arch} {defense} {args.dtype} batch {batch_size}: {timings}", flush=True)
  print(table(results), flush=True)
  sources = sorted({t["flops_source"] for r in results for k, t in r.items()
                    if k in ("attack", "step", "eval")})
  print(f"FLOPs: XLA cost analysis of each function, {' / '.join(sources)}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": info, "matmul_peak_flop_per_s": peak, "peak_dtype": args.peak_dtype,
                 "results": results}, f, indent=2)
  return results


if __name__ == "__main__":
  main()
