"""Defenses that any backbone can host at its named insertion points.

A backbone calls `Hooks(...)(site, x)` at each insertion point; the hook applies the
configured defense module there (or nothing) and records the module's auxiliary logits in
`ModelOutput.aux` under `"<defense>/<site>[/<part>]"`. `aux_loss` turns those into the
defense's per-example auxiliary loss, so objectives and attacks never special-case a
defense.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdefense.defenses import cas, cifs, fsr, outputs

NAMES = ("none", "cas", "fsr", "cifs")
LABELLED = ("cas", "cifs")  # Defenses whose training-mode mask uses the label.


@dataclasses.dataclass(frozen=True)
class DefenseConfig:
  """Which defense, where, and its hyper-parameters (docs/method.md sections 1-2, docs/cifs.md).

  `sites` are insertion-point names or glob patterns (`"layer4.*"`); None means the
  authors' placement for the host backbone.
  """
  name: str = "none"
  sites: tuple[str, ...] | None = None
  beta: float = 2.0      # CAS, CIFS: weight of the mean auxiliary (probe) CE.
  tau: float = 0.1       # FSR: Gumbel-sigmoid temperature.
  lam_sep: float = 1.0   # FSR: weight of the separation CE terms.
  lam_rec: float = 1.0   # FSR: weight of the recalibration CE term.
  hidden: int = 64       # FSR: width of the separation / recalibration nets.
  # CIFS: the nonlinear probe's width (None: the backbone's, 128; WRN 240), the sites with
  # the linear probe (None: the deepest active site; the others get the nonlinear one),
  # the mask's scale, the 3/(beta+1) loss rescale, and whether the relevance is taken at
  # the detached pooled features (the authors'; False: attacks see the mask's gradient).
  probe_hidden: int | None = None
  linear_sites: tuple[str, ...] | None = None
  mask_scale: float = 1.0
  loss_rescale: bool = True
  mask_stop_gradient: bool = True

  def __post_init__(self):
    if self.name not in NAMES:
      raise ValueError(f"unknown defense {self.name!r}; allowed: {', '.join(NAMES)}")
    if self.sites is not None:
      if isinstance(self.sites, str):
        object.__setattr__(self, "sites", (self.sites,))
      object.__setattr__(self, "sites", tuple(self.sites))
      if not self.sites:
        raise ValueError("defense.sites must name at least one insertion point, or be None "
                         "for the authors' placement")
    if self.linear_sites is not None:
      object.__setattr__(self, "linear_sites", tuple(self.linear_sites))
    if self.probe_hidden is not None and self.probe_hidden < 1:
      raise ValueError(f"defense.probe_hidden must be >= 1, got {self.probe_hidden}")
    for field in ("beta", "lam_sep", "lam_rec", "mask_scale"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"defense.{field} must be >= 0, got {getattr(self, field)}")
    if not self.tau > 0:
      raise ValueError(f"defense.tau must be > 0, got {self.tau}")
    if self.hidden < 1:
      raise ValueError(f"defense.hidden must be >= 1, got {self.hidden}")


def resolve_sites(patterns: tuple[str, ...], available: tuple[str, ...],
                  host: str) -> frozenset[str]:
  """Expands site names / glob patterns against a backbone's insertion points."""
  chosen = set()
  for pattern in patterns:
    matched = fnmatch.filter(available, pattern)
    if not matched:
      raise ValueError(
          f"defense site {pattern!r} is not an insertion point of {host}; "
          f"available: {', '.join(available)} (glob patterns such as 'layer4.*' work)")
    chosen.update(matched)
  return frozenset(chosen)


@dataclasses.dataclass(frozen=True)
class Inits:
  """The host backbone's weight initialisers, reused by the defense modules it hosts
  (the authors initialise every submodule with the backbone's scheme)."""
  conv: Callable[..., Any]
  dense_kernel: Callable[..., Any]
  dense_bias: Callable[[int], Callable[..., Any]]


