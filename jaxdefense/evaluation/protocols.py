"""The evaluation's attacks, each described once, and the protocols that choose them
(docs/evaluation.md has the table with each attack's source script).

An `EvalAttack` says what an attack is (method, budget, loss, where it applies); its fields
are what `eval.json` and `eval.md` report of it, and `jaxdefense.evaluation.evaluate` runs it from
them. `suite(config.eval)` lists every attack the evaluation knows; `PROTOCOLS` picks each
paper's from it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from jaxdefense import defenses
from jaxdefense.attacks import auto_attack, losses

METHODS = ("fgsm", "pgd", "autoattack")
LOSS_BASES = ("ce", "cw", "defense")
NORM_TITLES = {"linf": "L-inf", "l2": "L2", "l1": "L1"}  # The threat models' report names.


@dataclasses.dataclass(frozen=True)
class AttackLoss:
  """What a gradient attack maximises: `base` on the main logits (ce; cw: the C&W margin
  loss -relu(z_y - max_{j != y} z_j + kappa); defense: the defense's whole training loss),
  plus, with `heads`, beta x its mean over the CAS heads / CIFS probes (the joint loss of
  the CAS and CIFS evaluations)."""
  base: str = "ce"
  kappa: float = 0.0
  heads: bool = False

  def __post_init__(self):
    if self.base not in LOSS_BASES:
      raise ValueError(f"unknown attack loss {self.base!r}; allowed: {', '.join(LOSS_BASES)}")

  def fn(self, defense: defenses.DefenseConfig) -> losses.LossFn:
    base = {"ce": losses.cross_entropy, "cw": losses.cw(self.kappa),
            "defense": losses.defense_loss(defense)}[self.base]
    return losses.with_aux_heads(base, defense.beta) if self.heads else base

  def describe(self) -> str:
    text = {"ce": "CE", "cw": f"C&W (kappa {self.kappa:g})",
            "defense": "the defense's training loss"}[self.base]
    return text + (" + beta x its mean over the CAS heads / CIFS probes" if self.heads else "")


ALL_DEFENSES = defenses.NAMES


@dataclasses.dataclass(frozen=True)
class EvalAttack:
  """One column of the evaluation table.

  fgsm: one step of eps along the gradient's sign. pgd: `steps` steps of
  `step_size` x eps on `loss`, from a uniform point of the ball if `random_start`, with
  each gradient averaged over `eot_samples` draws of FSR's stochastic mask (EOT) when > 0,
  and CIFS's mask differentiated as a function of the input when `mask_gradient`.
  autoattack: the `version`'s attacks with their `options` (budgets), on the points still
  robust gathered into `chunks` batches."""
  title: str
  method: str
  steps: int = 1
  step_size: float = 1.0
  random_start: bool = False
  loss: AttackLoss = AttackLoss()
  eot_samples: int = 0
  mask_gradient: bool = False
  version: str = ""
  options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  chunks: int = 1
  defenses: tuple[str, ...] = ALL_DEFENSES
  norms: tuple[str, ...] = ("linf",)
  source: str = ""

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown attack method {self.method!r}; allowed: {', '.join(METHODS)}")

  def applies(self, defense: str) -> bool:
    return defense in self.defenses

  def report(self) -> dict[str, Any]:
    """The fields that define this attack, as `eval.json` gives them."""
    if self.method == "autoattack":
      fields = {"version": self.version, "options": {k: dict(v) for k, v in self.options.items()},
                "chunks": self.chunks}
    else:
      fields = {"steps": self.steps, "step_size_x_eps": self.step_size,
                "random_start": self.random_start, "loss": self.loss.describe()}
      if self.eot_samples:
        fields["eot_samples"] = self.eot_samples
      if self.mask_gradient:
        fields["mask_gradient"] = True
    return {"method": self.method, **fields, "source": self.source}


# The CAS evaluation's PGD / C&W step is 0.003 for its eps 0.031; other eps scale it.
CAS_STEP_FRACTION = 0.003 / 0.031
FSR_TEST = "wkim97/FSR test.py"
CAS_TEST = "bymavis/CAS_ICLR2021 Trades/pgd_attack_cifar10_cas.py"
CIFS_TEST = "HanshuYAN/CIFS CIFAR10_Res18_CIFS_test.py --is_joint 1"
BOTH = ("linf", "l2", "l1")  # The attacks defined for every norm.


def suite(e: ml_collections.ConfigDict) -> dict[str, EvalAttack]:
  """Every attack the evaluation knows, configured from `config.eval`."""
  cw50, defense_loss = AttackLoss("cw", 50.0), AttackLoss("defense")
  heads_ce, heads_cw50 = AttackLoss(heads=True), AttackLoss("cw", 50.0, heads=True)
  overrides = {k: dict(v) for k, v in e.autoattack_options.items()}
  options = auto_attack.resolve_options("standard", e.norm, overrides)
  rand_options = auto_attack.resolve_options(
      "rand", e.norm, {k: {**overrides[k], "eot_samples": e.eot_samples}
                       for k in ("apgd_ce", "apgd_dlr")})
  labelled = defenses.LABELLED
  return {
      "fgsm": EvalAttack("FGSM", "fgsm", source=FSR_TEST),
      "pgd20": EvalAttack("PGD-20", "pgd", 20, 0.1, norms=BOTH, source=FSR_TEST),
      "pgd100": EvalAttack("PGD-100", "pgd", 100, 0.1, norms=BOTH, source=FSR_TEST),
      "pgd20_rs": EvalAttack("PGD-20 (rs)", "pgd", 20, 0.25, random_start=True, norms=BOTH,
                             source="Madry et al. 2018"),
      "cw": EvalAttack("C&W", "pgd", 30, 0.1, loss=cw50, source=FSR_TEST),
      "autoattack": EvalAttack("AA", "autoattack", version="standard", options=options,
                               chunks=e.autoattack_chunks, norms=BOTH,
                               source="fra31/auto-attack, RobustBench"),
      "autoattack_rand": EvalAttack("AA (rand)", "autoattack", version="rand",
                                    options=rand_options, defenses=("fsr",), norms=BOTH,
                                    source="fra31/auto-attack version='rand'"),
      "adaptive": EvalAttack(f"Adaptive PGD-{e.adaptive_steps}", "pgd", e.adaptive_steps, 0.1,
                             loss=defense_loss, defenses=("cas", "fsr", "cifs"), norms=BOTH,
                             source="ours: PGD on the defense's training loss"),
      # The CAS protocol: every attack from a random start, on the main output's loss +
      # CAS beta x its mean over the CAS heads (C&W with kappa 0).
      "cas_fgsm": EvalAttack("FGSM (CAS)", "pgd", 1, 1.0, random_start=True, loss=heads_ce,
                             source=CAS_TEST),
      "cas_pgd20": EvalAttack("PGD-20 (CAS)", "pgd", 20, CAS_STEP_FRACTION, random_start=True,
                              loss=heads_ce, source=CAS_TEST),
      "cas_cw": EvalAttack("C&W (CAS)", "pgd", 20, CAS_STEP_FRACTION, random_start=True,
                           loss=AttackLoss("cw", 0.0, heads=True), source=CAS_TEST),
      # The CIFS protocol: FSR's attacks (which its code inherited) on the main output +
      # beta x the mean over the probes; `cifs_mask_pgd100` adds the mask's input
      # dependence (ours).
      "cifs_fgsm": EvalAttack("FGSM (joint)", "pgd", 1, 1.0, loss=heads_ce, defenses=labelled,
                              source=CIFS_TEST),
      "cifs_pgd20": EvalAttack("PGD-20 (joint)", "pgd", 20, 0.1, loss=heads_ce,
                               defenses=labelled, source=CIFS_TEST),
      "cifs_pgd100": EvalAttack("PGD-100 (joint)", "pgd", 100, 0.1, loss=heads_ce,
                                defenses=labelled, source=CIFS_TEST),
      "cifs_cw": EvalAttack("C&W (joint)", "pgd", 30, 0.1, loss=heads_cw50, defenses=labelled,
                            source=CIFS_TEST),
      "cifs_mask_pgd100": EvalAttack("PGD-100 (joint, mask gradient)", "pgd", 100, 0.1,
                                     loss=heads_ce, mask_gradient=True, defenses=("cifs",),
                                     source="ours: the CIFS test's PGD-100 through the mask"),
      "eot": EvalAttack(f"EOT PGD-20 (x{e.eot_samples})", "pgd", 20, 0.1,
                        eot_samples=e.eot_samples, defenses=("fsr",),
                        source="Athalye et al. 2018, on FSR's train-mode Gumbel mask"),
  }


# The attacks of each evaluation protocol (`config.eval.protocol`; `config.eval.attacks`,
# when not empty, replaces the list). full: everything (of CIFS's joint attacks the PGD-20
# and C&W), with the attacks on each defense's own loss, through CIFS's mask as a function
# of the input and through FSR's stochastic mask.
PROTOCOLS = {
    "fsr": ("fgsm", "pgd20", "pgd100", "cw"),
    "cas": ("cas_fgsm", "cas_pgd20", "cas_cw"),
    "cifs": ("fgsm", "pgd20", "pgd100", "cw", "cifs_fgsm", "cifs_pgd20", "cifs_pgd100",
             "cifs_cw"),
    "autoattack": ("autoattack",),
    "full": ("fgsm", "pgd20", "pgd100", "cw", "cas_fgsm", "cas_pgd20", "cas_cw", "cifs_pgd20",
             "cifs_cw", "autoattack", "adaptive", "cifs_mask_pgd100", "eot"),
}


def attack_names(e: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The attacks `config.eval` asks for: its `attacks` if any, else its protocol's."""
  if e.protocol not in PROTOCOLS:
    raise ValueError(f"unknown eval.protocol {e.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
  return tuple(e.attacks) or PROTOCOLS[e.protocol]


def worst_case_title(e: ml_collections.ConfigDict) -> str:
  """FSR's "Ensemble" is the per-point worst case over its protocol's four attacks; over
  any other set it is named for what it is."""
  return "Ensemble (FSR)" if e.protocol == "fsr" and not tuple(e.attacks) else "Worst case"
