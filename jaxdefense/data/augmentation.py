"""On-device augmentation: uint8 batches become float32 images in [0, 1] on the device,
through `to_float` or `augment(key, images, **augmentation_for(name))`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UINT8_TO_FLOAT = np.arange(256, dtype=np.float32) / 255


def to_float(images: jax.Array | np.ndarray) -> jax.Array:
  """float32 images in [0, 1]: uint8 ones divided by 255 (correctly rounded, as numpy's
  `x / 255`; XLA's division is not), floating ones only cast."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return jnp.asarray(_UINT8_TO_FLOAT)[images]
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be uint8 in [0, 255] or floating point in [0, 1]; got dtype "
                    f"{images.dtype}")
  return images.astype(jnp.float32)


def augmentation_params(key: jax.Array, num: int, *, pad: int = 4,
                        flip: bool = True) -> tuple[jax.Array, jax.Array]:
  """The random choices of `augment`: crop offsets (num, 2) as (row, column) into the padded
  image, each in [0, 2 * pad], and flip flags (num,), all False unless `flip`."""
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (num, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (num,)) if flip else jnp.zeros(num, bool)
  return offsets, flips


def augment(key: jax.Array, images: jax.Array | np.ndarray, *, pad: int = 4,
            flip: bool = True) -> jax.Array:
  """Per-example random crop after `pad` pixels of zero padding, then a random horizontal
  flip of half the examples; float32 NHWC in [0, 1] (see `to_float`). Traceable under jit
  with `pad` and `flip` static; pad=0, flip=False is `to_float`."""
  if pad < 0:
    raise ValueError(f"pad must be non-negative; got {pad}")
  images = to_float(images)
  num, height, width, channels = images.shape
  offsets, flips = augmentation_params(key, num, pad=pad, flip=flip)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


AUGMENTATIONS = {
    "cifar10": {"pad": 4, "flip": True},
    "cifar100": {"pad": 4, "flip": True},
    "svhn": {"pad": 0, "flip": False},
    # A one-pixel shift only; no flips, since digits are not mirror-symmetric.
    "digits": {"pad": 1, "flip": False},
    "synthetic": {"pad": 0, "flip": False},
}


def augmentation_for(name: str) -> dict[str, Any]:
  """The keyword arguments of `augment` for data set `name`, as the authors train:
  CIFAR 4-pixel pad, crop and flip; SVHN none. Use `augment(key, x, **augmentation_for(name))`."""
  if name not in AUGMENTATIONS:
    raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(AUGMENTATIONS)}")
  return dict(AUGMENTATIONS[name])
