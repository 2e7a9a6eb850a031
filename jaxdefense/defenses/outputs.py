"""The names of what a hosted defense adds to a model, in one place: the keys of its
auxiliary outputs in `ModelOutput.aux` and the names of its Flax modules.

- `aux` keys: `"cas/<site>"` (a CAS head's logits), `"cifs/<site>"` (a CIFS probe's logits),
  `"fsr/<site>/<part>"` (FSR's head on the robust, non-robust and recalibrated features).
- Flax module names: `"<defense>_<site>"` with the site's dots as underscores, e.g.
  `"fsr_layer4_1"`, `"cifs_block3_4_preact"`.
"""
from __future__ import annotations

import jax

CLASS_HEADS = ("cas", "cifs")  # Defenses whose auxiliary outputs are class predictions.


def aux_key(defense: str, site: str, part: str | None = None) -> str:
  return f"{defense}/{site}" + (f"/{part}" if part else "")


def _defense_of_key(key: str) -> str:
  return key.split("/", 1)[0]


def of(aux: dict[str, jax.Array], defense: str) -> list[jax.Array]:
  """The auxiliary outputs of `defense`, in key order."""
  return [v for k, v in sorted(aux.items()) if _defense_of_key(k) == defense]


def class_heads(aux: dict[str, jax.Array]) -> list[jax.Array]:
  """Every auxiliary class prediction (CAS heads, CIFS probes), in key order."""
  return [v for k, v in sorted(aux.items()) if _defense_of_key(k) in CLASS_HEADS]


def fsr_sites(aux: dict[str, jax.Array]) -> list[str]:
  """The sites with an FSR module, sorted."""
  return sorted({k.split("/")[1] for k in aux if _defense_of_key(k) == "fsr"})


def module_name(defense: str, site: str) -> str:
  return f"{defense}_{site.replace('.', '_')}"


def module_defense(name: str) -> str | None:
  """The defense whose module `name` (one path component) is, or None."""
  defense = name.split("_", 1)[0]
  return defense if defense in ("cas", "fsr", "cifs") and "_" in name else None
