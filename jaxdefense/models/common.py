"""What every backbone shares: the output type, input checks, initialisers, defense hooks."""
from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import defenses


@flax.struct.dataclass
class ModelOutput:
  """Main logits (N, K) plus named auxiliary logits, e.g. `"cas/layer4.0"`,
  `"fsr/final/robust"`; empty for an undefended model."""
  logits: jax.Array
  aux: dict[str, jax.Array]


def check_images(x: jax.Array) -> None:
  """Raises for inputs a backbone cannot take (checked at trace time: shapes and dtypes)."""
  if x.ndim != 4:
    raise ValueError(f"images must have rank 4 (N, H, W, C), NHWC in [0, 1]; got shape "
                     f"{tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"images must be floating point in [0, 1]; got dtype {x.dtype} "
                    "(convert uint8 with x.astype(jnp.float32) / 255)")


def check_labels(labels: Any, num_classes: int) -> None:
  """Raises for labels outside [0, num_classes) or of a non-integer dtype.

  Values are checked only where they are concrete and on this host (not under `jit`).
  """
  if labels is None:
    return
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices; got dtype {labels.dtype}")
  if isinstance(labels, jax.core.Tracer):
    return
  if isinstance(labels, jax.Array) and not labels.is_fully_addressable:
    return
  values = np.asarray(labels)
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    bad = values[(values < 0) | (values >= num_classes)][0]
    raise ValueError(f"label {int(bad)} is out of range: labels must lie in "
                     f"[0, {num_classes - 1}] for num_classes={num_classes}")


def torch_bias_init(fan_in: int):
  """PyTorch's default Linear/Conv bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def zeros_bias_init(fan_in: int):
  del fan_in
  return nn.initializers.zeros


# PyTorch's default kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_DEFAULT = defenses.Inits(
    conv=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    dense_kernel=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    dense_bias=torch_bias_init)
# He-normal on fan_out for convolutions, as the WRN and VGG code of the authors does.
HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish}


class Backbone(nn.Module):
  """Base of every backbone: num_classes, the hosted defense, the compute dtype, and the
  options imported models need: the activation (`swish` for DeepMind's models) and an
  input normalisation (x - input_mean) / input_std inside the model, so that inputs and
  attacks stay in [0, 1] pixel space.

  Subclasses define `insertion_points()` (every named place a defense can sit) and
  `default_sites(defense_name)` (the authors' placement), call `self.hooks(...)` once at
  the top of `__call__` and feed the network `self.prepare(x)`.
  """
  num_classes: int = 10
  defense: defenses.DefenseConfig = defenses.DefenseConfig()
  dtype: Any = jnp.float32
  activation: str = "relu"
  input_mean: tuple[float, ...] | None = None
  input_std: tuple[float, ...] | None = None

  cifs_hidden = 128  # CIFS's nonlinear probe width on this backbone (the authors' ResNet's).

  @property
  def act(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; allowed: "
                       f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[self.activation]

  def prepare(self, x: jax.Array) -> jax.Array:
    """The network's input: normalised if `input_mean`/`input_std` are set, in `dtype`."""
    if (self.input_mean is None) != (self.input_std is None):
      raise ValueError("set both input_mean and input_std, or neither")
    if self.input_mean is not None:
      channels = x.shape[-1]
      if len(self.input_mean) != channels or len(self.input_std) != channels:
        raise ValueError(f"input_mean {self.input_mean} and input_std {self.input_std} need "
                         f"one value per image channel ({channels})")
      if min(self.input_std) <= 0:
        raise ValueError(f"input_std must be > 0, got {self.input_std}")
      x = (x - jnp.asarray(self.input_mean, x.dtype)) / jnp.asarray(self.input_std, x.dtype)
    return x.astype(self.dtype)

  def active_sites(self) -> frozenset[str]:
    if self.defense.name == "none":
      return frozenset()
    patterns = self.defense.sites
    if patterns is None:
      patterns = self.default_sites(self.defense.name)
    return defenses.resolve_sites(patterns, self.insertion_points(), type(self).__name__)

  def hooks(self, x: jax.Array, labels: jax.Array | None, train: bool,
            stochastic_mask: bool | None, inits: defenses.Inits) -> defenses.Hooks:
    check_images(x)
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    check_labels(labels, self.num_classes)
    return defenses.Hooks(
        self, self.defense, self.active_sites(), num_classes=self.num_classes, labels=labels,
        train=train, stochastic_mask=train if stochastic_mask is None else stochastic_mask,
        inits=inits, dtype=self.dtype, order=self.insertion_points(),
        cifs_hidden=self.cifs_hidden)


PADDINGS = ("symmetric", "asymmetric")


def conv_padding(kernel: int, stride: int, scheme: str = "symmetric"):
  """A convolution's padding: `symmetric`, kernel // 2 on every side (PyTorch's
  padding=k//2); `asymmetric`, for strided convolutions only the bottom and right, as
  TensorFlow's SAME and DeepMind's PyTorch models (`F.pad(x, (0, 1, 0, 1))`) do."""
  if scheme not in PADDINGS:
    raise ValueError(f"unknown conv_padding {scheme!r}; allowed: {', '.join(PADDINGS)}")
  if scheme == "symmetric" or stride == 1:
    return kernel // 2
  total = max(kernel - stride, 0)
  return ((total // 2, total - total // 2),) * 2


def batch_norm(train: bool, dtype: Any, name: str | None = None,
               momentum: float = 0.9) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1: running <- 0.9 running + 0.1
  batch; `momentum` is Flax's, 1 - PyTorch's)."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                      dtype=dtype, name=name)
