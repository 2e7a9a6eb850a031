"""AutoAttack (Croce & Hein, ICML 2020), standard and "rand" versions, as the reference
(github fra31/auto-attack, `autoattack.py`) runs it.

Start from the correctly classified points; run the attacks in order, each only on the
points still robust (a boolean mask, fixed shapes); a point fooled by any attack stays
fooled, with that attack's adversarial point. Robust accuracy = robust points / all points,
the pointwise worst case over the attacks.

- standard: APGD-CE (100 iterations, 1 restart), APGD-T (100 iterations, 9 targets),
  FAB-T (100 iterations, 9 targets), Square (5000 queries, p_init 0.8); `model_fn(x)`.
- rand: APGD-CE and APGD-DLR, 100 iterations, EOT over 20 samples; the model is randomised,
  `model_fn(x, key) -> ModelOutput`, and every prediction (clean, after each attack) is one
  draw, as in the reference.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp

from jaxdefense.attacks.auto_pgd import apgd, apgd_targeted
from jaxdefense.attacks.common import (
    ModelFn, StochasticModelFn, check_eps, check_integer, check_n_target, check_norm,
    check_positive, check_unit_interval, example_keys, fold, fold_model, make_forward, per_point,
    predicts)
from jaxdefense.attacks.fab import fab_targeted
from jaxdefense.attacks.square_attack import square

VERSIONS = ("standard", "rand")
# The attacks' names, spelled as in the config (`eval.autoattack_options`); each supports
# every norm of `common.NORMS`.
ATTACKS = ("apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "square")
OPTIONS = {
    "apgd_ce": ("steps", "restarts", "rho", "eot_samples", "unroll", "largereps"),
    "apgd_dlr": ("steps", "restarts", "rho", "eot_samples", "unroll", "largereps"),
    "apgd_t": ("steps", "restarts", "n_target", "rho", "eot_samples", "unroll", "largereps"),
    "fab_t": ("steps", "restarts", "n_target", "alpha_max", "eta", "beta", "unroll"),
    "square": ("queries", "restarts", "p_init", "rescale_schedule"),
}
DETERMINISTIC_ONLY = ("fab_t", "square")
# The rules the attacks apply to their options when called, for `check_options`.
_OPTION_RULES: dict[str, Callable[[str, Any], None]] = {
    "steps": check_positive, "queries": check_positive, "eot_samples": check_positive,
    "n_target": check_positive, "restarts": lambda name, value: check_integer(name, value, 0),
    "rho": check_unit_interval, "p_init": check_unit_interval}


def version_attacks(version: str) -> tuple[str, ...]:
  """The attacks a version runs, in order."""
  _check_version(version)
  if version == "standard":
    return ("apgd_ce", "apgd_t", "fab_t", "square")
  return ("apgd_ce", "apgd_dlr")


def version_options(version: str, norm: str = "linf") -> dict[str, dict[str, Any]]:
  """Each attack's budget in a version (the reference's `set_version`); the standard
  version under L1 runs APGD-CE with 5 restarts and APGD-T with 5 targets, both over the
  decreasing-eps schedule (`largereps`)."""
  _check_version(version)
  options = {
      "apgd_ce": {"steps": 100, "restarts": 1},
      "apgd_dlr": {"steps": 100, "restarts": 1},
      "apgd_t": {"steps": 100, "restarts": 1, "n_target": 9},
      "fab_t": {"steps": 100, "restarts": 1, "n_target": 9},
      "square": {"queries": 5000, "restarts": 1, "p_init": 0.8},
  }
  if version == "rand":
    options["apgd_ce"]["eot_samples"] = 20
    options["apgd_dlr"]["eot_samples"] = 20
  if version == "standard" and norm == "l1":
    options["apgd_ce"].update(restarts=5, largereps=True)
    options["apgd_t"].update(n_target=5, largereps=True)
  return options


def _check_version(version: str) -> None:
  if version not in VERSIONS:
    raise ValueError(f"unknown AutoAttack version {version!r}; allowed: {', '.join(VERSIONS)}")


@flax.struct.dataclass
class AutoAttackResult:
  """x_adv: each fooled point's adversarial input (x elsewhere); clean: correctly
  classified; robust: the worst case over all attacks; robust_after[name]: robust after
  that attack and all before it (the reference's log), all (N,) bool."""
  x_adv: jax.Array
  clean: jax.Array
  robust: jax.Array
  robust_after: dict[str, jax.Array]

  def accuracy(self) -> jax.Array:
    """Clean accuracy."""
    return jnp.mean(self.clean)

  def robust_accuracy(self) -> jax.Array:
    """Robust points / all points."""
    return jnp.mean(self.robust)


def _attack_fn(name: str) -> Callable[..., jax.Array]:
  if name in ("apgd_ce", "apgd_dlr"):
    loss = "ce" if name == "apgd_ce" else "dlr"
    return lambda *args, **kwargs: apgd(*args, loss=loss, **kwargs)
  return {"apgd_t": apgd_targeted, "fab_t": fab_targeted, "square": square}[name]


def _resolve(version: str, norm: str, attacks: Sequence[str] | None,
             options: Mapping[str, Mapping[str, Any]] | None
             ) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
  attacks = version_attacks(version) if attacks is None else tuple(attacks)
  for name in attacks:
    if name not in ATTACKS:
      raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    if version == "rand" and name in DETERMINISTIC_ONLY:
      allowed = [a for a in ATTACKS if a not in DETERMINISTIC_ONLY]
      raise ValueError(f"{name} needs a deterministic model; the rand version allows "
                       f"{', '.join(allowed)}")
  if len(set(attacks)) != len(attacks):
    raise ValueError(f"each attack may appear once, got {list(attacks)}")
  resolved = version_options(version, norm)
  for name, overrides in (options or {}).items():
    if name not in ATTACKS:
      raise ValueError(f"options for unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    for option in overrides:
      if option not in OPTIONS[name]:
        raise ValueError(f"unknown option {option!r} for {name}; allowed: "
                         f"{', '.join(OPTIONS[name])}")
    resolved[name].update(overrides)
  return attacks, resolved


def resolve_options(version: str, norm: str,
                    overrides: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, dict[str, Any]]:
  """The budgets of the attacks `version` runs under `norm`: its `version_options`, with
  `overrides` (None values keep the version's) applied; the values are not checked
  (`check_options` does)."""
  given = {name: {k: v for k, v in values.items() if v is not None}
           for name, values in (overrides or {}).items()}
  attacks, resolved = _resolve(version, norm, None, given)
  return {name: resolved[name] for name in attacks}


def check_options(version: str, norm: str,
                  options: Mapping[str, Mapping[str, Any]] | None = None,
                  classes: int | None = None, attacks: Sequence[str] | None = None
                  ) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
  """Raises ValueError for what `autoattack` or its attacks would refuse, without running
  anything: the version, the norm, attack and option names, the options' values (the
  attacks' own rules: steps, queries, eot_samples, n_target integers >= 1, restarts >= 0,
  rho and p_init in (0, 1]) and, given the number of classes K, what the attacks that run
  need of it (APGD-DLR K >= 3, APGD-T K >= 4, n_target < K). Returns (the attacks to run,
  every attack's resolved options)."""
  _check_version(version)
  check_norm(norm)
  attacks, resolved = _resolve(version, norm, attacks, options)
  for name, values in resolved.items():
    for option, value in values.items():
      if option in _OPTION_RULES:
        _OPTION_RULES[option](f"{name}.{option}", value)  # "apgd_ce.steps must be ..."
    if values.get("largereps") and norm != "l1":
      raise ValueError(f"{name}.largereps (the decreasing-eps schedule) is for norm 'l1' "
                       f"only, got norm {norm!r}")
  if classes is not None:
    if "apgd_t" in attacks and classes < 4:
      raise ValueError(f"apgd_t: the targeted DLR loss needs >= 4 classes, got {classes}")
    if "apgd_dlr" in attacks and classes < 3:
      raise ValueError(f"apgd_dlr: the DLR loss needs >= 3 classes, got {classes}")
    for name in attacks:
      if "n_target" in resolved[name]:
        check_n_target(resolved[name]["n_target"], classes, name)
  return attacks, resolved


def autoattack(model_fn: ModelFn | StochasticModelFn, x: jax.Array, labels: jax.Array,
               key: jax.Array, *, eps, norm: str = "linf", version: str = "standard",
               attacks: Sequence[str] | None = None,
               options: Mapping[str, Mapping[str, Any]] | None = None,
               model_key: jax.Array | None = None, chunks: int = 1) -> AutoAttackResult:
  """Runs `attacks` (default: the version's) in order on the points still robust.

  `options` overrides budgets per attack, e.g. `{"apgd_t": {"steps": 20, "n_target": 3},
  "square": {"queries": 500}}` (allowed names: `OPTIONS`). `key` is one PRNG key or one per
  example; in the rand version, `model_key` (default: from `key`) drives the model's noise.
  `chunks` > 1: each attack (and each APGD-T / FAB-T target) runs on the points still
  robust, gathered, in batches of ceil(N / chunks) (`common.run_on_robust`): the same
  result, with work that follows the robust points (the standard version only)."""
  _check_version(version)
  check_eps(eps)
  attacks, resolved = check_options(version, norm, options, attacks=attacks)
  stochastic = version == "rand"
  x = x.astype(jnp.float32)
  forward = make_forward(model_fn, stochastic)
  keys, model_key = example_keys(key, x.shape[0], model_key, stochastic)

  clean = predicts(forward(x, fold_model(model_key, 0)).logits, labels)
  robust = clean
  x_adv = x
  robust_after = {}
  for j, name in enumerate(attacks):
    kwargs = dict(resolved[name])
    if stochastic:
      kwargs.update(stochastic=True, model_key=fold_model(model_key, 2 * j + 1))
    else:
      kwargs.update(chunks=chunks)
    adv = _attack_fn(name)(model_fn, x, labels, fold(keys, j), eps=eps, norm=norm,
                           active=robust, **kwargs)
    prediction = forward(adv, fold_model(model_key, 2 * j + 2)).logits
    fooled = robust & ~predicts(prediction, labels)
    x_adv = jnp.where(per_point(fooled, x.ndim), adv, x_adv)
    robust = robust & ~fooled
    robust_after[name] = robust
  return AutoAttackResult(x_adv=x_adv, clean=clean, robust=robust, robust_after=robust_after)
