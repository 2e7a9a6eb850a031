"""A 2-D convolution that XLA's CPU backend runs through Eigen everywhere.

XLA CPU runs a convolution fast (Eigen) only in the canonical layout: NHWC input, HWIO
kernel, NHWC output. Two things take convolutions out of it (benchmarks/RESULTS.md):
- its ConvCanonicalization pass rewrites only a program's entry computation, so the input
  gradient JAX's autodiff emits (kernel in/out dimensions swapped) runs as a naive loop nest
  inside a `while` body, so an attack in `lax.fori_loop` ran several times slower than
  unrolled;
- its algebraic simplifier swaps the operands of a convolution whose input is smaller than
  the kernel (VGG-16's 2x2 last stage on 32x32 images), again a naive loop nest.

`conv_general_dilated` computes the same function with a custom VJP whose input gradient is
a canonical convolution: the output gradient dilated by the stride, convolved with the
kernel flipped in space and transposed in/out (dx = dy (*) rot180(W)^T); inputs smaller
than the kernel are padded before the convolution. The weight gradient is JAX's own. `Conv`
is `nn.Conv` (same parameters, same names) using it on the CPU backend; elsewhere it is
`lax.conv_general_dilated` itself (unmeasured there: cuDNN and the TPU have their own
layout passes). Forward-mode differentiation (`jax.jvp`) of a custom VJP is unsupported.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CANONICAL = ("NHWC", "HWIO", "NHWC")


def _is_canonical(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  return (lhs.ndim == 4 and rhs.ndim == 4 and dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, CANONICAL))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, with the canonical-layout input gradient for the plain
  NHWC/HWIO case (no dilation, one feature group) that every backbone here uses."""
  plain = (_is_canonical(lhs, rhs, dimension_numbers) and feature_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, strides, pads, precision)


def _canonical(x: jax.Array, w: jax.Array, strides: Sequence[int],
               pads: Sequence[tuple[int, int]], lhs_dilation: Sequence[int],
               precision: Any) -> jax.Array:
  """The convolution in the canonical layout. Where the (dilated) input is smaller than the
  kernel, its padding and dilation are applied by `lax.pad` first: XLA CPU swaps the
  operands of such a convolution (VGG-16's 2x2 last stage on 32x32 images) into a layout it
  runs as a naive loop nest, about 100x slower than Eigen."""
  size = [(n - 1) * d + 1 for n, d in zip(x.shape[1:3], lhs_dilation)]
  if all(n >= k for n, k in zip(size, w.shape[:2])):
    return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dilation,
                                    dimension_numbers=CANONICAL, precision=precision)
  spatial = tuple((lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation))
  # The barrier keeps XLA from folding the pad back into the convolution's window.
  x = lax.optimization_barrier(
      lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + spatial + ((0, 0, 0),)))
  return lax.conv_general_dilated(x, w, strides, "VALID", dimension_numbers=CANONICAL,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...],
          pads: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
  return _canonical(x, w, strides, pads, (1, 1), precision)


def _conv_fwd(x, w, strides, pads, precision):
  return _conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
  x, w = residuals
  # Input length n, kernel k, stride s, padding (lo, hi), output length m: dy dilated by s
  # has (m - 1) s + 1 entries; padded by k - 1 - lo before and the rest after, a stride-1
  # convolution with the flipped kernel gives back n entries.
  input_pads = []
  for n, k, m, s, (lo, _) in zip(x.shape[1:3], w.shape[:2], dy.shape[1:3], strides, pads):
    before = k - 1 - lo
    input_pads.append((before, n + k - 1 - ((m - 1) * s + 1) - before))
  w_flipped = jnp.flip(jnp.transpose(w, (0, 1, 3, 2)), (0, 1))
  dx = _canonical(dy, w_flipped, (1, 1), input_pads, strides, precision)
  _, weight_vjp = jax.vjp(lambda v: _canonical(x, v, strides, pads, (1, 1), precision), w)
  (dw,) = weight_vjp(dy)
  return dx.astype(x.dtype), dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _for_backend() -> Callable[..., jax.Array]:
  return conv_general_dilated if jax.default_backend() == "cpu" else lax.conv_general_dilated


class Conv(nn.Conv):
  """`nn.Conv` with the loop-friendly input gradient on CPU (see the module docstring)."""
  conv_general_dilated_cls: Any = _for_backend
