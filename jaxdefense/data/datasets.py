"""The data sets, read once into host memory: uint8 NHWC images and int32 labels.

`load(name)` gives a `Dataset`:

- `cifar10`, `cifar100`, `svhn` (TFDS `svhn_cropped`; train = `train`, not `extra`) are read
  through tensorflow-datasets' array_record data sources, without TensorFlow and without ever
  downloading: a data set that is not prepared in `data_dir` raises `DatasetNotFoundError`
  saying how to provide it.
- `digits` is scikit-learn's 1797 handwritten 8x8 digits, bundled with scikit-learn, so it
  runs anywhere; its train/test split is fixed.
- `synthetic` is seeded random images and labels, for benchmarks and shape tests.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxdefense import errors

NAMES = ("cifar10", "cifar100", "svhn", "digits", "synthetic")
TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "digits": 10, "synthetic": 10}
# (train, test) points of each data set with fixed splits (synthetic's are its options).
SPLIT_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032),
               "digits": (1437, 360)}
SYNTHETIC_SIZES = (1024, 256)  # synthetic's (train, test) points unless num_train / num_test.
DIGITS_TEST_SIZE = SPLIT_SIZES["digits"][1]
DIGITS_SPLIT_SEED = 0
_READ_CHUNK = 1024
# The per-channel mean and std of CIFAR's training pixels in [0, 1], which RobustBench's
# DMWideResNet subtracts and divides by inside the model.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# By data set, as the DeepMind-style WRNs normalise inside the model (input_mean, input_std).
MEAN_STD = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


class DatasetNotFoundError(errors.DataError):
  """A TFDS data set is not prepared (as array_record) in the data directory."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Train and test splits in host memory: images uint8 (N, H, W, C), labels int32 (N,).

  The arrays are made read-only; batches drawn from them are copies.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray

  def __post_init__(self):
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.shape[1:] != tuple(self.image_shape):
        raise ValueError(f"{self.name} {split} images must be uint8 of shape (N, "
                         f"{', '.join(map(str, self.image_shape))}); got {images.dtype} "
                         f"{images.shape}")
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(f"{self.name} {split} labels must be int32 of shape "
                         f"({images.shape[0]},); got {labels.dtype} {labels.shape}")
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(f"{self.name} {split} labels must lie in [0, {self.num_classes}); "
                         f"got [{labels.min()}, {labels.max()}]")
      images.setflags(write=False)
      labels.setflags(write=False)


def load(name: str, *, data_dir: str | os.PathLike | None = None, num_train: int | None = None,
         num_test: int | None = None, image_size: int | None = None,
         channels: int | None = None, num_classes: int | None = None,
         seed: int = 0) -> Dataset:
  """Reads data set `name` (one of `NAMES`) into host memory.

  Args:
    name: `cifar10`, `cifar100`, `svhn`, `digits` or `synthetic`.
    data_dir: TFDS data directory holding the prepared TFDS data sets (default: TFDS's own,
      `$TFDS_DATA_DIR` or `~/tensorflow_datasets`). TFDS data sets only.
    num_train, num_test: keep only the first that many points of each split (synthetic:
      the split sizes, default 1024 and 256).
    image_size: side of the square images: digits are upsampled (nearest neighbour) from
      8x8 by an integer factor, so a multiple of 8, default 16; synthetic default 32. For
      the TFDS data sets only their native 32 is accepted.
    channels: synthetic only (default 3); elsewhere only the native count is accepted.
    num_classes: synthetic only (default 10); elsewhere only the native count is accepted.
    seed: synthetic only, the seed of its images and labels.
  """
  check_options(name, data_dir=data_dir, num_train=num_train, num_test=num_test,
                image_size=image_size)
  if name == "synthetic":
    dataset = synthetic(num_train=SYNTHETIC_SIZES[0] if num_train is None else num_train,
                        num_test=SYNTHETIC_SIZES[1] if num_test is None else num_test,
                        image_size=32 if image_size is None else image_size,
                        channels=3 if channels is None else channels,
                        num_classes=10 if num_classes is None else num_classes, seed=seed)
  elif name == "digits":
    _check_native(name, "channels", channels, 1)
    _check_native(name, "num_classes", num_classes, 10)
    dataset = digits(image_size=16 if image_size is None else image_size)
  else:
    _check_native(name, "channels", channels, 3)
    _check_native(name, "num_classes", num_classes, 100 if name == "cifar100" else 10)
    return from_tfds(name, data_dir=data_dir, num_train=num_train, num_test=num_test)
  return subset(dataset, num_train=num_train, num_test=num_test)


