"""Workdirs as training and evaluation write them, with outcomes the tests choose: the
report's tests build experiments in milliseconds instead of training them."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxdefense.evaluation import evaluate
from jaxdefense.workdir import paths, run_config
from tests.helpers import override, tiny_config

POINTS = 40
IMAGES = np.arange(POINTS * 4, dtype=np.uint8).reshape(POINTS, 2, 2, 1)
LABELS = np.arange(POINTS) % 10
# eval.json's per-attack settings, as protocols' EvalAttack.report() writes them.
PGD20 = {"method": "pgd", "steps": 20, "step_size_x_eps": 0.25, "random_start": True,
         "loss": "ce", "source": "test"}


def write_run(directory, *, robust: dict[str, np.ndarray], config: dict[str, Any] | None = None,
              seed: int = 0, eps: float = 0.1, attack: dict[str, Any] = PGD20,
              training: dict[str, float] | None = None, audit: dict | None = None,
              curves: list[dict] | None = None, outcomes: bool = True) -> str:
  """A workdir: config.json (the tiny quick start with `config` overrides and `seed`),
  eval.json whose attack "pgd20" and natural accuracy have the per-point `robust` flags
  ({"natural": ..., "pgd20": ...}), results.json, and optionally audit.json and the
  in-training evaluation rows of metrics.jsonl (a str row is written as it is)."""
  os.makedirs(directory, exist_ok=True)
  c = override(tiny_config(), {"seed": seed, **(config or {})})
  run_config.record_config(paths.resolve(directory), c)
  natural, pgd = robust["natural"], robust["pgd20"] & robust["natural"]
  flags = {"natural": natural, "pgd20": pgd, "worst_case": pgd}
  results = {"natural": {"title": "Natural", "accuracy": float(natural.mean()),
                         "num_points": POINTS, "non_finite_points": 0, "time_s": 0.1},
             "pgd20": {"title": "PGD-20", "accuracy": float(pgd.mean()), "num_points": POINTS,
                       "eps": eps, "norm": "linf", "seed": seed, "time_s": 0.2,
                       "forward_passes": 800, "backward_passes": 800,
                       "non_finite_points": 0, **attack},
             "worst_case": {"title": "Worst case", "accuracy": float(pgd.mean()),
                            "num_points": POINTS, "attacks": ["pgd20"]}}
  report = {"config": c.name, "checkpoint": "latest", "step": 6, "defense": c.defense.name,
            "arch": c.model.arch, "data": "digits", "eps": eps, "norm": "linf",
            "protocol": "full", "dtype": "float32", "results": results}
  if outcomes:
    report["outcomes"] = evaluate.outcomes_record(flags, IMAGES, LABELS)
  _write(directory, "eval.json", report)
  _write(directory, "results.json", {
      "config": c.name, "epochs": 2, "steps": 6, "robust_attack": "PGD-20",
      "num_examples": POINTS, "ema": False,
      **(training or {"natural_accuracy": float(natural.mean()),
                      "robust_accuracy": float(pgd.mean())})})
  if audit is not None:
    _write(directory, "audit.json", {"checkpoint": "latest", "step": 6, "eps": eps,
                                     "norm": "linf", "points": POINTS, **audit})
  if curves is not None:
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
      for row in curves:
        f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")  # str: raw.
  return os.fspath(directory)


def _write(directory, name: str, value: dict) -> None:
  with open(os.path.join(directory, name), "w") as f:
    json.dump(value, f)


def flags(rng: np.random.Generator, accuracy: float) -> np.ndarray:
  return rng.random(POINTS) < accuracy
