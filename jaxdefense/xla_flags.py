"""XLA settings this library's conv nets run faster with on CPU (benchmarks/RESULTS.md).

XLA reads `XLA_FLAGS` once, at JAX's first computation: `main.py` and the benchmark call
`set_cpu_defaults()` at start-up, before anything runs.
"""
from __future__ import annotations

import os

# Convolutions through Eigen rather than YNNPACK, jaxlib 0.10's default for them (dots keep
# YNNPACK): the training step runs faster (benchmarks/RESULTS.md, "CPU investigation").
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
# The jaxlib versions [first, last) that know these flags: XLA aborts on an unknown flag.
JAXLIB_VERSIONS = ((0, 9), (0, 11))


def set_cpu_defaults() -> list[str]:
  """Adds to `XLA_FLAGS` each of `CPU_FLAGS` the user has not set there, on the jaxlib
  versions that know them; returns those added. They only concern the CPU backend."""
  from jaxlib import version
  jaxlib = tuple(int(part) for part in version.__version__.split(".")[:2])
  if not JAXLIB_VERSIONS[0] <= jaxlib < JAXLIB_VERSIONS[1]:
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = [flag for flag in CPU_FLAGS if flag.split("=")[0] not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
