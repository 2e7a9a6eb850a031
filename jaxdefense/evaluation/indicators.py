"""The six indicators of attack failure (Pintor et al., NeurIPS 2022, "Indicators of Attack
Failure"; their code pralab/IndicatorsOfAttackFailure), measured for `--mode=audit` on runs
of the audit's attack (`config.audit.attack`, a PGD of the evaluation suite) over the
evaluated points, inside one compiled function per batch, sharded like the attacks
(docs/audit.md: definitions, where we differ from the authors' code, what to try next).

Per point (of those the model classifies correctly, on which an attack is defined):

- unavailable_gradients: the attack loss's input gradient at x is exactly zero, or not
  finite (JAX has no "interrupted graph" that raises: a non-differentiable step in the
  model gives zero or non-finite gradients instead).
- unstable_predictions (a number, not a flag): the loss's mean relative change under
  `UNSTABLE_SAMPLES` draws of u ~ U[-r/2, r/2]^D, r = `UNSTABLE_RADIUS`:
  min(mean_s |L(x) - L(x + u_s)| / D, 1), D = |L(x)| (1 where L(x) = 0).
- silent_success: an iterate x_t, t < T, was misclassified, the returned x_T is not.
- incomplete_optimization: the loss trace L_0..L_T of a point the attack did not fool,
  min-max scaled to [0, 1], as a running maximum, still rises by more than
  `INCOMPLETE_RISE` over its last `INCOMPLETE_WINDOW` values.
- transfer_failure: the attack run on the surrogate model (`audit.surrogate_workdir`)
  gives an x' that the surrogate misclassifies and the target does not (over the points
  whose x' fools the surrogate).
- unconstrained_failure: the attack, same steps and step, with eps the box's diameter (L-inf
  1, L2 sqrt(D), L1 D: the ball holds the whole box) leaves the point correctly classified.

The flags' indicators are fractions of the points they are defined on, and trigger when
any point is flagged (the authors' verdicts are per point); unstable_predictions is the
mean over points and triggers above `UNSTABLE_THRESHOLD`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import attacks
from jaxdefense.attacks import losses

UNSTABLE_SAMPLES = 100
UNSTABLE_RADIUS = 8 / 255   # The authors' r: noise in [-4/255, 4/255] per input.
UNSTABLE_THRESHOLD = 0.1    # Ours: the authors' code reports the number only.
INCOMPLETE_WINDOW = 10
INCOMPLETE_RISE = 0.05


@dataclasses.dataclass(frozen=True)
class Indicator:
  """An indicator's name as the config spells it, its title, and what to try when it
  triggers (the mitigations of the paper's section 4)."""
  name: str
  title: str
  remedy: str
  flag: bool = True  # A per-point flag (else a per-point number: unstable_predictions).

  @property
  def threshold(self) -> float:
    return 0.0 if self.flag else UNSTABLE_THRESHOLD


INDICATORS = {i.name: i for i in (
    Indicator("unavailable_gradients", "Unavailable gradients",
              "the gradient is zero or broken: attack a differentiable approximation of the "
              "non-differentiable part (BPDA), or use a loss with non-zero gradient there "
              "(e.g. the C&W margin or DLR instead of a saturated CE); check gradient-free "
              "attacks (Square)"),
    Indicator("unstable_predictions", "Unstable predictions",
              "the loss changes a lot under small noise (randomness or a rugged surface): "
              "average the gradient over noise / the randomness (EOT, e.g. "
              "--config.eval.attacks=eot or autoattack_rand)", flag=False),
    Indicator("silent_success", "Silent success",
              "the attack passed an adversarial point and returned another: keep the best "
              "point of the path (APGD does: run autoattack)"),
    Indicator("incomplete_optimization", "Incomplete optimization",
              "the loss was still rising at the last iteration: run more iterations or "
              "take a larger step (e.g. --config.audit.attack=pgd100, "
              "--config.eval.adaptive_steps=500)"),
    Indicator("transfer_failure", "Transfer failure",
              "points the surrogate's adversarial examples fool on the surrogate but not on "
              "the target: the surrogate does not model the defense; attack the defense "
              "itself (its own loss: the adaptive attack) or a closer surrogate"),
    Indicator("unconstrained_failure", "Unconstrained attack failure",
              "the attack does not reach every point even with an unbounded eps: the attack "
              "or its loss is broken for this model; attack the defense's own loss, a "
              "margin loss, or use a gradient-free attack"),
)}
NAMES = tuple(INDICATORS)


def unbounded_eps(norm: str, image_shape: tuple[int, ...]) -> float:
  """The eps whose ball around any x holds the whole [0, 1] box."""
  size = math.prod(image_shape)
  return {"linf": 1.0, "l2": math.sqrt(size), "l1": float(size)}[norm]


def relative_variation(loss_fn: Callable, x: jax.Array, key: jax.Array) -> jax.Array:
  """unstable_predictions per point: min(mean_s |L(x) - L(x + u_s)| / D, 1)."""
  base = loss_fn(x)
  scale = jnp.where(base == 0, 1.0, jnp.abs(base))

  def draw(s, total):
    u = (jax.random.uniform(jax.random.fold_in(key, s), x.shape) - 0.5) * UNSTABLE_RADIUS
    return total + jnp.abs(base - loss_fn(x + u)) / scale
  total = jax.lax.fori_loop(0, UNSTABLE_SAMPLES, draw, jnp.zeros_like(base))
  return jnp.minimum(total / UNSTABLE_SAMPLES, 1.0)


def still_rising(trace: jax.Array) -> jax.Array:
  """incomplete_optimization per point, from a (T + 1, N) loss trace (maximised)."""
  low, high = jnp.min(trace, axis=0), jnp.max(trace, axis=0)
  scaled = (trace - low) / jnp.where(high > low, high - low, 1.0)
  best = jax.lax.cummax(scaled, axis=0)
  window = best[-min(INCOMPLETE_WINDOW, trace.shape[0]):]
  return (jnp.max(window, axis=0) - jnp.min(window, axis=0)) > INCOMPLETE_RISE


def batch(target_fn, attacked_fn, loss_fn: losses.LossFn, x: jax.Array, labels: jax.Array,
          key: jax.Array, *, eps: float, step_size: float, steps: int, norm: str,
          random_start: bool, iterations: tuple[int, ...], surrogate_fn=None
          ) -> dict[str, jax.Array]:
  """Per point, for one batch: "clean" (classified correctly), "correct" (still after the
  audit attack), each indicator's flag or number, "correct_at.<t>" (x_t of the run
  classified correctly, for the iterations curve) and, with a surrogate,
  "surrogate_fooled". `target_fn` is the model as deployed, `attacked_fn` the function the
  attack differentiates (the same, or CIFS's mask through its input), `surrogate_fn` the
  surrogate as deployed."""
  predicts = lambda fn, v: attacks.common.predicts(fn(v).logits, labels)
  clean = predicts(target_fn, x)
  run = lambda fn, k, e: attacks.pgd_trace(fn, x, labels, k, eps=e, step_size=step_size,
                                           steps=steps, norm=norm, random_start=random_start,
                                           loss=loss_fn)
  trace = run(attacked_fn, jax.random.fold_in(key, 0), eps)
  correct = clean & predicts(target_fn, trace.x_adv)
  gradient = attacks.input_gradient(attacked_fn, loss_fn, x, labels)
  gradient_l1 = jnp.sum(jnp.abs(gradient), axis=tuple(range(1, x.ndim)))
  out = {
      "clean": clean, "correct": correct,
      "unavailable_gradients": ~(gradient_l1 > 0) | ~jnp.isfinite(gradient_l1),
      "unstable_predictions": relative_variation(lambda v: loss_fn(attacked_fn(v), labels), x,
                                                 jax.random.fold_in(key, 1)),
      "silent_success": jnp.any(trace.misclassified[:-1], axis=0) & ~trace.misclassified[-1],
      "incomplete_optimization": still_rising(trace.loss),
      "unconstrained_failure": predicts(
          target_fn, run(attacked_fn, jax.random.fold_in(key, 2),
                         unbounded_eps(norm, x.shape[1:])).x_adv),
  }
  for t in iterations:
    out[f"correct_at.{t}"] = clean & ~trace.misclassified[t]
  if surrogate_fn is not None:
    transfer = run(surrogate_fn, jax.random.fold_in(key, 3), eps).x_adv
    out["surrogate_fooled"] = ~predicts(surrogate_fn, transfer)
    out["transfer_failure"] = out["surrogate_fooled"] & predicts(target_fn, transfer)
  return out


def summarise(values: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, Any]:
  """Each indicator over the evaluated points: its value, the points it is defined on,
  the points flagged, its threshold, whether it triggered, and what to try."""
  clean = values["clean"]
  domains = {"incomplete_optimization": clean & values["correct"],
             "transfer_failure": clean & values.get("surrogate_fooled", np.zeros_like(clean))}
  report = {}
  for name in names:
    spec = INDICATORS[name]
    if name not in values:
      report[name] = {"title": spec.title, "skipped": "needs --config.audit.surrogate_workdir "
                      "(a trained workdir on the same data, e.g. the same recipe undefended)"}
      continue
    domain = domains.get(name, clean)
    points = int(np.sum(domain))
    per_point = np.asarray(values[name], np.float64)[domain]
    value = float(per_point.mean()) if points else 0.0
    triggered = value > spec.threshold
    entry = {"title": spec.title, "value": value, "threshold": spec.threshold,
             "points": points, "triggered": bool(triggered),
             "verdict": "triggered" if triggered else "passed"}
    if spec.flag:
      entry["flagged"] = int(np.sum(per_point > 0))
    if triggered:
      entry["remedy"] = spec.remedy
    report[name] = entry
  return report
