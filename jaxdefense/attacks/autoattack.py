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

from jaxdefense.attacks.apgd import (
    NORMS as APGD_NORMS, StochasticModelFn, apgd, apgd_targeted, check_eps, example_keys, fold,
    fold_model, make_forward, per_point, predicts)
from jaxdefense.attacks.fab import NORMS as FAB_NORMS, fab_targeted
from jaxdefense.attacks.pgd import ModelFn
from jaxdefense.attacks.square import NORMS as SQUARE_NORMS, square

VERSIONS = ("standard", "rand")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
NORMS = {"apgd-ce": APGD_NORMS, "apgd-dlr": APGD_NORMS, "apgd-t": APGD_NORMS,
         "fab-t": FAB_NORMS, "square": SQUARE_NORMS}
OPTIONS = {
    "apgd-ce": ("steps", "restarts", "rho", "eot_samples", "unroll"),
    "apgd-dlr": ("steps", "restarts", "rho", "eot_samples", "unroll"),
    "apgd-t": ("steps", "restarts", "n_target", "rho", "eot_samples", "unroll"),
    "fab-t": ("steps", "restarts", "n_target", "alpha_max", "eta", "beta", "unroll"),
    "square": ("queries", "restarts", "p_init", "rescale_schedule"),
}
DETERMINISTIC_ONLY = ("fab-t", "square")


def version_attacks(version: str) -> tuple[str, ...]:
  """The attacks a version runs, in order."""
  _check_version(version)
  if version == "standard":
    return ("apgd-ce", "apgd-t", "fab-t", "square")
  return ("apgd-ce", "apgd-dlr")


def version_options(version: str) -> dict[str, dict[str, Any]]:
  """Each attack's budget in a version (the reference's `set_version`)."""
  _check_version(version)
  options = {
      "apgd-ce": {"steps": 100, "restarts": 1},
      "apgd-dlr": {"steps": 100, "restarts": 1},
      "apgd-t": {"steps": 100, "restarts": 1, "n_target": 9},
      "fab-t": {"steps": 100, "restarts": 1, "n_target": 9},
      "square": {"queries": 5000, "restarts": 1, "p_init": 0.8},
  }
  if version == "rand":
    options["apgd-ce"]["eot_samples"] = 20
    options["apgd-dlr"]["eot_samples"] = 20
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
  if name in ("apgd-ce", "apgd-dlr"):
    loss = "ce" if name == "apgd-ce" else "dlr"
    return lambda *args, **kwargs: apgd(*args, loss=loss, **kwargs)
  return {"apgd-t": apgd_targeted, "fab-t": fab_targeted,
          "square": square}[name]


def _resolve(version: str, norm: str, attacks: Sequence[str] | None,
             options: Mapping[str, Mapping[str, Any]] | None
             ) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
  attacks = version_attacks(version) if attacks is None else tuple(attacks)
  for name in attacks:
    if name not in ATTACKS:
      raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    if norm not in NORMS[name]:
      raise ValueError(f"{name} supports norm {', '.join(NORMS[name])}; got {norm!r}")
    if version == "rand" and name in DETERMINISTIC_ONLY:
      raise ValueError(f"{name} needs a deterministic model; the rand version allows "
                       f"apgd-ce, apgd-dlr, apgd-t")
  if len(set(attacks)) != len(attacks):
    raise ValueError(f"each attack may appear once, got {list(attacks)}")
  resolved = version_options(version)
  for name, overrides in (options or {}).items():
    if name not in ATTACKS:
      raise ValueError(f"options for unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    for option in overrides:
      if option not in OPTIONS[name]:
        raise ValueError(f"unknown option {option!r} for {name}; allowed: "
                         f"{', '.join(OPTIONS[name])}")
    resolved[name].update(overrides)
  return attacks, resolved


def autoattack(model_fn: ModelFn | StochasticModelFn, x: jax.Array, labels: jax.Array,
               key: jax.Array, *, eps, norm: str = "linf", version: str = "standard",
               attacks: Sequence[str] | None = None,
               options: Mapping[str, Mapping[str, Any]] | None = None,
               model_key: jax.Array | None = None, chunks: int = 1) -> AutoAttackResult:
  """Runs `attacks` (default: the version's) in order on the points still robust.

  `options` overrides budgets per attack, e.g. `{"apgd-t": {"steps": 20, "n_target": 3},
  "square": {"queries": 500}}` (allowed names: `OPTIONS`). `key` is one PRNG key or one per
  example; in the rand version, `model_key` (default: from `key`) drives the model's noise.
  `chunks` > 1: each attack (and each APGD-T / FAB-T target) runs on the points still
  robust, gathered, in batches of ceil(N / chunks) (`apgd.run_on_robust`): the same
  result, with work that follows the robust points (the standard version only)."""
  _check_version(version)
  check_eps(eps)
  if norm not in APGD_NORMS:
    raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(APGD_NORMS)}")
  attacks, resolved = _resolve(version, norm, attacks, options)
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
