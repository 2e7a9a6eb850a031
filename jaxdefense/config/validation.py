"""Checks every field of a run's config before anything is loaded or restored.

`validate(config, mesh)` raises `errors.ConfigError` for the first bad value, naming the
field, the value and what is allowed; `main.py` prints it as one line (exit 2). The rules
live beside what they guard (`DefenseConfig`, `AttackConfig`, `data.check_options`, the
attacks' option checks); this module applies them all at start-up, for every mode, so that
an evaluation setting that would fail hours later fails before training starts.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import ml_collections

from jaxdefense import data, defenses, errors, models, parallel
from jaxdefense.data import batching
from jaxdefense.evaluation import indicators, protocols
from jaxdefense.attacks import auto_attack, common, losses
from jaxdefense.training import objectives, optim, steps, train_state
from jaxdefense.workdir import paths



def _fail(field: str, value: Any, rule: str) -> None:
  raise errors.ConfigError(f"{field} {rule}, got {value!r}")


def _integer(field: str, value: Any, minimum: int, maximum: int | None = None,
             note: str = "") -> None:
  in_range = minimum <= value and (maximum is None or value <= maximum)
  if isinstance(value, bool) or not isinstance(value, int) or not in_range:
    bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    _fail(field, value, f"must be an integer {bounds}{note}")


def _number(field: str, value: Any, minimum: float, *, open_below: bool = False,
            below: float | None = None, note: str = "") -> None:
  """A finite number >= minimum (> if `open_below`) and < `below` when given."""
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (value > minimum if open_below else value >= minimum)
        and (below is None or value < below))
  if not ok:
    low = f"{'>' if open_below else '>='} {minimum:g}"
    _fail(field, value, f"must be a finite number {low}"
          + (f" and < {below:g}" if below is not None else "") + note)


def _linf_eps(field: str, value: float) -> None:
  """An L-inf radius beyond 1 covers the whole image range [0, 1]: a radius meant in
  x/255 given as x (--config.eval.eps=2.0 for 2/255) would report 0% robust."""
  if value > 1:
    _fail(field, value, f"is an L-inf radius on images in [0, 1] and must be <= 1 (eps 1 "
          f"already allows any image; for {value:g}/255 give {value / 255:.6g})")


def _choice(field: str, value: Any, allowed: tuple[str, ...] | dict) -> None:
  if value not in allowed:
    raise errors.ConfigError(f"unknown {field} {value!r}; allowed: "
                             f"{', '.join(repr(a) if a == '' else a for a in allowed)}")


def _non_finite(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Every float (also inside tuples) that is NaN or infinite, by its dotted name."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _non_finite(value, f"{name}.")
    elif isinstance(value, (tuple, list)):
      if any(isinstance(v, float) and not math.isfinite(v) for v in value):
        yield name, value
    elif isinstance(value, float) and not math.isfinite(value):
      yield name, value


def _as_config_error(check, *args, **kwargs) -> Any:
  """Runs a rule that raises ValueError (a constructor's, a library check's) and reports
  its message as a ConfigError."""
  try:
    return check(*args, **kwargs)
  except errors.ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise errors.ConfigError(str(e)) from e


def check_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  for field in ("num_train", "num_test", "image_size"):
    if d[field] is not None:
      _integer(f"data.{field}", d[field], 1)
  if d.data_dir is not None and not isinstance(d.data_dir, str):
    _fail("data.data_dir", d.data_dir, "must be a directory path")
  _as_config_error(data.check_options, d.name, data_dir=d.data_dir, num_train=d.num_train,
                   num_test=d.num_test, image_size=d.image_size)
  if any(not isinstance(p, str) or not p for p in d.extra):
    _fail("data.extra", d.extra, "must be file paths or globs")
  _number("data.extra_fraction", d.extra_fraction, 0, below=1)
  if bool(d.extra) != (d.extra_fraction > 0):
    raise errors.ConfigError(
        f"data.extra={tuple(d.extra)!r} with data.extra_fraction={d.extra_fraction}: extra "
        "data needs a fraction > 0 of each batch, and a fraction > 0 needs data.extra")
  _choice("data.epoch_steps", d.epoch_steps, batching.EPOCH_STEPS)
  _integer("data.buffer_batches", d.buffer_batches, 1)
  _integer("data.read_concurrency", d.read_concurrency, 1)
  cache = d.extra_cache_dir
  if cache is not None and (not isinstance(cache, str) or not cache or paths.is_remote(cache)):
    _fail("data.extra_cache_dir", d.extra_cache_dir, "must be a local directory")
  if d.extra:
    _as_config_error(batching.check_batch, config.train.batch_size, d.extra_fraction,
                     jax.process_count(), name="data.extra_fraction")


def _num_test_points(config: ml_collections.ConfigDict) -> int | None:
  """How many test points the data set will have, where that is known before loading."""
  if config.data.num_test is not None:
    return config.data.num_test
  if config.data.name == "synthetic":
    return data.SYNTHETIC_SIZES[1]
  return data.SPLIT_SIZES.get(config.data.name, (None, None))[1]


def check_model(config: ml_collections.ConfigDict) -> None:
  """The architecture, its fields and the defense's sites: the model is built and its
  parameters' shapes traced (`jax.eval_shape`: nothing is computed)."""
  m = config.model
  _choice("model.arch", m.arch, models.ARCHITECTURES)
  _choice("model.dtype", m.dtype, models.DTYPES)
  _as_config_error(defenses.from_config, config)
  try:
    model = models.from_config(config, data.NUM_CLASSES[config.data.name])
  except TypeError as e:
    fields = sorted(f for f in models.ARCHITECTURES[m.arch].__dataclass_fields__
                    if f not in ("parent", "name", "num_classes", "defense", "dtype"))
    raise errors.ConfigError(f"model.kwargs={m.kwargs.to_dict()!r} does not fit {m.arch} "
                             f"({e}); its fields: {', '.join(fields)}") from e
  shape = data.image_shape(config.data.name, config.data.image_size)
  try:
    jax.eval_shape(lambda: models.init(model, jax.random.key(0), shape))
  except Exception as e:  # noqa: BLE001 (layers fail on bad fields in many ways)
    message = " ".join(str(e).split("\n--------------------")[0].split()) or type(e).__name__
    raise errors.ConfigError(
        f"model.arch={m.arch!r} with model.kwargs={m.kwargs.to_dict()} and defense "
        f"{config.defense.name!r} does not build on {shape} images: {message}") from e


