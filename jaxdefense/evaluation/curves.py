"""The curves a reviewer asks of a robustness claim (Carlini et al. 2019, "On Evaluating
Adversarial Robustness", sections 5.4-5.6), for `--mode=audit` (docs/audit.md):

- robust accuracy against eps: PGD of `audit.curve_steps` steps at eps = f x eval.eps for f
  in `audit.eps_factors` (step size and start as the audit attack's, scaled with eps). It
  must fall to about 0 as eps grows: a ball that holds points of every class cannot be
  classified correctly, so a plateau says the attack, not the model, gave up.
- robust accuracy against iterations: the audit attack's own run, the iterate x_t scored at
  each t of `audit.iterations` (PGD returns its last iterate, so x_t is PGD-t's result).
  It must level off: a curve still falling at the last count wants more iterations.
- robust accuracy against restarts: R = max(`audit.restarts`) runs from independent uniform
  starts, a point robust after r restarts when no one of the first r fooled it. It must
  level off as well.

Each point of a curve is a fraction of all evaluated points (correct naturally and under
the attack); the verdicts' tolerances are `LEVELS_OFF` and `FALLS_TO_ZERO`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxdefense import attacks
from jaxdefense.evaluation.protocols import EvalAttack

# A curve levels off when its last step (the last doubling, or the last grid point) moves
# the robust accuracy by at most 1 point of 100; it falls to zero when its largest eps
# leaves at most 2 points of 100.
LEVELS_OFF = 0.01
FALLS_TO_ZERO = 0.02


def eps_point(model_fn, attack: EvalAttack, loss_fn, x, labels, key, *, eps, step_size,
              steps: int, norm: str) -> jax.Array:
  """Per point, correct under the curve's PGD at `eps` with `step_size` (attack.step_size x
  eps, computed by the caller: either may be traced, so that one compiled program serves
  every eps of the grid)."""
  x_adv = attacks.pgd(model_fn, x, labels, key, eps=eps, step_size=step_size, steps=steps,
                      norm=norm, random_start=attack.random_start, loss=loss_fn)
  return attacks.common.predicts(model_fn(x_adv).logits, labels)


def restart_points(model_fn, attack: EvalAttack, loss_fn, x, labels, key, *, eps: float,
                   steps: int, norm: str, restarts: int) -> jax.Array:
  """(restarts, N): correct under each of `restarts` PGD runs from uniform starts."""
  def run(r, out):
    x_adv = attacks.pgd(model_fn, x, labels, jax.random.fold_in(key, r), eps=eps,
                        step_size=attack.step_size * eps, steps=steps, norm=norm,
                        random_start=True, loss=loss_fn)
    return out.at[r].set(attacks.common.predicts(model_fn(x_adv).logits, labels))
  return jax.lax.fori_loop(0, restarts, run, jnp.zeros((restarts, x.shape[0]), bool))


def levels_off(values: Sequence[float]) -> bool:
  """The last grid step moves the accuracy by at most LEVELS_OFF."""
  return len(values) < 2 or abs(values[-2] - values[-1]) <= LEVELS_OFF


def summarise(eps_grid: Sequence[float], eps_accuracy: Sequence[float],
              iterations: Sequence[int], iteration_accuracy: Sequence[float],
              restarts: Sequence[int], restart_accuracy: Sequence[float]) -> dict[str, Any]:
  """The three curves with their verdicts, as audit.json gives them."""
  falls = eps_accuracy[-1] <= FALLS_TO_ZERO
  return {
      "eps": {"eps": list(eps_grid), "accuracy": list(eps_accuracy), "passed": bool(falls),
              "verdict": ("falls to about 0 at the largest eps" if falls else
                          f"still {100 * eps_accuracy[-1]:.2f}% at eps {eps_grid[-1]:.4g}: the "
                          "attack stops short of the ball's reach (gradient masking, or too "
                          "few steps / too small a step)")},
      "iterations": {"iterations": list(iterations), "accuracy": list(iteration_accuracy),
                     "passed": levels_off(iteration_accuracy),
                     "verdict": ("levels off" if levels_off(iteration_accuracy) else
                                 "still falling at the last count: run more iterations")},
      "restarts": {"restarts": list(restarts), "accuracy": list(restart_accuracy),
                   "passed": levels_off(restart_accuracy),
                   "verdict": ("levels off" if levels_off(restart_accuracy) else
                               "still falling at the last count: run more restarts")},
  }

