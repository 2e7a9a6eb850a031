"""A RobustBench record of an evaluation that ran AutoAttack: `robustbench.json`, the fields
of RobustBench's `model_info/<dataset>/<threat model>/<name>.json` files, so that a result
goes to the leaderboard in the form it expects.

    {"link": "", "name": "", "authors": "", "additional_data": false,
     "number_forward_passes": 1, "dataset": "cifar10", "venue": "",
     "architecture": "WideResNet-28-10", "eps": "8/255", "clean_acc": "92.44",
     "reported": "", "autoattack_acc": "67.31", "footnote": "...", "unreliable": false}

plus `threat_model` ("Linf" / "L2": the directory the file goes in) and `checks`, what
RobustBench would refuse or want said before it takes the entry: fewer points than the
whole test set, AutoAttack budgets other than the standard version's, the rand version, a
data set without a leaderboard. `link`, `name`, `authors`, `venue` and `reported` (the
paper's own number) are the author's to fill in. `additional_data` is about extra real
data; generated images (`data.extra`) are not additional data on RobustBench, and the
footnote says they were used.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from jaxdefense.attacks import auto_attack

THREAT_MODELS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
LEADERBOARD_NORMS = ("linf", "l2")
LEADERBOARD_TEST_POINTS = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
ARCH_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
              "preact_resnet18": "PreActResNet-18", "wrn34_10": "WideResNet-34-10",
              "wrn28_10": "WideResNet-28-10", "vgg16": "VGG-16"}
TO_FILL = ("link", "name", "authors", "venue", "reported")


def eps_text(eps: float, norm: str) -> str:
  """RobustBench's eps: "8/255" for an L-inf eps that is a whole number of 255ths, else
  the number ("0.5")."""
  if norm == "linf" and abs(255 * eps - round(255 * eps)) < 1e-6:
    return f"{round(255 * eps)}/255"
  return f"{eps:g}"


def architecture(config: ml_collections.ConfigDict) -> str:
  """The architecture as RobustBench names it ("WideResNet-28-10"), + the hosted defense."""
  m = config.model
  if m.arch == "wide_resnet":
    name = f"WideResNet-{m.kwargs.get('depth', 34)}-{m.kwargs.get('width', 10)}"
  else:
    name = ARCH_NAMES.get(m.arch, m.arch)
  if config.defense.name != "none":
    name += f" + {config.defense.name.upper()}"
  return name


def standard_options(norm: str) -> dict[str, dict[str, Any]]:
  """The standard version's budgets under `norm`, as eval.json reports an AutoAttack's."""
  return auto_attack.resolve_options("standard", norm)


def record(report: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The record of `report` (what `evaluate.run` writes to eval.json), or None if it ran no
  AutoAttack. Accuracies as RobustBench writes them: percent, two decimals, as strings."""
  results = report["results"]
  name = next((n for n in ("autoattack", "autoattack_rand") if "accuracy" in results.get(n, {})),
              None)
  if name is None:
    return None
  attack, natural = results[name], results["natural"]
  data_set, points = report["data"], attack["num_points"]
  checks = []
  full = LEADERBOARD_TEST_POINTS.get(data_set)
  if full is None:
    checks.append(f"RobustBench has no leaderboard for {data_set!r} (it has "
                  f"{', '.join(LEADERBOARD_TEST_POINTS)})")
  elif points < full:
    checks.append(f"AutoAttack ran on {points} of the {full} test points; RobustBench's "
                  f"entries use all {full} (--config.eval.num_examples=0)")
  if attack["version"] != "standard":
    checks.append(f"the {attack['version']} version of AutoAttack ran; the leaderboard's is "
                  "the standard one (protocol autoattack)")
  if report["norm"] not in LEADERBOARD_NORMS:
    checks.append(f"RobustBench has no {THREAT_MODELS[report['norm']]} leaderboard (it has "
                  f"{', '.join(THREAT_MODELS[n] for n in LEADERBOARD_NORMS)})")
  standard = standard_options(report["norm"])
  if attack["options"] != standard:
    checks.append(f"AutoAttack ran with budgets {attack['options']}, not the standard "
                  f"version's {standard}")
  footnote = [f"Evaluated with jaxdefense ({report['checkpoint']} checkpoint, step "
              f"{report['step']}, {report['dtype']} compute)."]
  if config.data.extra:
    footnote.append(f"It trains with generated images, {round(100 * config.data.extra_fraction)}"
                    f"% of every batch ({', '.join(config.data.extra)}).")
  return {
      "link": "", "name": "", "authors": "", "additional_data": False,
      "number_forward_passes": 1, "dataset": data_set, "venue": "",
      "architecture": architecture(config), "eps": eps_text(report["eps"], report["norm"]),
      "clean_acc": f"{100 * natural['accuracy']:.2f}", "reported": "",
      "autoattack_acc": f"{100 * attack['accuracy']:.2f}", "footnote": " ".join(footnote),
      "unreliable": False, "threat_model": THREAT_MODELS[report["norm"]],
      "num_points": points, "checks": checks,
  }