def check_objective(config: ml_collections.ConfigDict) -> None:
  o = config.objective
  _as_config_error(objectives.check_name, o.name, config.defense.name)
  _number("objective.beta", o.beta, 0)
  _integer("objective.attack.steps", o.attack.steps, 0)
  _choice("objective.attack.loss", o.attack.loss, losses.ATTACK_LOSSES)
  _as_config_error(objectives.attack_config, config)
  _linf_eps("objective.attack.eps", o.attack.eps)
  _number("objective.label_smoothing", o.label_smoothing, 0, below=1)
  _choice("objective.label_smoothing_on", o.label_smoothing_on, objectives.LABEL_SMOOTHING_ON)
  if o.label_smoothing and o.label_smoothing_on == "extra" and not config.data.extra:
    _fail("objective.label_smoothing_on", o.label_smoothing_on,
          "smooths the extra images' labels only, but data.extra is empty")
  _as_config_error(objectives.check_label_smoothing, o.name, o.label_smoothing,
                   o.label_smoothing_on)
  _number("objective.awp_gamma", o.awp_gamma, 0)
  _integer("objective.awp_warmup_epochs", o.awp_warmup_epochs, 0)


def check_optim(config: ml_collections.ConfigDict) -> None:
  o = config.optim
  _number("optim.lr", o.lr, 0)
  _number("optim.momentum", o.momentum, 0, below=1)
  _number("optim.weight_decay", o.weight_decay, 0)
  _choice("optim.schedule", o.schedule, optim.SCHEDULES)
  milestones = tuple(o.milestones)
  if any(isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0 for m in milestones) \
      or list(milestones) != sorted(milestones):
    _fail("optim.milestones", milestones, "must be non-negative epoch counts in increasing "
          "order")
  _number("optim.decay_factor", o.decay_factor, 0, open_below=True)
  _number("optim.warmup_epochs", o.warmup_epochs, 0, below=max(config.train.epochs, 1),
          note=" (below train.epochs)")
  whole = o.warmup_epochs >= 1 and o.warmup_epochs == int(o.warmup_epochs)
  if o.schedule == "onecycle" and not whole:
    _fail("optim.warmup_epochs", o.warmup_epochs, "must be a whole number of epochs >= 1 with "
          "optim.schedule='onecycle' (its rising phase, stepped per epoch)")
  _integer("optim.lr_reference_batch", o.lr_reference_batch, 0,
           note=" (0: optim.lr as given)")


