"""Extra data in a real bucket (fake-gcs-server on loopback, tests/storage_server.py): reads by
index return exactly the local file's images, a batch's reads all in flight at once; the
local copy serves the same images; a missing object or dropped connections are one
DataError naming the file, not a hang; memory stays bounded by the read-ahead."""
import os
import time
import tracemalloc
import types

import fsspec
import numpy as np
import pytest

from jaxdefense import data, errors
from jaxdefense.data import batching, cache, remote, sources, writer
from tests import latency_proxy, storage_server

SHAPE = (8, 8, 3)
NUM = 600
BUCKET = f"gs://{storage_server.BUCKET}"


def _use(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
  """gcsfs (hence epath's gs://) talks to `url` from now on."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  fsspec.get_filesystem_class("gcs").clear_instance_cache()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """(server URL, images, labels, local .npz): the .npz and its prepared directory (shards of
  250) in the bucket as extra.npz and prepared/."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM, *SHAPE), np.uint8)
  labels = rng.integers(0, 10, NUM)
  local = tmp_path_factory.mktemp("bucket") / "extra.npz"
  np.savez(local, image=images, label=labels)
  with storage_server.running() as url, pytest.MonkeyPatch.context() as monkeypatch:
    _use(url, monkeypatch)
    fsspec.filesystem("gcs").put_file(os.fspath(local), f"{BUCKET}/extra.npz")
    writer.prepare(f"{BUCKET}/extra.npz", f"{BUCKET}/prepared", shard_images=250)
    yield url, images, labels, os.fspath(local)
  fsspec.get_filesystem_class("gcs").clear_instance_cache()


def _open(patterns, **kwargs) -> sources.ExtraSource:
  return sources.open_sources(patterns, image_shape=SHAPE, num_classes=10, **kwargs)


@pytest.fixture
def counted(monkeypatch) -> list[int]:
  """The number of ranges of each `RangeReader.read` call (the bucket's batched reads)."""
  calls: list[int] = []
  read = remote.RangeReader.read
  monkeypatch.setattr(remote.RangeReader, "read",
                      lambda self, reads: (calls.append(len(reads)), read(self, reads))[1])
  return calls


def test_bucket_reads_are_the_local_files_images_in_one_batch_of_requests(bucket, monkeypatch,
                                                                          counted):
  url, images, labels, local = bucket
  _use(url, monkeypatch)
  order = np.random.default_rng(1).integers(0, 2 * NUM, 300)
  order[:4] = [5, 6, 7, 5]  # A run of consecutive indices and a repeat.
  with _open([f"{BUCKET}/extra.npz", f"{BUCKET}/prep*"]) as source:
    got_images, got_labels = source.read(order)
  assert len(counted) == 1 and counted[0] <= len(np.unique(order))  # All at once.
  both = np.concatenate([images, images])
  np.testing.assert_array_equal(got_images, both[order])
  np.testing.assert_array_equal(got_labels, np.concatenate([labels, labels])[order])
  real = data.synthetic(num_train=40, num_test=1, image_size=8)
  options = dict(seed=3, start_step=5, num_steps=6, batch_size=32, extra_fraction=0.7,
                 buffer_batches=2)
  with _open([f"{BUCKET}/prepared"]) as remote_source, _open([local]) as local_source:
    pairs = zip(batching.batches(real, remote_source, **options),
                batching.batches(real, local_source, **options), strict=True)
    for from_bucket, from_disk in pairs:
      for key in from_disk:
        np.testing.assert_array_equal(from_bucket[key], from_disk[key])


def test_the_local_copy_serves_the_same_images_and_is_reused(bucket, monkeypatch, counted,
                                                             tmp_path):
  """Copied 2 KB at a time: every read while it grows (part disk, part bucket) and after it
  (disk only) gives the same images; a second run reuses the finished copy."""
  url, images, labels, _ = bucket
  _use(url, monkeypatch)
  monkeypatch.setattr(cache, "CHUNK_BYTES", 2048)
  order = np.random.default_rng(2).integers(0, NUM, 200)
  for run in range(2):
    with _open([f"{BUCKET}/prepared"], cache_dir=os.fspath(tmp_path)) as source:
      if run:
        assert source.copied_fraction() == 1  # Recorded by the first run.
      deadline = time.monotonic() + 30
      while source.copied_fraction() < 1 and time.monotonic() < deadline:
        np.testing.assert_array_equal(source.read(order)[0], images[order])
      counted.clear()
      got_images, got_labels = source.read(order)
    assert not counted  # Nothing from the bucket.
    np.testing.assert_array_equal(got_images, images[order])
    np.testing.assert_array_equal(got_labels, labels[order])


def test_a_cache_dir_without_room_is_one_data_error(bucket, monkeypatch, tmp_path):
  url, _, _, _ = bucket
  _use(url, monkeypatch)
  monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10))
  with pytest.raises(errors.DataError, match=f"data.extra_cache_dir={tmp_path}: 0.0 GB free, "
                                             f"the local copy of the extra data needs"):
    _open([f"{BUCKET}/extra.npz"], cache_dir=os.fspath(tmp_path))