def check_options(name: str, *, data_dir: str | os.PathLike | None = None,
                  num_train: int | None = None, num_test: int | None = None,
                  image_size: int | None = None) -> None:
  """ValueError naming the option, its value and what is allowed, for options `load`
  cannot honour (checked before anything is read)."""
  if name not in NAMES:
    raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(NAMES)}")
  if data_dir is not None and name not in TFDS_NAMES:
    raise ValueError(f"data_dir applies to the TFDS data sets ({', '.join(TFDS_NAMES)}), "
                     f"not to {name!r}; got {os.fspath(data_dir)!r}")
  if name in TFDS_NAMES:
    _check_native(name, "image_size", image_size, 32)
  elif name == "digits" and image_size is not None and (image_size <= 0 or image_size % 8):
    raise ValueError(f"digits image_size must be a positive multiple of 8 (8x8 originals "
                     f"upsampled by an integer factor); got {image_size}")
  sizes = SPLIT_SIZES.get(name, (None, None))
  for option, value, available in (("num_train", num_train, sizes[0]),
                                   ("num_test", num_test, sizes[1])):
    if value is not None and (value < 1 or (available is not None and value > available)):
      allowed = f"[1, {available}] (the split's size)" if available else ">= 1"
      raise ValueError(f"{option} must lie in {allowed}; got {value}")


def image_shape(name: str, image_size: int | None = None) -> tuple[int, int, int]:
  """The (H, W, C) of data set `name`'s images, without reading it (`load`'s defaults)."""
  if name == "digits":
    return (image_size or 16, image_size or 16, 1)
  if name == "synthetic":
    return (image_size or 32, image_size or 32, 3)
  return (32, 32, 3)


def _check_native(name: str, option: str, value: int | None, native: int) -> None:
  if value is not None and value != native:
    raise ValueError(f"{option}={value} is not available for {name!r}: its {option} is "
                     f"{native} (a free {option} is for 'synthetic' only)")


def _check_count(what: str, value: int | None, available: int) -> None:
  if value is not None and not 0 < value <= available:
    raise ValueError(f"{what} must lie in [1, {available}] (the split's size); got {value}")


def subset(dataset: Dataset, *, num_train: int | None = None,
           num_test: int | None = None) -> Dataset:
  """The first `num_train` training and `num_test` test points (None keeps a whole split)."""
  _check_count("num_train", num_train, len(dataset.train_labels))
  _check_count("num_test", num_test, len(dataset.test_labels))
  return dataclasses.replace(
      dataset, train_images=dataset.train_images[:num_train],
      train_labels=dataset.train_labels[:num_train],
      test_images=dataset.test_images[:num_test], test_labels=dataset.test_labels[:num_test])


def _not_prepared_error(name: str, builder: tfds.core.DatasetBuilder) -> DatasetNotFoundError:
  tfds_name = TFDS_NAMES[name]
  root = os.fspath(builder.data_dir_root)
  build = f"tfds build {tfds_name} --data_dir=DIR --file_format=array_record"
  provide = (f"Prepare it on a machine with internet access and TensorFlow (which the tfds "
             f"command needs): `{build}`; then copy DIR here and pass it with "
             f"--config.data.data_dir=DIR (load(..., data_dir=DIR)).")
  if builder.is_prepared():
    return DatasetNotFoundError(
        f"data set {name!r} (TFDS {tfds_name!r}) is prepared in {os.fspath(builder.data_dir)} "
        f"in the {builder.info.file_format.value} format, which only TensorFlow reads; this "
        f"library reads array_record. {provide}")
  return DatasetNotFoundError(
      f"data set {name!r} (TFDS {tfds_name!r}) is not prepared in data_dir {root} (looked for "
      f"{os.fspath(builder.data_dir)}), and nothing is downloaded here. {provide}")


def _read_records(source: Any, keys: list[int]) -> Sequence[dict[str, Any]]:
  try:
    return source.__getitems__(keys)
  except TypeError:
    # tfds.testing.mock_data installs an unbound `__getitems__` on its fake reader, so a
    # batched read raises TypeError there; read one index at a time instead.
    return [source[k] for k in keys]


def _index_in_split(record_id: Any) -> int | None:
  """The original index in a TFDS `id` such as b"test_00042" (CIFAR's ids count the
  source files' images in order, as torchvision reads them); None if it has none."""
  text = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
  match = re.search(r"(\d+)$", text)
  return int(match.group(1)) if match else None