def check_train(config: ml_collections.ConfigDict, mesh) -> None:
  t = config.train
  _integer("train.epochs", t.epochs, 1)
  _as_config_error(parallel.check_batch_size, t.batch_size, mesh)
  _number("train.ema_decay", t.ema_decay, 0, below=1, note=" (0 turns EMA off)")
  _integer("train.log_every_steps", t.log_every_steps, 1)
  _integer("train.eval_every_epochs", t.eval_every_epochs, 1)
  _integer("train.eval_examples", t.eval_examples, 0,
           note=" (the first N test points, all if fewer; 0 = all)")
  _as_config_error(parallel.check_batch_size, t.eval_batch_size, mesh, "train.eval_batch_size")
  _integer("train.checkpoint_every_steps", t.checkpoint_every_steps, 1)
  _integer("train.keep_checkpoints", t.keep_checkpoints, 1)
  _number("train.lease_timeout_s", t.lease_timeout_s, 1,
          note=" (seconds a dead run's workdir lease lasts; renewed every timeout / 4)")
  _choice("train.ema_schedule", t.ema_schedule, train_state.EMA_SCHEDULES)
  _integer("train.ema_warmup_steps", t.ema_warmup_steps, 0)
  _choice("train.ema_batch_stats", t.ema_batch_stats, steps.EMA_BATCH_STATS)
  if config.init_from is not None and not config.init_from:
    _fail("init_from", config.init_from, "must name a workdir, or be left unset")


def check_eval_pgd(config: ml_collections.ConfigDict) -> None:
  p = config.eval_pgd
  _number("eval_pgd.eps", p.eps, 0)
  _linf_eps("eval_pgd.eps", p.eps)
  _integer("eval_pgd.steps", p.steps, 0)
  if p.steps:
    _number("eval_pgd.step_size", p.step_size, 0, open_below=True)
  _choice("eval_pgd.loss", p.loss, losses.ATTACK_LOSSES)


def check_eval(config: ml_collections.ConfigDict, mesh,
               attacks: tuple[str, ...] | None = None) -> None:
  """`config.eval`: the points, the threat model, the attacks and their budgets (`attacks`,
  else those of `eval.protocol` / `eval.attacks`)."""
  e = config.eval
  _integer("eval.num_examples", e.num_examples, 0, _num_test_points(config),
           " (0 = all test points)")
  _as_config_error(parallel.check_batch_size, e.batch_size, mesh, "eval.batch_size")
  _number("eval.eps", e.eps, 0)
  _integer("eval.seed", e.seed, 0)
  _choice("eval.norm", e.norm, common.NORMS)
  if e.norm == "linf":
    _linf_eps("eval.eps", e.eps)
  _choice("eval.dtype", e.dtype, ("",) + models.DTYPES)
  _choice("eval.protocol", e.protocol, protocols.PROTOCOLS)
  _integer("eval.adaptive_steps", e.adaptive_steps, 1)
  _integer("eval.eot_samples", e.eot_samples, 1)
  _integer("eval.autoattack_chunks", e.autoattack_chunks, 1)
  if e.autoattack_chunks > 1 and mesh.size > 1:
    raise errors.ConfigError(
        f"eval.autoattack_chunks={e.autoattack_chunks} gathers AutoAttack's robust points "
        f"into batches that are not split over the mesh; with {mesh.size} devices use "
        "eval.autoattack_chunks=1")
  check_attacks(config, protocols.attack_names(e) if attacks is None else attacks)


