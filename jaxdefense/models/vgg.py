"""VGG-16 with BatchNorm for small images.

Five stages of conv3x3(+bias)-BN-ReLU layers (64x2, 128x2, 256x3, 512x3, 512x3), each
stage followed by 2x2 max-pooling, then global average pooling and a three-layer
classifier (512-512-K). Insertion points: `stage<s>.<c>` (output of conv layer c of stage
s, after its ReLU, before any pooling). Authors' placements: CAS on every layer of stage 5
(Bai et al.); FSR after stage 4, before its max-pool (Kim et al.); CIFS on the last two
layers of stage 5 (our choice: the CIFS code has no VGG). Initialisation as the
FSR code: He-normal (fan_out) convolutions, N(0, 0.01) Linear weights, zero biases;
`init_scheme="torch"` is the CAS code's (PyTorch's defaults, biases included), and
`classifier_batchnorm=True` its Linear-BN-ReLU classifier.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdefense import convolution, defenses
from jaxdefense.models import common

INITS = {"fsr": defenses.Inits(conv=common.HE_FAN_OUT, dense_kernel=nn.initializers.normal(0.01),
                               dense_bias=common.zeros_bias_init),
         "torch": common.TORCH_DEFAULT}
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(common.Backbone):
  stages: tuple[tuple[int, ...], ...] = VGG16_STAGES
  classifier_batchnorm: bool = False
  init_scheme: str = "fsr"              # fsr | torch (the CAS code's)

  def insertion_points(self) -> tuple[str, ...]:
    return tuple(f"stage{s + 1}.{c}" for s, widths in enumerate(self.stages)
                 for c in range(len(widths)))

  def default_sites(self, defense_name: str) -> tuple[str, ...]:
    last = len(self.stages)
    if defense_name == "cas":
      return (f"stage{last}.*",)
    if defense_name == "cifs":  # Ours (the CIFS code has no VGG): the last two layers.
      return self.insertion_points()[-2:]
    return (f"stage{last - 1}.{len(self.stages[-2]) - 1}",)

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None, *, train: bool,
               stochastic_mask: bool | None = None) -> common.ModelOutput:
    if self.init_scheme not in INITS:
      raise ValueError(f"unknown VGG init_scheme {self.init_scheme!r}; allowed: "
                       f"{', '.join(INITS)}")
    inits = INITS[self.init_scheme]
    hooks = self.hooks(x, labels, train, stochastic_mask, inits)
    min_size = 2 ** len(self.stages)
    if x.shape[1] < min_size or x.shape[2] < min_size:
      raise ValueError(f"VGG with {len(self.stages)} pooling stages needs images of at least "
                       f"{min_size}x{min_size}; got {x.shape[1]}x{x.shape[2]}")
    x = self.prepare(x)
    for s, widths in enumerate(self.stages):
      for c, features in enumerate(widths):
        x = convolution.Conv(features, (3, 3), padding=1, kernel_init=inits.conv,
                      bias_init=inits.dense_bias(9 * x.shape[-1]), dtype=self.dtype,
                      name=f"stage{s + 1}_conv{c}")(x)
        x = self.act(common.batch_norm(train, self.dtype, name=f"stage{s + 1}_bn{c}")(x))
        x = hooks(f"stage{s + 1}.{c}", x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = jnp.mean(x, axis=(1, 2))
    for i in range(2):
      x = nn.Dense(512, kernel_init=inits.dense_kernel,
                   bias_init=inits.dense_bias(x.shape[-1]), dtype=self.dtype, name=f"fc{i}")(x)
      if self.classifier_batchnorm:
        x = common.batch_norm(train, self.dtype, name=f"fc{i}_bn")(x)
      x = self.act(x)
    logits = nn.Dense(self.num_classes, kernel_init=inits.dense_kernel,
                      bias_init=inits.dense_bias(x.shape[-1]), dtype=self.dtype,
                      name="classifier")(x)
    return common.ModelOutput(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), hooks.aux)


VGG16 = functools.partial(VGG, stages=VGG16_STAGES)
