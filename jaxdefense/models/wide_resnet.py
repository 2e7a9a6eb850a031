"""WideResNet (Zagoruyko & Komodakis) with the pre-activation blocks of the robustness
literature (Madry's / TRADES' WRN-34-10), as in both authors' code.

Insertion points: `stem` (first conv), `block<s>.<b>.preact` (inside block b of stage s:
its BN-ReLU pre-activated input, before its first conv, on the conv path), `block<s>.<b>`
(block output) and `final` (the last BN-ReLU, before pooling). Authors' placements:
CAS and CIFS in the last block of stage 3 (pre-activation) and on `final` (Bai et al.,
Yan et al.); FSR on `final` (Kim et al.). Initialisation as theirs: He-normal (fan_out)
convolutions, zero Linear biases.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdefense import convolution, defenses
from jaxdefense.models import common

INITS = defenses.Inits(conv=common.HE_FAN_OUT, dense_kernel=common.TORCH_DEFAULT.dense_kernel,
                       dense_bias=common.zeros_bias_init)


def _conv(features: int, kernel: int, stride: int, dtype, name: str | None = None,
          padding: str = "symmetric") -> convolution.Conv:
  return convolution.Conv(features, (kernel, kernel), (stride, stride),
                   padding=common.conv_padding(kernel, stride, padding), use_bias=False,
                   kernel_init=INITS.conv, dtype=dtype, name=name)


class WideBlock(nn.Module):
  """BN-ReLU-conv-BN-ReLU-conv with identity (or 1x1-conv on the activated input) shortcut."""
  features: int
  stride: int
  train: bool
  dtype: jnp.dtype
  preact_hook: Callable[[jax.Array], jax.Array]
  act: Callable[[jax.Array], jax.Array] = nn.relu
  padding: str = "symmetric"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x):
    equal_in_out = x.shape[-1] == self.features
    bn = lambda: common.batch_norm(self.train, self.dtype, momentum=self.bn_momentum)
    activated = self.act(bn()(x))
    if equal_in_out:
      shortcut = x
    else:
      shortcut = _conv(self.features, 1, self.stride, self.dtype, name="shortcut_conv")(activated)
    out = _conv(self.features, 3, self.stride, self.dtype, padding=self.padding)(
        self.preact_hook(activated))
    out = self.act(bn()(out))
    return _conv(self.features, 3, 1, self.dtype)(out) + shortcut


class WideResNet(common.Backbone):
  """WRN-depth-width: (depth - 4) / 6 blocks in each of three stages of widths
  16w, 32w, 64w. DeepMind's (RobustBench's `DMWideResNet`): `activation="swish"`,
  `conv_padding="asymmetric"` and an input normalisation; the generated-data recipes
  also `bn_momentum=0.99` (Flax's: running <- 0.99 running + 0.01 batch, PyTorch's 0.01)."""
  depth: int = 34
  width: int = 10
  conv_padding: str = "symmetric"
  bn_momentum: float = 0.9
  cifs_hidden = 240  # The CIFS authors' WRN probe width.

  @property
  def blocks_per_stage(self) -> int:
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (e.g. 28, 34); "
                       f"got {self.depth}")
    return (self.depth - 4) // 6

  def insertion_points(self) -> tuple[str, ...]:
    points = ["stem"]
    for s in range(1, 4):
      for b in range(self.blocks_per_stage):
        points += [f"block{s}.{b}.preact", f"block{s}.{b}"]
    return tuple(points + ["final"])

  def default_sites(self, defense_name: str) -> tuple[str, ...]:
    if defense_name in ("cas", "cifs"):
      return (f"block3.{self.blocks_per_stage - 1}.preact", "final")
    return ("final",)

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None, *, train: bool,
               stochastic_mask: bool | None = None) -> common.ModelOutput:
    if self.width < 1:
      raise ValueError(f"WideResNet width must be >= 1, got {self.width}")
    if not 0 <= self.bn_momentum < 1:
      raise ValueError(f"WideResNet bn_momentum must lie in [0, 1), got {self.bn_momentum}")
    hooks = self.hooks(x, labels, train, stochastic_mask, INITS)
    x = hooks("stem", _conv(16, 3, 1, self.dtype)(self.prepare(x)))
    for s, features in enumerate((16 * self.width, 32 * self.width, 64 * self.width), 1):
      for b in range(self.blocks_per_stage):
        stride = 2 if s > 1 and b == 0 else 1
        site = f"block{s}.{b}"
        x = WideBlock(features, stride, train, self.dtype,
                      preact_hook=functools.partial(hooks, f"{site}.preact"), act=self.act,
                      padding=self.conv_padding, bn_momentum=self.bn_momentum,
                      name=f"block{s}_{b}")(x)
        x = hooks(site, x)
    x = hooks("final", self.act(common.batch_norm(train, self.dtype, name="final_bn",
                                                  momentum=self.bn_momentum)(x)))
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=INITS.dense_kernel,
                      bias_init=INITS.dense_bias(x.shape[-1]), dtype=self.dtype, name="fc")(x)
    return common.ModelOutput(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), hooks.aux)


WRN34_10 = functools.partial(WideResNet, depth=34, width=10)
WRN28_10 = functools.partial(WideResNet, depth=28, width=10)
