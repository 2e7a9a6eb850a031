"""AutoAttack's checks on the model and on its own results (fra31/auto-attack `checks.py`,
run where its `autoattack.py` runs them), each a warning in the console, `eval.json` and
`eval.md`, never a refusal (docs/evaluation.md, "AutoAttack's checks"):

- randomised: the first batch through the model `RANDOMIZED_DRAWS` times; outputs that
  differ (max over pairs of draws of ||z_a/||z_a|| - z_b/||z_b|| ||_2 > 1e-4, or a changed
  count of correct predictions) mean a randomised defense: use the rand version. Not run
  for the rand version, as in the reference.
- probabilities: the first batch's outputs all in (-1e-5, 1 + 1e-5) with rows summing to
  1 within 1e-5: the model returns probabilities, not logits (the losses assume logits).
- zero gradients: points whose input gradient of the DLR loss is exactly zero (the
  reference tests the gradient of each DLR run's start; here the clean point's, for every
  point the attacks start from): gradient attacks cannot move them.
- square: Square, run last on what the white-box attacks left robust, lowered the robust
  accuracy by more than 0.2 points (of 100): the gradient attacks were likely fooled.
- classes: too few classes for the DLR losses (K <= 3) or more targets than the K - 1
  other classes (APGD-T's and FAB-T's n_target + 1 > K).

The reference's check for "dynamic" defenses (autograd calls inside the forward pass, found
by tracing the Python calls) has no counterpart: a JAX model is a pure function, its whole
computation is the traced graph the attacks differentiate.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

RANDOMIZED_DRAWS = 5
RANDOMIZED_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5
SQUARE_MARGIN = 0.002  # Of the robust accuracy, a fraction (0.2 points of 100).
NAMES = ("randomized", "probabilities", "zero_gradients", "square", "classes")


@dataclasses.dataclass(frozen=True)
class Check:
  """One check's outcome: `warning` is empty when it passed."""
  name: str
  warning: str = ""
  value: Any = None

  @property
  def passed(self) -> bool:
    return not self.warning

  def report(self) -> dict[str, Any]:
    return {"check": self.name, "passed": self.passed, "value": self.value,
            **({"warning": self.warning} if self.warning else {})}


def randomized(draws: Sequence[np.ndarray], labels: np.ndarray) -> Check:
  """Outputs of the same inputs over several calls, (draws, N, K): different directions
  (max pairwise distance of the L2-normalised outputs) or a different number correct."""
  draws = [np.asarray(d, np.float32) for d in draws]
  unit = [d / (np.linalg.norm(d, axis=-1, keepdims=True) + 1e-10) for d in draws]
  distance = max((float(np.max(np.linalg.norm(a - b, axis=-1)))
                  for i, a in enumerate(unit) for b in unit[i + 1:]), default=0.0)
  correct = {int(np.sum(np.argmax(d, -1) == labels)) for d in draws}
  if distance > RANDOMIZED_TOLERANCE or len(correct) > 1:
    return Check("randomized", f"the model's outputs on the same inputs differ between calls "
                 f"(up to {distance:.3g} between normalised outputs): a randomised defense; "
                 f"evaluate it with AutoAttack's rand version "
                 f"(--config.eval.attacks=autoattack_rand)", distance)
  return Check("randomized", value=distance)


def probabilities(logits: np.ndarray) -> Check:
  """Outputs in [0, 1] whose rows sum to 1: probabilities where logits were expected."""
  z = np.asarray(logits, np.float64)
  if (z.max() < 1 + PROBABILITY_TOLERANCE and z.min() > -PROBABILITY_TOLERANCE
      and np.all(np.abs(z.sum(-1) - 1) < PROBABILITY_TOLERANCE)):
    return Check("probabilities", "the model's outputs look like probabilities (in [0, 1], "
                 "rows summing to 1); the attacks' losses need logits: return the logits "
                 "before the softmax", True)
  return Check("probabilities", value=False)


def zero_gradients(zero: np.ndarray, attacked: np.ndarray) -> Check:
  """Attacked points (clean-correct) whose input gradient is exactly zero."""
  count = int(np.sum(np.asarray(zero) & np.asarray(attacked)))
  if count:
    return Check("zero_gradients", f"{count} point(s) with an input gradient of exactly "
                 "zero: gradient-based attacks cannot move them, so their robustness may be "
                 "overestimated", count)
  return Check("zero_gradients", value=0)


def square_lowered(robust_after: Mapping[str, float]) -> Check:
  """Robust accuracy (fractions, in run order from "clean") after each attack: Square,
  run last, lowering it by more than SQUARE_MARGIN below every earlier value."""
  if "square" not in robust_after or len(robust_after) <= 2:
    return Check("square", value=None)
  before = min(v for k, v in robust_after.items() if k != "square")
  drop = before - robust_after["square"]
  if drop > SQUARE_MARGIN:
    return Check("square", f"Square (gradient-free) lowered the robust accuracy the "
                 f"gradient-based attacks left by {100 * drop:.2f} points: their gradients "
                 "are likely masked or obfuscated; run Square with more queries and "
                 "restarts, or an adaptive attack (e.g. on the defense's own loss)", drop)
  return Check("square", value=drop)


def classes(num_classes: int, attacks: Sequence[str],
            options: Mapping[str, Mapping[str, Any]]) -> Check:
  """The DLR losses need K >= 3 (targeted: K >= 4); n_target + 1 <= K for APGD-T, FAB-T."""
  problems = []
  if "apgd_dlr" in attacks or "apgd_t" in attacks:
    if num_classes <= 2:
      problems.append(f"with {num_classes} classes the DLR loss is undefined")
    elif num_classes == 3 and "apgd_t" in attacks:
      problems.append("with 3 classes the targeted DLR loss is undefined")
  for name in ("apgd_t", "fab_t"):
    if name in attacks and options[name]["n_target"] + 1 > num_classes:
      problems.append(f"{name} asks for {options[name]['n_target']} target classes of the "
                      f"{num_classes - 1} possible")
  if problems:
    return Check("classes", "; ".join(problems), num_classes)
  return Check("classes", value=num_classes)