def _read_split(source: Any, count: int,
                image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` points of a split of an array_record data source, in canonical order,
  as (uint8 images, int32 labels).

  TFDS shuffles records when it builds a data set, so record order is not the original
  one. Where records carry an `id` with the original index (CIFAR-10/100), every record
  is read and sorted by it, so that "the first N test points" are torchvision's and
  RobustBench's first N. Otherwise (SVHN has no id; ids of tfds's mock data hold no index)
  the record order is kept."""
  total = len(source)
  images = np.empty((total, *image_shape), np.uint8)
  labels = np.empty(total, np.int32)
  indices: list[int | None] = []
  for start in range(0, total, _READ_CHUNK):
    records = _read_records(source, list(range(start, min(total, start + _READ_CHUNK))))
    for i, record in enumerate(records, start):
      images[i] = record["image"]
      labels[i] = record["label"]
      indices.append(_index_in_split(record["id"]) if "id" in record else None)
  order = np.arange(total)
  if None not in indices and len(set(indices)) == total:
    order = np.argsort(np.asarray(indices), kind="stable")
  keep = order[:count]
  return images[keep], labels[keep]


def from_tfds(name: str, *, data_dir: str | os.PathLike | None = None,
              num_train: int | None = None, num_test: int | None = None) -> Dataset:
  """Reads `cifar10`, `cifar100` or `svhn` from TFDS array_record files, never downloading."""
  if name not in TFDS_NAMES:
    raise ValueError(f"unknown TFDS data set {name!r}; allowed: {', '.join(TFDS_NAMES)}")
  builder = tfds.builder(TFDS_NAMES[name], data_dir=data_dir)
  # For a set never prepared here tfds raises NotImplementedError (no array_record files
  # to serve) or ValueError (no prepared version in data_dir): both mean the same to us.
  try:
    sources = {split: builder.as_data_source(split=split) for split in ("train", "test")}
  except (NotImplementedError, ValueError) as e:
    raise _not_prepared_error(name, builder) from e
  _check_count("num_train", num_train, len(sources["train"]))
  _check_count("num_test", num_test, len(sources["test"]))
  features = builder.info.features
  image_shape = tuple(features["image"].shape)
  train_images, train_labels = _read_split(sources["train"], num_train or len(sources["train"]),
                                           image_shape)
  test_images, test_labels = _read_split(sources["test"], num_test or len(sources["test"]),
                                         image_shape)
  return Dataset(name=name, num_classes=features["label"].num_classes, image_shape=image_shape,
                 train_images=train_images, train_labels=train_labels, test_images=test_images,
                 test_labels=test_labels)


def _stratified_split(labels: np.ndarray, test_size: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, test) indices with each class's share of the test set as even as possible.

  Class quotas by largest remainder (ties to the smaller class), members drawn with numpy's
  legacy `RandomState`, whose streams numpy keeps fixed across versions and platforms.
  """
  counts = np.bincount(labels)
  exact = counts * test_size / len(labels)
  quotas = np.floor(exact).astype(int)
  by_remainder = np.argsort(-(exact - quotas), kind="stable")
  quotas[by_remainder[:test_size - quotas.sum()]] += 1
  rng = np.random.RandomState(seed)
  test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q]
                         for c, q in enumerate(quotas)])
  is_test = np.zeros(len(labels), bool)
  is_test[test] = True
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def digits(*, image_size: int = 16) -> Dataset:
  """scikit-learn's handwritten digits: 1437 train / 360 test, a fixed stratified split.

  Values 0..16 become round(v * 255 / 16) in uint8. 16x16 (the default) leaves small conv
  nets two downsamplings of room; VGG-16's five poolings need image_size=32.
  """
  from sklearn.datasets import load_digits  # Deferred: half a second of imports.

  if image_size <= 0 or image_size % 8:
    raise ValueError(f"digits image_size must be a positive multiple of 8 (8x8 originals "
                     f"upsampled by an integer factor); got {image_size}")
  raw = load_digits()
  images = np.rint(raw.images * (255 / 16)).astype(np.uint8)[..., None]
  factor = image_size // 8
  images = images.repeat(factor, axis=1).repeat(factor, axis=2)
  labels = raw.target.astype(np.int32)
  train, test = _stratified_split(labels, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
  return Dataset(name="digits", num_classes=10, image_shape=(image_size, image_size, 1),
                 train_images=images[train], train_labels=labels[train],
                 test_images=images[test], test_labels=labels[test])


def synthetic(*, num_train: int = SYNTHETIC_SIZES[0], num_test: int = SYNTHETIC_SIZES[1],
              image_size: int = 32, channels: int = 3, num_classes: int = 10,
              seed: int = 0) -> Dataset:
  """Uniform random uint8 images and labels, the same for the same arguments."""
  for option, value in (("num_train", num_train), ("num_test", num_test),
                        ("image_size", image_size), ("channels", channels),
                        ("num_classes", num_classes)):
    if value <= 0:
      raise ValueError(f"synthetic {option} must be positive; got {value}")
  rng = np.random.default_rng(seed)
  shape = (image_size, image_size, channels)
  splits = [(rng.integers(0, 256, (n, *shape), np.uint8),
             rng.integers(0, num_classes, n).astype(np.int32)) for n in (num_train, num_test)]
  return Dataset(name="synthetic", num_classes=num_classes, image_shape=shape,
                 train_images=splits[0][0], train_labels=splits[0][1],
                 test_images=splits[1][0], test_labels=splits[1][1])


def from_config(config) -> Dataset:
  """The data set of `config.data` (name, data_dir, num_train, num_test, image_size)."""
  d = config.data
  return load(d.name, data_dir=d.data_dir, num_train=d.num_train, num_test=d.num_test,
              image_size=d.image_size)
