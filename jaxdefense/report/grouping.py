"""Which runs are replicates, which are compared, and which are not comparable at all.

- A **section** is an evaluation: the same test points (eval.json's fingerprint; the data
  set and point count for evaluations written before it), eps, norm, protocol and compute
  dtype, and for every attack the same settings. Runs in different sections are never
  compared; a run whose attack settings differ from its section's is left out.
- A **group** is a section's runs whose experiments agree: the config fields (`config.json`)
  that differ between the runs given, less the seed and `NOT_THE_EXPERIMENT`, and the
  checkpoint evaluated. Its runs are replicates, one per seed. Groups are in the order of
  their values, whatever the order of the workdirs given.
- The **baseline** (`--baseline=FIELD=VALUE[,...]`) of a group is the group of its section
  that has those values and agrees with it on every other differing field.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Sequence

from jaxdefense import errors
from jaxdefense.evaluation import protocols
from jaxdefense.report.runs import LeftOut, Run

# Config fields that do not change what a run computes (where files are, how often it logs
# or saves, how it reads), its label, and the evaluation settings it was trained with
# (eval.json records the ones its evaluation ran with).
NOT_THE_EXPERIMENT = (
    "name", "seed", "data.data_dir", "data.buffer_batches", "data.read_concurrency",
    "data.extra_cache_dir", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.lease_timeout_s", "train.eval_batch_size", "eval.",
    "audit.", "analysis.")
# Short names of the fields a comparison is usually about (--baseline=defense=none).
ALIASES = {"defense": "defense.name", "objective": "objective.name", "arch": "model.arch",
           "data": "data.name"}
CHECKPOINT = "checkpoint"  # eval.json's: best or latest, part of what a group is.
# Per-attack entries of eval.json that are outcomes or bookkeeping, not settings (AutoAttack's
# chunks change how the work is batched, not its results).
NOT_SETTINGS = ("title", "accuracy", "num_points", "seed", "time_s", "forward_passes",
                "backward_passes", "non_finite_points", "robust_after", "checks", "warnings",
                "skipped", "eps", "norm", "chunks")


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What makes two evaluations comparable point by point (a section's key)."""
  data: str
  points: int
  fingerprint: str | None  # None: evaluated before eval.json recorded its points.
  eps: float
  norm: str
  protocol: str
  dtype: str

  @classmethod
  def of(cls, run: Run) -> Evaluation:
    e = run.evaluation
    outcomes = e.get("outcomes") or {}
    return cls(data=e["data"], points=int(e["results"]["natural"]["num_points"]),
               fingerprint=outcomes.get("fingerprint"), eps=float(e["eps"]), norm=e["norm"],
               protocol=e["protocol"], dtype=e.get("dtype", "float32"))

  def title(self) -> str:
    eps = (f"{255 * self.eps:g}/255" if self.norm == "linf" else f"{self.eps:g}")
    points = (f"first {self.points} test points" if self.fingerprint is None else
              f"{self.points} test points ({self.fingerprint})")
    return (f"{self.data}, {points}, {protocols.NORM_TITLES.get(self.norm, self.norm)} eps "
            f"{eps}, protocol {self.protocol}, {self.dtype}")

  def differences(self, other: Evaluation) -> str:
    """What differs from `other`, as "field a vs b, ..."."""
    return ", ".join(f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}"
                     for f in dataclasses.fields(self)
                     if getattr(self, f.name) != getattr(other, f.name))


@dataclasses.dataclass
class Group:
  label: str                   # "defense=cas, arch=wrn34_10"; "all runs" if none differs.
  values: dict[str, Any]       # Differing field -> this group's value.
  runs: list[Run]              # Replicates, by seed.

  @property
  def seeds(self) -> list[int]:
    return [r.seed for r in self.runs]


@dataclasses.dataclass
class Section:
  evaluation: Evaluation
  titles: dict[str, str]  # eval.json column name -> title, natural first, worst case last.
  groups: list[Group]


def short_name(field: str) -> str:
  return next((alias for alias, name in ALIASES.items() if name == field), field)


def display(value: Any) -> str:
  if isinstance(value, tuple):
    return "(" + ", ".join(display(v) for v in value) + ")"
  return "none" if value is None else str(value)


def experiment(run: Run) -> dict[str, Any]:
  """The fields that define what `run` computed (`NOT_THE_EXPERIMENT` left out), and the
  checkpoint evaluated."""
  fields = {k: v for k, v in run.config.items()
            if not any(k == n or (n.endswith(".") and k.startswith(n))
                       for n in NOT_THE_EXPERIMENT)}
  fields[CHECKPOINT] = run.evaluation["checkpoint"]
  return fields


def differing_fields(runs: Sequence[Run]) -> list[str]:
  """The experiment fields whose values are not the same in every run, sorted."""
  experiments = [experiment(r) for r in runs]
  names = sorted(set().union(*experiments)) if experiments else []
  return [n for n in names if len({json.dumps(e.get(n), default=str)
                                   for e in experiments}) > 1]


def attack_settings(run: Run) -> dict[str, dict[str, Any]]:
  """Per attack the run ran (not skipped): its settings as eval.json records them."""
  return {name: {k: v for k, v in r.items() if k not in NOT_SETTINGS}
          for name, r in run.evaluation["results"].items()
          if name not in ("natural", "worst_case") and "accuracy" in r}


