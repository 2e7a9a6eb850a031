"""Backbones by name. Every model is called as

    out = model.apply(variables, images, labels, train=..., rngs=..., mutable=...)

with NHWC images in [0, 1] and returns a `ModelOutput` (main logits + named auxiliary
logits of the hosted defense). Training mode needs `mutable=["batch_stats"]`, labels when
the defense is CAS or CIFS (their training-mode masks use them), and an rng stream
`"gumbel"` when it is FSR.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdefense import defenses
from jaxdefense.models import resnet, vgg, wide_resnet
from jaxdefense.models.common import ModelOutput, check_images, check_labels

DTYPES = ("float32", "bfloat16")  # Compute dtypes (config.model.dtype); params stay float32.
ARCHITECTURES = {
    "resnet": resnet.ResNet,
    "resnet18": resnet.ResNet18,
    "resnet34": resnet.ResNet34,
    "resnet50": resnet.ResNet50,
    "preact_resnet18": resnet.PreActResNet18,
    "wrn34_10": wide_resnet.WRN34_10,
    "wrn28_10": wide_resnet.WRN28_10,
    "wide_resnet": wide_resnet.WideResNet,
    "vgg16": vgg.VGG16,
}


def create(arch: str, *, num_classes: int, defense: defenses.DefenseConfig | None = None,
           dtype: Any = jnp.float32, **kwargs) -> Any:
  """Builds a backbone by name; `kwargs` set architecture fields (e.g. depth, width)."""
  if arch not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
  return ARCHITECTURES[arch](num_classes=num_classes,
                             defense=defense or defenses.DefenseConfig(),
                             dtype=jnp.dtype(dtype), **kwargs)


def init(model, key: jax.Array, image_shape: tuple[int, int, int]) -> dict:
  """Variables ({"params", "batch_stats"}) for `model`, from a batch of one image."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32)
  params_key, gumbel_key = jax.random.split(key)
  variables = model.init({"params": params_key, "gumbel": gumbel_key}, x, labels, train=False)
  # init also returns what was sown (features, intermediates): keep the model's state only.
  return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def insertion_points(arch: str, **kwargs) -> tuple[str, ...]:
  """Names of the places where a defense can sit in `arch`."""
  return create(arch, num_classes=10, **kwargs).insertion_points()


__all__ = ["ARCHITECTURES", "ModelOutput", "check_images", "check_labels", "create", "init",
           "insertion_points"]


def from_config(config, num_classes: int, dtype: str | None = None):
  """The config's model; `dtype` overrides its compute dtype (the parameters stay float32)."""
  return create(config.model.arch, num_classes=num_classes,
                       defense=defenses.from_config(config), dtype=dtype or config.model.dtype,
                       **config.model.kwargs.to_dict())