def test_a_missing_object_is_one_data_error_naming_it(bucket, monkeypatch, tmp_path):
  url, images, labels, local = bucket
  _use(url, monkeypatch)
  fs = fsspec.filesystem("gcs")
  fs.put_file(local, f"{BUCKET}/gone.npz")
  with _open([f"{BUCKET}/gone.npz"]) as source:
    fs.rm(f"{BUCKET}/gone.npz")
    with pytest.raises(errors.DataError, match=f"^{BUCKET}/gone.npz: missing"):
      source.read(np.arange(10))


def test_dropped_connections_are_one_data_error_naming_the_file(bucket, monkeypatch):
  """Every connection reset: gcsfs retries (its backoff cut to milliseconds here), then one
  DataError; a transient drop is retried and read."""
  url, images, _, _ = bucket
  import gcsfs.retry  # noqa: PLC0415 (after jaxdefense, which sets gcsfs's switches)
  sleep = gcsfs.retry.asyncio.sleep
  monkeypatch.setattr(gcsfs.retry, "asyncio",
                      types.SimpleNamespace(sleep=lambda delay: sleep(delay / 1000)))
  with latency_proxy.running(int(url.rsplit(":", 1)[1])) as (proxy, proxy_url):
    _use(proxy_url, monkeypatch)
    with _open([f"{BUCKET}/extra.npz"]) as source:
      proxy.drop = True
      start = time.monotonic()
      with pytest.raises(errors.DataError, match=f"^{BUCKET}/extra.npz: read failed at offset"):
        source.read(np.arange(0, 100, 3))
      assert time.monotonic() - start < 20
      proxy.drop = False
      np.testing.assert_array_equal(source.read(np.arange(5))[0], images[:5])


def test_bucket_reads_hold_memory_to_the_read_ahead(bucket, monkeypatch, tmp_path):
  """The peak of Python's and numpy's allocations (tracemalloc) streaming 40 batches from the
  bucket, 16 MB of extra images, is that of streaming 8: bounded by the read-ahead and the
  connections, not by what is read."""
  url, _, _, _ = bucket
  _use(url, monkeypatch)
  num, shape = 2000, (32, 32, 3)
  rng = np.random.default_rng(3)
  path = tmp_path / "big.npz"
  np.savez(path, image=rng.integers(0, 256, (num, *shape), np.uint8),
           label=rng.integers(0, 10, num))
  fsspec.filesystem("gcs").put_file(os.fspath(path), f"{BUCKET}/big.npz")
  real = data.synthetic(num_train=256, num_test=1, image_size=32)
  peaks, read = [], 0
  with sources.open_sources([f"{BUCKET}/big.npz"], image_shape=shape, num_classes=10,
                            read_concurrency=32) as source:
    tracemalloc.start()
    try:
      for steps in (8, 40):
        tracemalloc.reset_peak()
        for batch in batching.batches(real, source, seed=0, start_step=0, num_steps=steps,
                                      batch_size=256, extra_fraction=0.5, buffer_batches=2):
          read += int(batch["is_extra"].sum()) * int(np.prod(shape))
        peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
      tracemalloc.stop()
  assert read > 2.5 * num * int(np.prod(shape))
  assert peaks[1] < peaks[0] + 2**20, peaks
