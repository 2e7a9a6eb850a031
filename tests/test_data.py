"""Data: TFDS reading (under `tfds.testing.mock_data`, and from a small array_record data set
prepared here), the error for a missing data set, digits' fixed split, synthetic data, the
augmentation against a numpy re-derivation, and deterministic, resumable, sharded batches."""
import hashlib
import io
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdefense import data
from jaxdefense.data import batching, datasets

TFDS_CASES = [("cifar10", "cifar10", 10), ("cifar100", "cifar100", 100),
              ("svhn", "svhn_cropped", 10)]
# The first 16 hex digits of sha256(test images + test labels) of digits at 8x8.
DIGITS_TEST_SHA256_PREFIX = "cfc0bc3fcbee73c0"


@pytest.mark.parametrize("name,tfds_name,num_classes", TFDS_CASES)
def test_tfds_under_mock(monkeypatch, name, tfds_name, num_classes):
  requested = []
  # The spy is undone before the mock's own patches are.
  with tfds.testing.mock_data(num_examples=12), monkeypatch.context() as patch:
    mocked = tfds.core.DatasetBuilder.as_data_source

    def spy(builder, split=None, **kwargs):
      requested.append((builder.name, split))
      return mocked(builder, split=split, **kwargs)

    patch.setattr(tfds.core.DatasetBuilder, "as_data_source", spy)
    ds = data.load(name)
    small = data.load(name, num_train=5, num_test=3)
  assert sorted(set(requested)) == [(tfds_name, "test"), (tfds_name, "train")]
  assert (ds.name, ds.num_classes, ds.image_shape) == (name, num_classes, (32, 32, 3))
  for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int32
    assert 0 <= labels.min() and labels.max() < num_classes
  assert small.train_images.shape == (5, 32, 32, 3) and small.test_labels.shape == (3,)
  np.testing.assert_array_equal(small.train_images, ds.train_images[:5])


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_tfds_prepared_array_record(tmp_path, monkeypatch):
  """A real (non-mock) array_record `cifar10`, written without TensorFlow, reads back exactly
  through the batched path, across several read chunks, in the original (canonical) order
  that TFDS's shuffle lost: record ids `test_00000`, ... hold it, as in TFDS's CIFAR."""
  from tensorflow_datasets.image_classification import cifar

  rng = np.random.default_rng(0)
  originals = {"train": (rng.integers(0, 256, (40, 32, 32, 3), np.uint8), rng.integers(0, 10, 40)),
               "test": (rng.integers(0, 256, (9, 32, 32, 3), np.uint8), rng.integers(0, 10, 9))}
  for images, _ in originals.values():
    images[:, 0, 0, 0] = np.arange(len(images))  # Identifies each point after TFDS's shuffle.

  with tfds.core.registered.skip_registration():
    class FakeCifar10(cifar.Cifar10):
      name = "cifar10"

      def _split_generators(self, dl_manager):
        return {split: self._examples(split) for split in originals}

      def _examples(self, split):
        images, labels = originals[split]
        for i in range(len(labels)):
          yield i, {"id": f"{split}_{i:05d}", "image": _png(images[i]),
                    "label": int(labels[i])}

  FakeCifar10(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  monkeypatch.setattr(datasets, "_READ_CHUNK", 16)
  ds = data.load("cifar10", data_dir=tmp_path)
  for split in originals:
    images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
    np.testing.assert_array_equal(images, originals[split][0])
    np.testing.assert_array_equal(labels, originals[split][1])
    assert labels.dtype == np.int32
  source = tfds.builder("cifar10", data_dir=tmp_path).as_data_source(split="test")
  assert [int(source[i]["image"][0, 0, 0]) for i in range(9)] != list(range(9))  # Shuffled.
  first = data.load("cifar10", data_dir=tmp_path, num_train=17, num_test=4)
  np.testing.assert_array_equal(first.train_images, originals["train"][0][:17])
  np.testing.assert_array_equal(first.test_labels, originals["test"][1][:4])

  # The same data set as TensorFlow's tfrecord: prepared, but not readable here.
  info = next(tmp_path.glob("cifar10/*/dataset_info.json"))
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(data.DatasetNotFoundError,
                     match="in the tfrecord format.*--file_format=array_record"):
    data.load("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("name,tfds_name", [("cifar10", "cifar10"), ("svhn", "svhn_cropped")])
def test_missing_tfds_data_set(tmp_path, name, tfds_name):
  start = time.time()
  with pytest.raises(data.DatasetNotFoundError) as raised:
    data.load(name, data_dir=tmp_path)
  assert time.time() - start < 10  # No download attempt.
  message = str(raised.value)
  for part in (repr(name), str(tmp_path), f"tfds build {tfds_name} --data_dir=DIR",
               "--file_format=array_record", "--config.data.data_dir=DIR"):
    assert part in message
  assert isinstance(raised.value, ValueError)


def test_bad_names_and_options():
  with pytest.raises(ValueError, match="unknown data set 'mnist'; allowed: cifar10, cifar100"):
    data.load("mnist")
  with pytest.raises(ValueError, match="image_size=16 is not available for 'cifar10'"):
    data.load("cifar10", image_size=16)
  with pytest.raises(ValueError, match="num_classes=10 is not available for 'cifar100'"):
    data.load("cifar100", num_classes=10)
  with pytest.raises(ValueError, match="data_dir applies to the TFDS data sets"):
    data.load("digits", data_dir="/tmp")
  with pytest.raises(ValueError, match="multiple of 8.*got 12"):
    data.load("digits", image_size=12)
  with pytest.raises(ValueError, match=r"num_train must lie in \[1, 1437\].*got 2000"):
    data.load("digits", num_train=2000)
  with pytest.raises(ValueError, match="unknown data set 'mnist'"):
    data.augmentation_for("mnist")


def test_digits_fixed_stratified_split():
  from sklearn.datasets import load_digits
  ds = data.load("digits", image_size=8)
  again = data.load("digits", image_size=8)
  assert (ds.num_classes, ds.image_shape) == (10, (8, 8, 1))
  assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
  for a, b in ((ds.train_images, again.train_images), (ds.test_labels, again.test_labels)):
    np.testing.assert_array_equal(a, b)
  # The split never changes, on any machine or numpy version.
  digest = hashlib.sha256(ds.test_images.tobytes() + ds.test_labels.tobytes()).hexdigest()
  assert digest[:16] == DIGITS_TEST_SHA256_PREFIX

  raw = load_digits()
  expected = np.rint(raw.images * 255 / 16).astype(np.uint8)[..., None]
  points = lambda images, labels: sorted(zip(map(bytes, images), labels.tolist()))
  union = points(np.concatenate([ds.train_images, ds.test_images]),
                 np.concatenate([ds.train_labels, ds.test_labels]))
  assert union == points(expected, raw.target)  # A partition of the 1797 points.
  assert set(np.unique(ds.train_images)) <= {round(v * 255 / 16) for v in range(17)}
  share = np.bincount(ds.test_labels, minlength=10) / np.bincount(raw.target)
  assert np.all(np.abs(share - 360 / 1797) < 0.01)

  big = data.load("digits")
  assert big.image_shape == (16, 16, 1) and big.train_images.dtype == np.uint8
  np.testing.assert_array_equal(big.test_images, ds.test_images.repeat(2, 1).repeat(2, 2))
  np.testing.assert_array_equal(big.test_labels, ds.test_labels)
  assert data.load("digits", num_test=50).test_labels.shape == (50,)


def test_synthetic():
  ds = data.load("synthetic", num_train=20, num_test=7, image_size=12, channels=2,
                 num_classes=5, seed=3)
  assert ds.train_images.shape == (20, 12, 12, 2) and ds.test_images.shape == (7, 12, 12, 2)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.num_classes == 5 and ds.train_labels.max() < 5 and ds.image_shape == (12, 12, 2)
  same = data.load("synthetic", num_train=20, num_test=7, image_size=12, channels=2,
                   num_classes=5, seed=3)
  other = data.load("synthetic", num_train=20, num_test=7, image_size=12, channels=2,
                    num_classes=5, seed=4)
  np.testing.assert_array_equal(ds.train_images, same.train_images)
  assert not np.array_equal(ds.train_images, other.train_images)
  default = data.load("synthetic")
  assert default.train_images.shape == (1024, 32, 32, 3) and default.num_classes == 10


def test_dataset_checks_and_read_only():
  ds = data.load("synthetic", num_train=4, num_test=4)
  with pytest.raises(ValueError, match="read-only"):
    ds.train_images[0, 0, 0, 0] = 1
  with pytest.raises(ValueError, match="labels must be int32"):
    data.Dataset("x", 10, (32, 32, 3), ds.train_images, ds.train_labels.astype(np.int64),
                 ds.test_images, ds.test_labels)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    data.Dataset("x", 2, (32, 32, 3), ds.train_images, np.full(4, 7, np.int32),
                 ds.test_images, ds.test_labels)


def _images(n: int = 64, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(1, 256, (n, 8, 8, 3), np.uint8)


def test_to_float_and_identity_augmentation():
  x = _images()
  np.testing.assert_array_equal(data.to_float(x), x.astype(np.float32) / 255)
  same = data.augment(jax.random.key(0), x, pad=0, flip=False)
  assert same.dtype == jnp.float32
  np.testing.assert_array_equal(same, x.astype(np.float32) / 255)
  floats = x.astype(np.float32) / 255
  np.testing.assert_array_equal(data.to_float(floats), floats)


def test_augment_matches_numpy_crop_and_flip():
  x = _images()
  key = jax.random.key(7)
  augment = jax.jit(data.augment, static_argnames=("pad", "flip"))
  out = np.asarray(augment(key, x, pad=2, flip=True))
  assert out.shape == x.shape and out.dtype == np.float32
  assert 0 <= out.min() and out.max() <= 1
  offsets, flips = map(np.asarray, data.augmentation_params(key, len(x), pad=2, flip=True))
  assert offsets.min() >= 0 and offsets.max() <= 4 and len(np.unique(offsets[:, 0])) == 5
  padded = np.pad(x.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i, ((row, col), flipped) in enumerate(zip(offsets, flips)):
    expected = padded[i, row:row + 8, col:col + 8]
    np.testing.assert_array_equal(out[i], expected[:, ::-1] if flipped else expected)
  # Images have no zero pixel, so the zeros are the padding: |offset - pad| rows and columns.
  rows, cols = np.abs(offsets[:, 0] - 2), np.abs(offsets[:, 1] - 2)
  np.testing.assert_array_equal(np.sum(out == 0, axis=(1, 2, 3)),
                                3 * (8 * rows + 8 * cols - rows * cols))


def test_flips_about_half_and_policies():
  x = _images(2000)
  out = np.asarray(data.augment(jax.random.key(1), x, pad=0, flip=True))
  flipped = np.all(out == (x[:, :, ::-1] / np.float32(255)), axis=(1, 2, 3))
  kept = np.all(out == (x / np.float32(255)), axis=(1, 2, 3))
  assert np.all(flipped ^ kept)
  assert 0.45 < flipped.mean() < 0.55
  assert data.augmentation_for("cifar10") == {"pad": 4, "flip": True}
  assert data.augmentation_for("cifar100") == {"pad": 4, "flip": True}
  assert data.augmentation_for("svhn") == {"pad": 0, "flip": False}
  assert data.augmentation_for("synthetic") == {"pad": 0, "flip": False}
  assert data.augmentation_for("digits") == {"pad": 1, "flip": False}
  x = _images(4)
  np.testing.assert_array_equal(
      data.augment(jax.random.key(2), x, **data.augmentation_for("svhn")), data.to_float(x))
  cifar = data.augment(jax.random.key(3), np.full((2, 32, 32, 3), 255, np.uint8),
                       **data.augmentation_for("cifar10"))
  assert cifar.shape == (2, 32, 32, 3) and cifar.dtype == jnp.float32


def _indexed(n: int) -> data.Dataset:
  """A data set whose labels are the point indices."""
  images = np.zeros((n, 2, 2, 1), np.uint8)
  labels = np.arange(n, dtype=np.int32)
  return data.Dataset("indexed", n, (2, 2, 1), images, labels, images[:3], labels[:3])


def _labels(ds: data.Dataset, batch_size: int, *, seed: int, start_step: int, num_steps: int,
            **kwargs) -> list[np.ndarray]:
  """The labels of `batching.batches` without extra data (the indices, for `_indexed`)."""
  return [b["labels"] for b in batching.batches(ds, None, seed=seed, start_step=start_step,
                                                num_steps=num_steps, batch_size=batch_size,
                                                **kwargs)]


def _real_only_order(num: int, batch_size: int, *, seed: int, steps: range,
                     process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """The real-only batches' indices as the former `data.train_batches` drew them, in NumPy:
  step t is batch t mod S (S = num div B, the remainder dropped) of epoch t div S, whose
  order is RandomState(PCG64([seed, epoch])).permutation(num); process p of P takes the
  p-th of P contiguous slices of it."""
  per_epoch, local = num // batch_size, batch_size // process_count
  indices = []
  for step in steps:
    epoch, within = divmod(step, per_epoch)
    order = np.random.RandomState(np.random.PCG64([seed, epoch])).permutation(num)
    batch = order[within * batch_size:(within + 1) * batch_size]
    indices.append(batch[process_index * local:(process_index + 1) * local])
  return indices


@pytest.mark.parametrize("num,batch_size,seed,process_count", [
    (103, 10, 5, 1), (50, 12, 1, 4), (1437, 64, 0, 1), (1437, 64, 3, 2)])
def test_the_plan_without_extra_data_is_the_former_real_only_order(num, batch_size, seed,
                                                                  process_count):
  """Without extra data the plan's batches are, index for index, the epochs' seeded
  permutations cut into full batches (the order the quick start's numbers and existing
  workdirs were trained in), for each process; the batches carry no extra image."""
  ds = _indexed(num)
  steps = range(3 * (num // batch_size) + 2)
  for p in range(process_count):
    expected = _real_only_order(num, batch_size, seed=seed, steps=steps, process_index=p,
                                process_count=process_count)
    got = list(batching.batches(ds, None, seed=seed, start_step=0, num_steps=len(steps),
                                batch_size=batch_size, process_index=p,
                                process_count=process_count, buffer_batches=2))
    assert len(got) == len(expected)
    for batch, indices in zip(got, expected):
      np.testing.assert_array_equal(batch["labels"], indices)
      assert batch["labels"].dtype == np.int32 and not batch["is_extra"].any()
    resumed = _labels(ds, batch_size, seed=seed, start_step=7, num_steps=4, process_index=p,
                      process_count=process_count)
    for labels, indices in zip(resumed, expected[7:11], strict=True):
      np.testing.assert_array_equal(labels, indices)


def test_real_only_batches_are_deterministic_once_per_epoch_and_resumable():
  ds = _indexed(103)
  assert data.steps_per_epoch(103, 10) == 10
  assert data.steps_per_epoch(103, 10, epoch_steps="batch") == 10  # Counts extra data only.
  batches = _labels(ds, 10, seed=5, start_step=20, num_steps=10)  # Epoch 2.
  assert all(b.shape == (10,) and b.dtype == np.int32 for b in batches)
  seen = np.concatenate(batches)
  assert len(np.unique(seen)) == 100
  again = _labels(ds, 10, seed=5, start_step=20, num_steps=10)
  np.testing.assert_array_equal(np.concatenate(again), seen)
  for seed, start in ((5, 30), (6, 20)):
    other_seen = np.concatenate(_labels(ds, 10, seed=seed, start_step=start, num_steps=10))
    assert not np.array_equal(other_seen, seen)
  resumed = _labels(ds, 10, seed=5, start_step=27, num_steps=3)
  assert len(resumed) == 3
  for a, b in zip(resumed, batches[7:]):
    np.testing.assert_array_equal(a, b)
  assert _labels(ds, 10, seed=5, start_step=30, num_steps=0) == []
  batch = next(batching.batches(data.load("synthetic", num_train=8, num_test=1), None, seed=0,
                                start_step=0, num_steps=1, batch_size=4))
  assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.uint8


def test_real_only_batches_process_shards():
  ds = _indexed(50)
  global_batches = _labels(ds, 12, seed=1, start_step=0, num_steps=4)
  shards = [_labels(ds, 12, seed=1, start_step=0, num_steps=4, process_index=p,
                    process_count=4) for p in range(4)]
  for step, full in enumerate(global_batches):
    parts = [shards[p][step] for p in range(4)]
    assert all(part.shape == (3,) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(ValueError, match="batch_size=12 must be a multiple of process_count=5"):
    _labels(ds, 12, seed=1, start_step=0, num_steps=4, process_index=0, process_count=5)
  with pytest.raises(ValueError, match="process_index must lie in"):
    _labels(ds, 12, seed=1, start_step=0, num_steps=4, process_index=4, process_count=4)
  with pytest.raises(ValueError, match="num_steps and start_step must be >= 0; got 4, -1"):
    _labels(ds, 12, seed=1, start_step=-1, num_steps=4)
  with pytest.raises(ValueError, match="64 real images per batch exceed the 50 real"):
    _labels(ds, 64, seed=1, start_step=0, num_steps=1)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_point_once(process_count):
  labels = np.arange(103, dtype=np.int32)
  images = np.random.default_rng(0).integers(0, 256, (103, 4, 4, 3), np.uint8)
  seen_labels, seen_images = [], []
  for p in range(process_count):
    batches = list(data.eval_batches(images, labels, 10, process_index=p,
                                     process_count=process_count))
    assert len(batches) == data.num_eval_batches(103, 10) == 11
    for x, y, mask in batches:
      assert x.shape == (10 // process_count, 4, 4, 3) and x.dtype == np.uint8
      assert y.shape == mask.shape == (10 // process_count,) and mask.dtype == bool
      assert np.all(x[~mask] == 0) and np.all(y[~mask] == 0)
      seen_labels.append(y[mask])
      seen_images.append(x[mask])
  seen = np.concatenate(seen_labels)
  np.testing.assert_array_equal(np.sort(seen), labels)
  np.testing.assert_array_equal(np.concatenate(seen_images)[np.argsort(seen)], images)