def _section(evaluation: Evaluation, runs: list[Run], fields: list[str]
             ) -> tuple[Section, list[LeftOut]]:
  """The section of `runs` (one evaluation): each attack's settings are the most common
  among the runs that ran it (the first run's on a tie); runs that ran one otherwise, and a
  second run of a group with the same seed, are left out."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for run in runs:
    for name, settings in attack_settings(run).items():
      counts[name][json.dumps(settings, sort_keys=True, default=str)] += 1
  majority = {name: json.loads(c.most_common(1)[0][0]) for name, c in counts.items()}
  left_out, kept = [], []
  for run in runs:
    odd = [f"{name} with {_diff(settings, majority[name])}"
           for name, settings in attack_settings(run).items() if settings != majority[name]]
    if odd:
      left_out.append(LeftOut(run.workdir, "evaluated with other attack settings than the "
                              f"runs evaluated alike: {'; '.join(odd)}"))
    else:
      kept.append(run)
  groups: dict[tuple, Group] = {}
  for run in sorted(kept, key=lambda r: r.seed):
    values = {f: experiment(run).get(f) for f in fields}
    key = tuple(json.dumps(values[f], default=str) for f in fields)
    group = groups.setdefault(key, Group(_label(values), values, []))
    twin = next((r for r in group.runs if r.seed == run.seed), None)
    if twin is not None:
      left_out.append(LeftOut(run.workdir, f"the same experiment and seed ({run.seed}) as "
                              f"{twin.workdir}, evaluated alike: a duplicate"))
      continue
    group.runs.append(run)
  titles = {"natural": "Natural"}
  for run in kept:
    for name, r in run.evaluation["results"].items():
      titles.setdefault(name, r["title"])
  titles["worst_case"] = titles.pop("worst_case")  # Last, after every attack.
  ordered = sorted(groups.values(), key=lambda g: [display(v) for v in g.values.values()])
  return Section(evaluation, titles, ordered), left_out


def _diff(settings: dict[str, Any], reference: dict[str, Any]) -> str:
  keys = sorted(set(settings) | set(reference))
  return ", ".join(f"{k} {settings.get(k)} (not {reference.get(k)})" for k in keys
                   if settings.get(k) != reference.get(k))


def _label(values: dict[str, Any]) -> str:
  return ", ".join(f"{short_name(f)}={display(v)}" for f, v in values.items()) or "all runs"


def sections(runs: Sequence[Run]) -> tuple[list[Section], list[str], list[LeftOut]]:
  """(sections, the differing fields, the runs left out) of `runs`."""
  fields = differing_fields(runs)
  by_evaluation: dict[Evaluation, list[Run]] = {}
  for run in runs:
    by_evaluation.setdefault(Evaluation.of(run), []).append(run)
  out, left_out = [], []
  for evaluation, members in by_evaluation.items():
    section, dropped = _section(evaluation, members, fields)
    out.append(section)
    left_out += dropped
  return out, fields, left_out


def parse_baseline(text: str) -> dict[str, str]:
  """`FIELD=VALUE[,FIELD=VALUE...]` as {field: value text}; FIELD a dotted config field,
  `checkpoint`, or one of ALIASES. A malformed one is a ConfigError naming it."""
  spec = {}
  for part in filter(None, text.split(",")):
    field, sep, value = part.partition("=")
    if not sep or not field.strip() or not value.strip():
      raise errors.ConfigError(
          f"--baseline={text}: expected FIELD=VALUE[,FIELD=VALUE...] (e.g. "
          f"--baseline=defense=none; short fields: {', '.join(ALIASES)})")
    spec[ALIASES.get(field.strip(), field.strip())] = value.strip()
  return spec


def matches(value: Any, text: str) -> bool:
  """Whether a config value is what --baseline names (as displayed, or as JSON: 6 = 6.0)."""
  if display(value) == text:
    return True
  try:
    return json.loads(text) == value
  except json.JSONDecodeError:
    return False


def baseline_problem(spec: dict[str, str], runs: Sequence[Run]) -> str | None:
  """Why --baseline matches no run (naming the values there are), or None."""
  experiments = [experiment(r) for r in runs]
  for field, text in spec.items():
    values = sorted({display(e[field]) for e in experiments if field in e})
    if not values:
      return (f"--baseline: no run's config has the field {field!r} (differing fields are "
              f"the ones to name: {', '.join(map(short_name, differing_fields(runs))) or 'none'})")
    if not any(matches(e.get(field), text) for e in experiments):
      return f"--baseline: no run has {short_name(field)}={text} (its values: {', '.join(values)})"
  if not any(all(matches(e.get(f), t) for f, t in spec.items()) for e in experiments):
    return f"--baseline: no run has {', '.join(f'{short_name(f)}={t}' for f, t in spec.items())}"
  return None


def is_baseline(group: Group, spec: dict[str, str]) -> bool:
  experiment_values = experiment(group.runs[0])
  return all(matches(experiment_values.get(f), t) for f, t in spec.items())


def baseline_of(group: Group, section: Section, spec: dict[str, str],
                all_sections: Sequence[Section]) -> tuple[Group | None, str]:
  """(the baseline group of `group` in `section`, "") or (None, why there is none)."""
  def agrees(other: Group) -> bool:
    return (is_baseline(other, spec)
            and all(other.values[f] == v for f, v in group.values.items() if f not in spec))
  found = next((g for g in section.groups if agrees(g)), None)
  if found is not None:
    return found, ""
  elsewhere = [(s, g) for s in all_sections if s is not section for g in s.groups if agrees(g)]
  if elsewhere:
    s, g = elsewhere[0]
    return None, (f"its baseline ({g.label}) was evaluated differently "
                  f"({section.evaluation.differences(s.evaluation)}): not compared")
  others = ", ".join(f"{short_name(f)}={display(v)}" for f, v in group.values.items()
                     if f not in spec)
  return None, f"no baseline run agrees with it{' on ' + others if others else ''}"
