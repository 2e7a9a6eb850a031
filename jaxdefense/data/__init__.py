"""Data: the data sets, read once into host memory (`datasets.py`); on-device augmentation
(`augmentation.py`); the training batches' plan and the evaluation's batches
(`batching.py`). Extra (generated) data: checking and reading the files (`sources.py`), the
prepared format's writer (`writer.py`), a bucket's concurrent range reads (`remote.py`) and
local copy (`cache.py`), the read-ahead (`read_ahead.py`), and the commands
`python -m jaxdefense.data.prepare` and `python -m jaxdefense.data.demo_extra`.

Models take float32 images in [0, 1]: batches stay uint8 on the host and become float on
the device through `to_float` or `augment(key, images, **augmentation_for(name))`. The names
most callers need are here: `data.load(...)`, `data.to_float`, `data.eval_batches` ...
"""
from jaxdefense.data.augmentation import (AUGMENTATIONS, augment, augmentation_for,
                                          augmentation_params, to_float)
from jaxdefense.data.batching import (EPOCH_STEPS, epoch_permutation, eval_batches,
                                      num_eval_batches, steps_per_epoch)
from jaxdefense.data.datasets import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                      DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, MEAN_STD, NAMES,
                                      NUM_CLASSES, SPLIT_SIZES, SYNTHETIC_SIZES, TFDS_NAMES,
                                      Dataset, DatasetNotFoundError, check_options, digits,
                                      from_config, from_tfds, image_shape, load, subset,
                                      synthetic)

__all__ = [
    "AUGMENTATIONS", "augment", "augmentation_for", "augmentation_params", "to_float",
    "EPOCH_STEPS", "epoch_permutation", "eval_batches", "num_eval_batches", "steps_per_epoch",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE", "MEAN_STD", "NAMES", "NUM_CLASSES", "SPLIT_SIZES", "SYNTHETIC_SIZES",
    "TFDS_NAMES", "Dataset", "DatasetNotFoundError", "check_options", "digits", "from_config",
    "from_tfds", "image_shape", "load", "subset", "synthetic",
]