class Hooks:
  """Applies the configured defense at the backbone's chosen insertion points.

  Created inside a backbone's (`host`'s) `@nn.compact __call__`; the defense modules it
  builds become submodules of the module running at the site (the backbone, or the block
  for a site inside a block such as WRN's `.preact`), named `cas_<site>` / `fsr_<site>`.
  """

  def __init__(self, host: Any, defense: DefenseConfig, active: frozenset[str], *,
               num_classes: int, labels: jax.Array | None, train: bool, stochastic_mask: bool,
               inits: Inits, dtype: Any, order: tuple[str, ...] = (), cifs_hidden: int = 128):
    if defense.name in LABELLED and train and labels is None:
      raise ValueError(f"{defense.name.upper()} in training mode masks channels by the "
                       "ground-truth label: pass labels=... to the model when train=True")
    self.host = host
    self.defense = defense
    self.active = active if defense.name != "none" else frozenset()
    self.num_classes = num_classes
    self.labels = labels
    self.train = train
    self.stochastic_mask = stochastic_mask
    self.inits = inits
    self.dtype = dtype
    self.aux: dict[str, jax.Array] = {}
    self.linear_sites = defense.linear_sites
    if self.linear_sites is None:
      self.linear_sites = (max(self.active, key=order.index),) if self.active else ()
    elif not set(self.linear_sites) <= self.active:
      raise ValueError(f"defense.linear_sites {sorted(set(self.linear_sites) - self.active)} "
                       f"are not active CIFS sites; active: {sorted(self.active)}")
    self.cifs_hidden = defense.probe_hidden or cifs_hidden

  def __call__(self, site: str, x: jax.Array) -> jax.Array:
    """The feature map at `site`, defended if the site is active. Both sides are recorded
    in the `features` collection when it is mutable (activation analysis)."""
    self.host.sow("features", f"{site}/input", x)
    if site in self.active:
      x = self._defend(site, x)
    self.host.sow("features", f"{site}/output", x)
    return x

  def _defend(self, site: str, x: jax.Array) -> jax.Array:
    name = outputs.module_name(self.defense.name, site)
    if self.defense.name == "cas":
      x, logits = cas.CAS(self.num_classes, inits=self.inits, dtype=self.dtype,
                          name=name)(x, self.labels, train=self.train)
      self.aux[outputs.aux_key("cas", site)] = logits
    elif self.defense.name == "cifs":
      probe = "linear" if site in self.linear_sites else "nonlinear"
      x, logits = cifs.CIFS(self.num_classes, inits=self.inits, probe=probe,
                            hidden=self.cifs_hidden, mask_scale=self.defense.mask_scale,
                            mask_stop_gradient=self.defense.mask_stop_gradient,
                            dtype=self.dtype, name=name)(x, self.labels,
                                                                   train=self.train)
      self.aux[outputs.aux_key("cifs", site)] = logits
    else:
      x, parts = fsr.FSR(self.num_classes, tau=self.defense.tau, hidden=self.defense.hidden,
                         inits=self.inits, dtype=self.dtype, name=name)(
                             x, train=self.train, stochastic=self.stochastic_mask)
      for part, logits in parts.items():
        self.aux[outputs.aux_key("fsr", site, part)] = logits
    return x


def aux_loss(defense: DefenseConfig, logits: jax.Array, aux: dict[str, jax.Array],
             labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The defense's per-example auxiliary loss and its named parts (each shape (N,))."""
  if defense.name == "cas":
    return cas.aux_loss(aux, labels, beta=defense.beta)
  if defense.name == "cifs":
    return cifs.aux_loss(logits, aux, labels, beta=defense.beta, rescale=defense.loss_rescale)
  if defense.name == "fsr":
    return fsr.aux_loss(logits, aux, labels, lam_sep=defense.lam_sep, lam_rec=defense.lam_rec)
  return jnp.zeros(labels.shape, jnp.float32), {}


def from_config(config) -> DefenseConfig:
  """The DefenseConfig of a run's `config.defense`."""
  d = config.defense
  return DefenseConfig(
      name=d.name, sites=tuple(d.sites) or None, beta=d.beta, tau=d.tau, lam_sep=d.lam_sep,
      lam_rec=d.lam_rec, hidden=d.hidden, probe_hidden=d.probe_hidden or None,
      linear_sites=tuple(d.linear_sites) or None, mask_scale=d.mask_scale,
      loss_rescale=d.loss_rescale)
