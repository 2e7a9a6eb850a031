"""`python main.py --mode=audit --config=... --workdir=DIR`: is the evaluation of this
checkpoint being fooled? (docs/audit.md)

On the first `eval.num_examples` test points, at `eval.eps` and `eval.norm`, it runs
1. AutoAttack (standard) with its checks (`autoattack_checks`),
2. the six indicators of attack failure on runs of `audit.attack` (`indicators`),
3. robust accuracy against eps, iterations and restarts (`curves`),
each batch sharded over the devices and recorded, so that an interrupted audit resumes
where it stopped (like `--mode=eval`). It writes `DIR/audit.json` (every number),
`DIR/audit.md` (per indicator and check: verdict, evidence, what to try next; the cost in
passes and seconds, beside AutoAttack's) and `DIR/audit_curves.png`.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxdefense import attacks, defenses
from jaxdefense.evaluation import curves, evaluate, indicators, plotting, protocols, setup
from jaxdefense.workdir import paths


def _indicator_fn(config, attack: protocols.EvalAttack, model, surrogate_model):
  """(variables, x, labels, key, count) -> (correct, finite, per-point values) of
  `indicators.batch`; `variables` = {"target": ..., "surrogate": ... or None}."""
  e = config.eval
  defense = defenses.from_config(config)

  def fn(v, x, labels, key, count):
    target = attacks.deployed(model, v["target"])
    attacked = count(evaluate.attacked_model(attack, model, v["target"]))
    surrogate = (None if surrogate_model is None
                 else count(attacks.deployed(surrogate_model, v["surrogate"])))
    values = indicators.batch(
        target, attacked, attack.loss.fn(defense), x, labels, key, eps=e.eps,
        step_size=attack.step_size * e.eps, steps=attack.steps, norm=e.norm,
        random_start=attack.random_start, iterations=tuple(config.audit.iterations),
        surrogate_fn=surrogate)
    return values["correct"], jnp.ones_like(values["correct"]), values
  return fn


def _curve_fns(config, attack: protocols.EvalAttack, model):
  """The eps curve's point (args: the variables, eps and the step size, so that one compiled
  program serves the grid) and the restart curve, as attack-point functions."""
  e, a = config.eval, config.audit
  loss_fn = attack.loss.fn(defenses.from_config(config))

  def at_eps(args, x, labels, key, count):
    correct = curves.eps_point(count(evaluate.attacked_model(attack, model, args["variables"])),
                               attack, loss_fn, x, labels, key, eps=args["eps"],
                               step_size=args["step_size"], steps=a.curve_steps, norm=e.norm)
    return correct, jnp.ones_like(correct), {}

  def restarts(v, x, labels, key, count):
    runs = curves.restart_points(count(evaluate.attacked_model(attack, model, v)), attack,
                                 loss_fn, x, labels, key, eps=e.eps, steps=a.curve_steps,
                                 norm=e.norm, restarts=max(a.restarts))
    return (jnp.all(runs, axis=0), jnp.ones_like(runs[0]),
            {f"correct_run.{r}": runs[r] for r in range(runs.shape[0])})
  return at_eps, restarts


def audit(config: ml_collections.ConfigDict, model, variables, images: np.ndarray,
          labels: np.ndarray, mesh, *, surrogate: tuple[Any, dict] | None = None,
          record: evaluate.Record = evaluate.Record(None), progress: bool = True
          ) -> dict[str, Any]:
  """AutoAttack with its checks, the indicators and the curves on (images, labels),
  `config` validated with AutoAttack (`setup.load`)."""
  e, a = config.eval, config.audit
  attack = protocols.suite(e)[a.attack]
  points = functools.partial(evaluate.attack_points, images=images, labels=labels, mesh=mesh,
                             batch_size=e.batch_size, seed=e.seed, record=record,
                             progress=progress)
  costs: dict[str, dict[str, float]] = {}

  def run(name, fn, args):
    correct, totals, per_point = points(name, fn, args)
    costs[name] = {k: totals[k] for k in ("time_s", "forward_passes", "backward_passes")}
    return correct, per_point

  aa, _ = evaluate.evaluate(config, model, variables, images, labels, mesh,
                            names=("autoattack",), progress=progress, record=record)
  natural = np.asarray(run("natural", lambda v, x, y, k, count: (
      *attacks.correct_points(model, v, x, y), {}), variables)[0])
  costs["autoattack"] = {k: aa["autoattack"][k]
                         for k in ("time_s", "forward_passes", "backward_passes")}

  surrogate_model, surrogate_variables = surrogate or (None, None)
  attacked, values = run("indicators", _indicator_fn(config, attack, model, surrogate_model),
                         {"target": variables, "surrogate": surrogate_variables})
  names = tuple(a.indicators)
  report_indicators = indicators.summarise(values, names)

  at_eps, restarts = _curve_fns(config, attack, model)
  at_eps = evaluate.program(at_eps)  # Compiled once for the whole grid.
  eps_grid = [f * e.eps for f in a.eps_factors]
  eps_accuracy = [float(np.mean(run(f"eps_{f:g}", at_eps, {
      "variables": variables, "eps": np.float32(eps),
      "step_size": np.float32(attack.step_size * eps)})[0] & natural))
                  for f, eps in zip(a.eps_factors, eps_grid)]
  _, runs = run("restarts", restarts, variables)
  by_run = np.stack([runs[f"correct_run.{r}"] for r in range(max(a.restarts))])
  restart_accuracy = [float(np.mean(np.all(by_run[:r], axis=0) & natural)) for r in a.restarts]
  iteration_accuracy = [float(np.mean(values[f"correct_at.{t}"])) for t in a.iterations]
  report_curves = curves.summarise(eps_grid, eps_accuracy, list(a.iterations),
                                   iteration_accuracy, list(a.restarts), restart_accuracy)
  audit_cost = {k: sum(c[k] for n, c in costs.items() if n != "autoattack")
                for k in ("time_s", "forward_passes", "backward_passes")}
  aa_passes = costs["autoattack"]["forward_passes"] + costs["autoattack"]["backward_passes"]
  return {
      "natural": aa["natural"], "autoattack": aa["autoattack"],
      "attack": {"name": a.attack, "accuracy": float(np.mean(attacked & natural)),
                 **attack.report()},
      "indicators": report_indicators, "curves": report_curves,
      "cost": {"parts": costs, "audit_beyond_autoattack": audit_cost,
               "ratio_to_autoattack": (audit_cost["forward_passes"]
                                       + audit_cost["backward_passes"]) / max(aa_passes, 1)},
  }


def markdown(report: dict[str, Any], caption: str) -> str:
  """audit.md: the verdicts first (what triggered, what to try), then the evidence."""
  lines = [caption, ""]
  aa = report["autoattack"]
  lines += [f"Natural {100 * report['natural']['accuracy']:.2f}%, AutoAttack "
            f"{100 * aa['accuracy']:.2f}% (standard)."]
  triggered = [i for i in report["indicators"].values() if i.get("triggered")]
  failed_checks = [c for c in aa["checks"] if not c["passed"]]
  failed_curves = [(k, c) for k, c in report["curves"].items() if not c["passed"]]
  if not (triggered or failed_checks or failed_curves):
    lines += ["", "**No sign that the evaluation is fooled**: every check, indicator and "
              "curve passed (which does not prove robustness; see docs/audit.md)."]
  else:
    lines += ["", "**Signs that the evaluation may be fooled:**", ""]
    lines += [f"- AutoAttack check `{c['check']}`: {c['warning']}" for c in failed_checks]
    lines += [f"- {i['title']} ({_value(i)} > {i['threshold']:g}): {i['remedy']}"
              for i in triggered]
    lines += [f"- Robust accuracy against {k}: {c['verdict']}" for k, c in failed_curves]
  attack = report["attack"]
  lines += ["", f"## Indicators of attack failure ({attack['name']}: {attack['steps']} steps "
            f"of {attack['step_size_x_eps']:g} x eps, {attack['loss']}; robust accuracy "
            f"{100 * attack['accuracy']:.2f}%)", "",
            "| indicator | value | threshold | points | flagged | verdict |",
            "|---|---|---|---|---|---|"]
  for i in report["indicators"].values():
    if "skipped" in i:
      lines.append(f"| {i['title']} | | | | | not run: {i['skipped']} |")
    else:
      lines.append(f"| {i['title']} | {_value(i)} | {i['threshold']:g} | {i['points']} | "
                   f"{i.get('flagged', '')} | {i['verdict']} |")
  lines += ["", "## AutoAttack's checks", "", "| check | passed | value |", "|---|---|---|"]
  lines += [f"| {c['check']} | {'yes' if c['passed'] else '**no**'} | {c['value']} |"
            for c in aa["checks"]]
  lines += ["", "## Curves (audit_curves.png)", ""]
  for key, c in report["curves"].items():
    pairs = ", ".join(f"{x:g}: {100 * y:.2f}" for x, y in zip(c[key], c["accuracy"]))
    lines.append(f"- against {key} ({pairs}): {c['verdict']}")
  cost = report["cost"]
  lines += ["", "## Cost", "", "| part | seconds | forward passes | backward passes |",
            "|---|---|---|---|"]
  lines += [f"| {name} | {c['time_s']:.1f} | {c['forward_passes']} | {c['backward_passes']} |"
            for name, c in cost["parts"].items()]
  lines += ["", f"Beyond AutoAttack the audit made {cost['ratio_to_autoattack']:.2f} x its "
            "passes.", ""]
  return "\n".join(lines)


def _value(indicator: dict[str, Any]) -> str:
  return f"{indicator['value']:.4f}"


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, which: str = "best") -> dict:
  """Restores the run in `workdir`, audits it, writes audit.json, audit.md and the plot."""
  s = setup.load(config, workdir, which, attacks=("autoattack",), surrogate=True)
  e = config.eval
  progress = s.progress("audit_progress", config, audit=config.audit.to_dict())
  if jax.process_index() == 0:
    print(f"auditing {which} checkpoint (step {s.step}) of {s.workdir} on {len(s.labels)} "
          f"{s.dataset.name} test points, eps {e.eps:.4f} {protocols.NORM_TITLES[e.norm]}"
          + (" (resuming: finished batches reused)" if progress.exists() else ""), flush=True)
  report = audit(config, s.model, s.variables, s.images, s.labels, s.mesh,
                 surrogate=s.surrogate, record=evaluate.Record(progress))
  report.update(config=config.name, checkpoint=which, step=s.step, defense=config.defense.name,
                data=s.dataset.name, eps=e.eps, norm=e.norm, points=len(s.labels))
  if jax.process_index() == 0:
    paths.write_text(s.workdir / "audit.json", json.dumps(report, indent=2))
    caption = (f"# Audit: {config.name}, {config.model.arch} + {config.defense.name}, "
               f"{which} checkpoint (step {s.step}), {len(s.labels)} {s.dataset.name} test "
               f"points, eps {e.eps:.4g} {protocols.NORM_TITLES[e.norm]}")
    text = markdown(report, caption)
    paths.write_text(s.workdir / "audit.md", text)
    if plotting.available("audit plot"):
      plotting.write_png(plotting.audit_curves(report["curves"], caption[2:],
                                               report["autoattack"]["accuracy"]),
                         s.workdir / "audit_curves.png")
    print(text, flush=True)
    if progress.exists():
      progress.rmtree()
  return report