def check_attacks(config: ml_collections.ConfigDict, names: tuple[str, ...]) -> None:
  """The evaluation attacks `names`: known, defined for `eval.norm`, their budgets valid."""
  e = config.eval
  suite = protocols.suite(e)
  unknown = [n for n in names if n not in suite]
  if unknown:
    raise errors.ConfigError(f"unknown eval attack(s) {unknown}; allowed: {', '.join(suite)}")
  linf_only = [n for n in names if e.norm not in suite[n].norms]
  if linf_only:
    allowed = [n for n, a in suite.items() if e.norm in a.norms]
    raise errors.ConfigError(
        f"eval.norm={e.norm!r}: attack(s) {linf_only} of protocol {e.protocol!r} are L-inf "
        f"only; use --config.eval.protocol=autoattack or --config.eval.attacks from "
        f"{', '.join(allowed)}")
  classes = data.NUM_CLASSES[config.data.name]
  for name in names:
    attack = suite[name]
    if attack.method == "autoattack" and attack.applies(config.defense.name):
      _as_config_error(auto_attack.check_options, attack.version, e.norm, attack.options,
                       classes)


def _grid(field: str, values: Any, check) -> None:
  if not isinstance(values, (tuple, list)) or not values:
    _fail(field, values, "must be a non-empty tuple")
  for value in values:
    check(field, value)
  if list(values) != sorted(set(values)):
    _fail(field, values, "must be increasing, without repeats")


def check_audit(config: ml_collections.ConfigDict) -> None:
  """`config.audit`: the attack the indicators examine, the indicators, the curves' grids."""
  a, e = config.audit, config.eval
  suite = protocols.suite(e)
  pgd = [n for n, attack in suite.items() if attack.method == "pgd" and not attack.eot_samples
         and e.norm in attack.norms and attack.applies(config.defense.name)]
  _choice("audit.attack", a.attack, tuple(pgd))
  unknown = [n for n in a.indicators if n not in indicators.NAMES]
  if unknown or not a.indicators:
    raise errors.ConfigError(f"unknown audit.indicators {unknown or list(a.indicators)}; "
                             f"allowed: {', '.join(indicators.NAMES)}")
  _grid("audit.eps_factors", a.eps_factors,
        lambda f, v: _number(f, v, 0, open_below=True, note=" (each a multiple of eval.eps)"))
  steps = suite[a.attack].steps
  _grid("audit.iterations", a.iterations,
        lambda f, v: _integer(f, v, 1, steps, f" (the steps of audit.attack {a.attack!r})"))
  _grid("audit.restarts", a.restarts, lambda f, v: _integer(f, v, 1))
  _integer("audit.curve_steps", a.curve_steps, 1)


def check_analysis(config: ml_collections.ConfigDict) -> None:
  _integer("analysis.class_index", config.analysis.class_index, 0,
           data.NUM_CLASSES[config.data.name] - 1)


def validate(config: ml_collections.ConfigDict, mesh, *,
             eval_attacks: tuple[str, ...] | None = None) -> None:
  """Every field of `config`, for every mode (see the module docstring); `eval_attacks`:
  the evaluation attacks a mode runs instead of eval's protocol (the audit: AutoAttack)."""
  for name, value in _non_finite(config):
    _fail(name, value, "must be finite")
  if not isinstance(config.seed, int) or config.seed < 0:
    _fail("seed", config.seed, "must be an integer >= 0")
  check_data(config)
  check_model(config)
  check_objective(config)
  check_optim(config)
  check_train(config, mesh)
  check_eval_pgd(config)
  check_eval(config, mesh, eval_attacks)
  check_audit(config)
  check_analysis(config)
