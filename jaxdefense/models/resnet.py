"""ResNet-18/34/50 for small images (3x3 stem, no max-pool) and PreAct ResNet-18.

Insertion points: `stem` (after the stem's BN-ReLU) and `layer<s>.<b>` (output of block b
of stage s, 1-based stages, 0-based blocks); PreAct ResNet adds `final` (the last BN-ReLU,
before pooling). Authors' placements: CAS on every block of the last stage (Bai et al.);
FSR after the last stage (Kim et al.); CIFS on the last two blocks (Yan et al.).
Initialisation: PyTorch's defaults, as the authors' ResNets use.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdefense import convolution
from jaxdefense.models import common

INITS = common.TORCH_DEFAULT


def _conv(features: int, kernel: int, stride: int, dtype, name: str | None = None,
          padding: str = "symmetric") -> convolution.Conv:
  return convolution.Conv(features, (kernel, kernel), (stride, stride),
                   padding=common.conv_padding(kernel, stride, padding), use_bias=False,
                   kernel_init=INITS.conv, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  features: int
  stride: int
  train: bool
  dtype: jnp.dtype
  act: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x):
    out = _conv(self.features, 3, self.stride, self.dtype)(x)
    out = self.act(common.batch_norm(self.train, self.dtype)(out))
    out = _conv(self.features, 3, 1, self.dtype)(out)
    out = common.batch_norm(self.train, self.dtype)(out)
    return self.act(out + _shortcut(x, self.features, self.stride, self.train, self.dtype))


class Bottleneck(nn.Module):
  features: int
  stride: int
  train: bool
  dtype: jnp.dtype
  act: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x):
    out = self.act(common.batch_norm(self.train, self.dtype)(
        _conv(self.features, 1, 1, self.dtype)(x)))
    out = _conv(self.features, 3, self.stride, self.dtype)(out)
    out = self.act(common.batch_norm(self.train, self.dtype)(out))
    out = _conv(self.features * 4, 1, 1, self.dtype)(out)
    out = common.batch_norm(self.train, self.dtype)(out)
    return self.act(out + _shortcut(x, self.features * 4, self.stride, self.train, self.dtype))


def _shortcut(x, features: int, stride: int, train: bool, dtype):
  if stride == 1 and x.shape[-1] == features:
    return x
  x = _conv(features, 1, stride, dtype, name="shortcut_conv")(x)
  return common.batch_norm(train, dtype, name="shortcut_bn")(x)


class ResNet(common.Backbone):
  """He et al.'s ResNet with the CIFAR stem; `stage_sizes` blocks per stage, stage s of
  width `width * 2**s` (64: the standard widths 64-128-256-512)."""
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  bottleneck: bool = False
  width: int = 64

  def insertion_points(self) -> tuple[str, ...]:
    return ("stem",) + tuple(f"layer{s + 1}.{b}" for s, n in enumerate(self.stage_sizes)
                             for b in range(n))

  def default_sites(self, defense_name: str) -> tuple[str, ...]:
    last = len(self.stage_sizes)
    if defense_name == "cas":
      return (f"layer{last}.*",)
    if defense_name == "cifs":  # The last two blocks: layer4.0 and layer4.1 of ResNet-18.
      return self.insertion_points()[-2:]
    return (f"layer{last}.{self.stage_sizes[-1] - 1}",)

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None, *, train: bool,
               stochastic_mask: bool | None = None) -> common.ModelOutput:
    hooks = self.hooks(x, labels, train, stochastic_mask, INITS)
    x = _conv(self.width, 3, 1, self.dtype)(self.prepare(x))
    x = hooks("stem", self.act(common.batch_norm(train, self.dtype)(x)))
    block = Bottleneck if self.bottleneck else BasicBlock
    for s, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        stride = 2 if s > 0 and b == 0 else 1
        x = block(self.width * 2**s, stride, train, self.dtype, self.act,
                  name=f"layer{s + 1}_{b}")(x)
        x = hooks(f"layer{s + 1}.{b}", x)
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=INITS.dense_kernel,
                      bias_init=INITS.dense_bias(x.shape[-1]), dtype=self.dtype, name="linear")(x)
    return common.ModelOutput(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), hooks.aux)


class PreActBlock(nn.Module):
  features: int
  stride: int
  train: bool
  dtype: jnp.dtype
  act: Callable[[jax.Array], jax.Array] = nn.relu
  padding: str = "symmetric"
  shortcut_kernel: int = 1
  shortcut_input: str = "activated"

  @nn.compact
  def __call__(self, x):
    out = self.act(common.batch_norm(self.train, self.dtype)(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, self.shortcut_kernel, self.stride, self.dtype,
                       name="shortcut_conv", padding=self.padding)(
                           out if self.shortcut_input == "activated" else x)
    out = _conv(self.features, 3, self.stride, self.dtype, padding=self.padding)(out)
    out = self.act(common.batch_norm(self.train, self.dtype)(out))
    return _conv(self.features, 3, 1, self.dtype)(out) + shortcut


class PreActResNet(common.Backbone):
  """He et al.'s pre-activation ResNet (identity mappings), CIFAR stem, widths as ResNet.

  By default as AWP's and Rice et al.'s (projection shortcuts on the activated input, a
  final BN-ReLU). RobustBench's `PreActResNet18`: `shortcut_input="raw"`,
  `final_bn=False`; DeepMind's `DMPreActResNet`: also `conv_padding="asymmetric"`,
  `shortcut_kernel=3`, `activation="swish"` and an input normalisation.
  """
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  width: int = 64
  conv_padding: str = "symmetric"
  shortcut_kernel: int = 1
  shortcut_input: str = "activated"   # activated | raw: what a projection shortcut convolves.
  final_bn: bool = True

  def insertion_points(self) -> tuple[str, ...]:
    return (("stem",) + tuple(f"layer{s + 1}.{b}" for s, n in enumerate(self.stage_sizes)
                              for b in range(n)) + ("final",))

  def default_sites(self, defense_name: str) -> tuple[str, ...]:
    if defense_name == "cas":
      return (f"layer{len(self.stage_sizes)}.*",)
    if defense_name == "cifs":  # As on ResNet: the last two blocks.
      return self.insertion_points()[-3:-1]
    return ("final",)

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None, *, train: bool,
               stochastic_mask: bool | None = None) -> common.ModelOutput:
    if self.shortcut_input not in ("activated", "raw"):
      raise ValueError(f"unknown shortcut_input {self.shortcut_input!r}; allowed: "
                       "activated, raw")
    hooks = self.hooks(x, labels, train, stochastic_mask, INITS)
    x = hooks("stem", _conv(self.width, 3, 1, self.dtype)(self.prepare(x)))
    for s, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        stride = 2 if s > 0 and b == 0 else 1
        x = PreActBlock(self.width * 2**s, stride, train, self.dtype, self.act,
                        self.conv_padding, self.shortcut_kernel, self.shortcut_input,
                        name=f"layer{s + 1}_{b}")(x)
        x = hooks(f"layer{s + 1}.{b}", x)
    if self.final_bn:
      x = self.act(common.batch_norm(train, self.dtype, name="final_bn")(x))
    x = hooks("final", x)
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=INITS.dense_kernel,
                      bias_init=INITS.dense_bias(x.shape[-1]), dtype=self.dtype, name="linear")(x)
    return common.ModelOutput(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), hooks.aux)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True)
PreActResNet18 = functools.partial(PreActResNet, stage_sizes=(2, 2, 2, 2))
