"""Extra (generated) data: exact mixing per batch, the batch plan as a pure function of
(seed, step) split over processes, every bad input as one error naming the file, the
prepared format (round trip, damage, gs://), the prepare and demo_extra commands end to end,
and host memory bounded by the read-ahead."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from jaxdefense import data, errors
from jaxdefense.data import batching, sources, writer
from tests.helpers import ROOT

SHAPE = (4, 4, 3)
MARKER = 255  # Every pixel of an extra image; real images stay below it.


def _real(num: int = 60, seed: int = 0) -> data.Dataset:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, MARKER, (num, *SHAPE), np.uint8)
  labels = rng.integers(0, 10, num).astype(np.int32)
  return data.Dataset(name="synthetic", num_classes=10, image_shape=SHAPE, train_images=images,
                      train_labels=labels, test_images=images[:1], test_labels=labels[:1])


def _arrays(num: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (num, *SHAPE), np.uint8), rng.integers(0, 10, num)


def _npz(path, images, labels, **members) -> str:
  np.savez(path, image=images, label=labels, **members)
  return os.fspath(path)


def _open(patterns, **kwargs) -> sources.ExtraSource:
  return sources.open_sources(patterns, image_shape=SHAPE, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> sources.ExtraSource:
  """30 extra images, every pixel MARKER, labels 0..9."""
  path = tmp_path_factory.mktemp("marked") / "extra.npz"
  _npz(path, np.full((30, *SHAPE), MARKER, np.uint8), np.arange(30) % 10)
  with _open([os.fspath(path)]) as source:
    yield source


def _plan(step: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  options = dict(seed=3, batch_size=20, extra_fraction=0.7, num_real=60, num_extra=1000,
                 process_index=0, process_count=1)
  return batching.batch_indices(batching.Plan(**{**options, **kwargs}), step)


def _load(real: data.Dataset, source: sources.ExtraSource, step: int,
          **kwargs) -> dict[str, np.ndarray]:
  return batching.load_batch(real, source, batching.plan_for(real, source, **kwargs), step)


@pytest.mark.parametrize("batch_size,fraction", [(20, 0.7), (16, 0.5), (33, 0.5), (10, 0.25),
                                                 (7, 0.9), (12, 0.0)])
def test_every_batch_holds_round_f_b_extra_images(marked, batch_size, fraction):
  expected = round(fraction * batch_size)
  batches = list(batching.batches(_real(), marked if expected else None, seed=0, start_step=0,
                                  num_steps=12, batch_size=batch_size, extra_fraction=fraction,
                                  buffer_batches=2))
  assert len(batches) == 12
  for batch in batches:
    is_marked = (batch["images"] == MARKER).all(axis=(1, 2, 3))
    assert batch["images"].shape == (batch_size, *SHAPE) and batch["images"].dtype == np.uint8
    assert batch["labels"].dtype == np.int32 and batch["is_extra"].dtype == bool
    assert is_marked.sum() == expected == batch["is_extra"].sum()
    np.testing.assert_array_equal(is_marked, batch["is_extra"])
    assert not batch["is_extra"][:batch_size - expected].any()  # Real images first.


def test_batches_are_the_plan_read_and_resume_exactly(tmp_path):
  images, labels = _arrays(50)
  real = _real()
  with _open([_npz(tmp_path / "e.npz", images, labels)]) as source:
    run = lambda start, num: list(batching.batches(
        real, source, seed=5, start_step=start, num_steps=num, batch_size=20,
        extra_fraction=0.6, buffer_batches=3, num_threads=2))
    whole, resumed = run(0, 9), run(4, 5)
  for step, batch in enumerate(whole):
    real_indices, extra_indices = _plan(step, seed=5, extra_fraction=0.6, num_extra=50)
    np.testing.assert_array_equal(batch["images"][:8], real.train_images[real_indices])
    np.testing.assert_array_equal(batch["labels"][:8], real.train_labels[real_indices])
    np.testing.assert_array_equal(batch["images"][8:], images[extra_indices])
    np.testing.assert_array_equal(batch["labels"][8:], labels[extra_indices])
  for a, b in zip(whole[4:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_plan_is_a_pure_function_of_seed_and_step():
  steps = list(range(40))
  in_order = [_plan(s) for s in steps]
  batching._epoch_order.cache_clear()
  rng = np.random.default_rng(0)
  for step in rng.permutation(steps):
    for a, b in zip(in_order[step], _plan(int(step))):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(_plan(0, seed=4)[1], in_order[0][1])
  # R = 6 real per batch, 10 steps per real epoch: each epoch sees every real image once.
  assert batching.steps_per_epoch(60, 20, extra_fraction=0.7) == 10
  assert batching.steps_per_epoch(60, 20, extra_fraction=0.7, epoch_steps="batch") == 3
  real = np.concatenate([r for r, _ in in_order[:10]])
  np.testing.assert_array_equal(np.sort(real), np.arange(60))
  np.testing.assert_array_equal(real, data.epoch_permutation(60, seed=3, epoch=0))
  np.testing.assert_array_equal(np.concatenate([r for r, _ in in_order[10:20]]),
                                data.epoch_permutation(60, seed=3, epoch=1))


@pytest.mark.parametrize("count,fraction", [(2, 0.5), (4, 0.5), (4, 0.7), (8, 0.3)])
def test_processes_get_disjoint_parts_that_make_the_one_process_batch(marked, count, fraction):
  """Process p of P reads slice p of the global batch (real images, then extra ones): the
  processes' indices are disjoint and, concatenated in process order, are the one process's
  batch, position for position, whether or not a slice straddles the real / extra border."""
  real = _real()
  for step in (0, 7, 31):
    whole = _plan(step, batch_size=40, extra_fraction=fraction)
    parts = [_plan(step, batch_size=40, extra_fraction=fraction, process_index=p,
                   process_count=count) for p in range(count)]
    for k in (0, 1):
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    real_parts = [set(p[0].tolist()) for p in parts]
    assert sum(map(len, real_parts)) == len(set().union(*real_parts)) == len(whole[0])
    assert all(len(r) + len(e) == 40 // count for r, e in parts)
  one = _load(real, marked, 3, seed=1, batch_size=40, extra_fraction=fraction)
  local = [_load(real, marked, 3, seed=1, batch_size=40, extra_fraction=fraction,
                 process_index=p, process_count=count) for p in range(count)]
  for key in ("images", "labels", "is_extra"):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), one[key])
  marker = np.all(one["images"] == MARKER, axis=(1, 2, 3))
  np.testing.assert_array_equal(marker, one["is_extra"])
  assert marker.sum() == round(fraction * 40)


def test_extra_is_drawn_with_replacement_in_range():
  drawn = np.concatenate([_plan(s, num_extra=5, batch_size=100, extra_fraction=0.5)[1]
                          for s in range(4)])
  assert drawn.min() >= 0 and drawn.max() < 5
  np.testing.assert_array_equal(np.unique(drawn), np.arange(5))  # 200 draws of 5: repeats.
  big = _plan(0, num_extra=2**40, batch_size=100, extra_fraction=0.5)[1]
  assert big.dtype == np.int64 and big.max() < 2**40 and len(set(big.tolist())) == 50


@pytest.mark.parametrize("batch_size,fraction,count,match", [
    (20, -0.1, 1, r"extra_fraction must lie in \[0, 1\); got -0.1"),
    (20, 1.0, 1, r"extra_fraction must lie in \[0, 1\); got 1.0"),
    (64, 0.995, 1, r"extra_fraction=0.995 leaves no real image in a batch of 64"),
    (20, 0.7, 3, r"batch_size=20 must be a multiple of process_count=3"),
    (64, 0.0001, 1, r"extra_fraction=0.0001 gives no extra image in a batch of 64 "
                    r"\(round\(0.0001 x 64\) = 0\); allowed: a fraction giving at least one "
                    r"extra image per batch, > 0.0078125$"),
    (64, 0.0078125, 1, r"extra_fraction=0.0078125 gives no extra image"),  # round(0.5) = 0.
])
def test_bad_batches_are_value_errors_naming_the_numbers(batch_size, fraction, count, match):
  with pytest.raises(ValueError, match=match):
    batching.check_batch(batch_size, fraction, count)
  with pytest.raises(ValueError, match=match):
    _plan(0, batch_size=batch_size, extra_fraction=fraction, process_count=count)


def test_more_real_images_per_batch_than_the_real_set_is_refused():
  with pytest.raises(ValueError, match="30 real images per batch exceed the 20 real"):
    _plan(0, batch_size=100, num_real=20)


def _write_bad_files(tmp_path) -> dict[str, tuple[str, str]]:
  """name -> (pattern, what the message says)."""
  images, labels = _arrays(6)
  cases = {
      "missing file": (os.fspath(tmp_path / "none.npz"), "does not exist"),
      "glob matching nothing": (os.fspath(tmp_path / "part*.npz"), "matches no file"),
      "not an npz": (os.fspath(tmp_path / "notes.txt"), "neither an .npz file nor a directory"),
      "not a zip": (os.fspath(tmp_path / "broken.npz"), "not a readable .npz file"),
      "missing key": (os.fspath(tmp_path / "nolabel.npz"),
                      "no 'label' array (it holds image, labels)"),
      "wrong dtype": (_npz(tmp_path / "float.npz", images.astype(np.float32), labels),
                      "'image' must be uint8 (pixels 0..255); got float32"),
      "wrong image shape": (_npz(tmp_path / "shape.npz", images[:, :2], labels),
                            "'image' must have shape (N, 4, 4, 3) as the real data's images; "
                            "got (6, 2, 4, 3)"),
      "label out of range": (_npz(tmp_path / "range.npz", images, labels + 10),
                             "labels must lie in [0, 10) (the real data's classes); got [10,"),
      "negative label": (_npz(tmp_path / "negative.npz", images, labels - 20),
                         "labels must lie in [0, 10) (the real data's classes); got [-20,"),
      "labels not integers": (_npz(tmp_path / "floatlabel.npz", images, labels * 0.5),
                              "'label' must be integers of shape"),
      "count mismatch": (_npz(tmp_path / "count.npz", images, labels[:5]),
                         "6 images but 5 labels"),
      "prepared dir without meta": (os.fspath(tmp_path / "emptydir"), "a directory without "
                                                                      "meta.json"),
  }
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "broken.npz").write_bytes(b"PK not really")
  np.savez(tmp_path / "nolabel.npz", image=images, labels=labels)
  (tmp_path / "emptydir").mkdir()
  return cases


def test_every_bad_file_is_one_data_error_naming_it(tmp_path):
  for name, (pattern, says) in _write_bad_files(tmp_path).items():
    with pytest.raises(errors.DataError) as info:
      _open([pattern])
    message = str(info.value)
    assert says in message and pattern in message and "\n" not in message, (name, message)


def test_a_compressed_npz_over_the_limit_is_refused_with_the_prepare_command(tmp_path):
  images, labels = _arrays(10)
  np.savez_compressed(tmp_path / "big.npz", image=images, label=labels)
  with pytest.raises(errors.DataError, match=r"over max_npz_bytes=100 .* python -m "
                                             r"jaxdefense.data.prepare --source=.*big.npz"):
    _open([os.fspath(tmp_path / "big.npz")], max_npz_bytes=100)


def test_a_stored_npz_is_read_by_index_from_the_file(tmp_path, monkeypatch):
  """np.savez's members are stored: read at their offset in the zip (over max_npz_bytes,
  and never loaded whole: np.load is not called), equal to numpy's arrays."""
  images, labels = _arrays(40)
  path = _npz(tmp_path / "stored.npz", images, labels, other=np.zeros(3))
  monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load read the .npz whole"))
  order = np.random.default_rng(0).integers(0, 40, 64)
  with _open([path], max_npz_bytes=100) as source:
    got_images, got_labels = source.read(order)
  np.testing.assert_array_equal(got_images, images[order])
  np.testing.assert_array_equal(got_labels, labels[order])


def test_files_and_globs_join_into_one_index_space(tmp_path):
  parts = [_arrays(n, seed=n) for n in (5, 7, 3)]
  for k, (images, labels) in enumerate(parts):
    _npz(tmp_path / f"part{k}.npz", images, labels)
  writer.prepare(os.fspath(tmp_path / "part1.npz"), os.fspath(tmp_path / "prepared"))
  with _open([os.fspath(tmp_path / "part*.npz"), os.fspath(tmp_path / "prep*")]) as source:
    assert source.num_examples == 15 + 7
    assert [os.path.basename(p) for p in source.paths] == ["part0.npz", "part1.npz",
                                                           "part2.npz", "prepared"]
    images = np.concatenate([p[0] for p in parts] + [parts[1][0]])
    labels = np.concatenate([p[1] for p in parts] + [parts[1][1]])
    order = np.random.default_rng(0).integers(0, 22, 40)
    got_images, got_labels = source.read(order)
  np.testing.assert_array_equal(got_images, images[order])
  np.testing.assert_array_equal(got_labels, labels[order])
  assert got_labels.dtype == np.int32
  with pytest.raises(IndexError, match=r"indices must lie in \[0, 22\)"):
    source.read(np.array([22]))


@pytest.mark.parametrize("compressed", [False, True])
def test_prepare_round_trip_in_random_order(tmp_path, compressed):
  images, labels = _arrays(50)
  save = np.savez_compressed if compressed else np.savez
  save(tmp_path / "src.npz", image=images, label=labels.astype(np.int64))
  writer.prepare(os.fspath(tmp_path / "src.npz"), os.fspath(tmp_path / "out"), shard_images=7)
  meta = json.loads((tmp_path / "out" / "meta.json").read_text())
  assert meta["num_examples"] == 50 and meta["image_shape"] == list(SHAPE)
  assert [s["num_images"] for s in meta["shards"]] == [7] * 7 + [1]
  assert meta["shards"][0]["file"] == "images-00000-of-00008.npy"
  assert meta["source"] == os.fspath(tmp_path / "src.npz")
  shard = np.load(tmp_path / "out" / "images-00002-of-00008.npy", mmap_mode="r")
  np.testing.assert_array_equal(shard, images[14:21])  # Standard .npy files.
  order = np.concatenate([np.random.default_rng(1).permutation(50), [3, 3, 4, 5, 6, 7, 8]])
  with _open([os.fspath(tmp_path / "out")]) as source:
    got_images, got_labels = source.read(order)
  np.testing.assert_array_equal(got_images, images[order])
  np.testing.assert_array_equal(got_labels, labels[order])


def _command(module: str, *flags: str) -> subprocess.CompletedProcess:
  """`python -m jaxdefense.data.MODULE FLAGS`, as the docs show it, output captured."""
  return subprocess.run([sys.executable, "-m", f"jaxdefense.data.{module}", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(run: subprocess.CompletedProcess, says: str) -> None:
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert run.returncode == 2 and len(lines) == 1, run.stderr[-2000:]
  assert lines[0].startswith("error: ") and says in lines[0], lines[0]


def test_demo_extra_and_prepare_commands_end_to_end(tmp_path):
  """`python -m jaxdefense.data.demo_extra` writes the digits' augmented copies (labels the
  training digits' in order, images uint8 of their shape, each within the contrast and
  shift of its original's pixel sum); `python -m jaxdefense.data.prepare` makes it a
  prepared directory that reads back equal to the .npz. A bad flag, an existing output and
  a missing --output are one `error:` line, exit 2."""
  npz, out = tmp_path / "demo.npz", tmp_path / "out"
  run = _command("demo_extra", f"--output={npz}", "--copies=2", "--seed=1")
  assert run.returncode == 0 and "wrote 2874 augmented digits (16, 16, 1)" in run.stdout, (
      run.stderr[-2000:])
  digits = data.load("digits")
  with np.load(npz) as archive:
    images, labels = archive["image"], archive["label"]
  assert images.shape == (2874, 16, 16, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.tile(digits.train_labels, 2))
  sums = images.reshape(2, 1437, -1).sum(-1, dtype=np.int64)
  original = digits.train_images.reshape(1437, -1).sum(-1, dtype=np.int64)
  assert np.all(sums <= 1.2 * original + images[0].size)  # Zero fill only loses pixels.
  run = _command("prepare", f"--source={npz}", f"--output={out}", "--shard_images=1000")
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"prepared 2874 images of {npz} in {out} (3 shards)" in run.stdout
  order = np.random.default_rng(0).permutation(2874)
  with sources.open_sources([os.fspath(out)], image_shape=(16, 16, 1),
                            num_classes=10) as source:
    got_images, got_labels = source.read(order)
  np.testing.assert_array_equal(got_images, images[order])
  np.testing.assert_array_equal(got_labels, labels[order])
  _one_error_line(_command("prepare", f"--source={npz}", f"--output={out}"),
                  "not an empty directory")
  _one_error_line(_command("prepare", f"--source={npz}"), "--output")
  _one_error_line(_command("demo_extra", f"--output={npz}", "--copies=0"), "copies")
  _one_error_line(_command("demo_extra", f"--output={tmp_path / 'demo.txt'}"),
                  "--output must end in .npz")


def test_a_damaged_shard_is_a_data_error_naming_it(tmp_path):
  images, labels = _arrays(20)
  writer.prepare(_npz(tmp_path / "src.npz", images, labels), os.fspath(tmp_path / "out"),
                 shard_images=8)
  shard = tmp_path / "out" / "images-00001-of-00003.npy"
  with _open([os.fspath(tmp_path / "out")]) as source:
    os.truncate(shard, shard.stat().st_size - 100)  # Damaged while the run reads it.
    source.read(np.arange(0, 8))
    with pytest.raises(errors.DataError, match=f"{shard}: short read"):
      source.read(np.arange(5, 20))
    batches = batching.batches(_real(), source, seed=0, start_step=0, num_steps=50,
                               batch_size=20, extra_fraction=0.5, buffer_batches=2)
    with pytest.raises(errors.DataError, match=f"{shard}: short read"):
      list(batches)
  with pytest.raises(errors.DataError, match=f"{shard}: .* bytes, meta.json says"):
    _open([os.fspath(tmp_path / "out")])
  shard.unlink()
  with pytest.raises(errors.DataError, match=f"{shard}: missing"):
    _open([os.fspath(tmp_path / "out")])


def test_gs_sources_npz_prepared_and_globs(tmp_path, monkeypatch):
  """Under etils' gs:// mock: prepare, globs and the checks (the images are read through
  gcsfs, from a real server: tests/test_extra_bucket.py)."""
  monkeypatch.chdir(tmp_path)
  images, labels = _arrays(30)
  with epath_testing.mock_epath():
    bucket = epath.Path("gs://bucket/extra")
    bucket.mkdir(parents=True)
    with (bucket / "1m.npz").open("wb") as file:
      np.savez(file, image=images, label=labels)
    writer.prepare("gs://bucket/extra/1m.npz", "gs://bucket/prepared", shard_images=8)
    assert (epath.Path("gs://bucket/prepared") / "meta.json").exists()
    with _open(["gs://bucket/extra/*.npz", "gs://bucket/prep*"]) as source:
      assert source.paths == ("gs://bucket/extra/1m.npz", "gs://bucket/prepared")
      assert source.num_examples == 60
    with pytest.raises(errors.DataError, match="gs://bucket/none/x.npz does not exist"):
      _open(["gs://bucket/none/x.npz"])
    with pytest.raises(errors.DataError, match="gs://bucket/extra/50m_part.*matches no file"):
      _open(["gs://bucket/extra/50m_part*.npz"])
  assert (tmp_path / "gs:" / "bucket" / "prepared" / "images-00003-of-00004.npy").exists()


_STREAM = textwrap.dedent("""
    import json, re, sys
    import numpy as np
    from jaxdefense import data
    from jaxdefense.data import batching, sources

    def status(field):
      text = open("/proc/self/status").read()
      return int(re.search(field + r":\\s+(\\d+) kB", text).group(1)) * 1024

    real = data.synthetic(num_train=256, num_test=1, image_size=32)
    with sources.open_sources([sys.argv[1]], image_shape=(32, 32, 3), num_classes=10) as source:
      for batch in batching.batches(real, source, seed=0, start_step=0, num_steps=20,
                                    batch_size=64, extra_fraction=0.5, buffer_batches=2):
        pass  # Warm: the threads, numpy's and the allocator's first buffers.
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets the peak (VmHWM) to the current resident set.
      base, read = status("VmRSS"), 0
      for batch in batching.batches(real, source, seed=1, start_step=0,
                                    num_steps=int(sys.argv[2]), batch_size=64,
                                    extra_fraction=0.5, buffer_batches=2):
        read += int(batch["is_extra"].sum()) * 32 * 32 * 3
    print(json.dumps({"growth": status("VmHWM") - base, "read": read}))
""")


def test_streaming_memory_is_bounded_by_the_buffer(tmp_path):
  """60 MB of prepared images streamed twice over, in batches of 64 with 2 read ahead:
  the peak resident set grows by far less than the source (page cache is not counted)."""
  num = 20_000
  rng = np.random.default_rng(0)
  chunks = (rng.integers(0, 256, (2000, 32, 32, 3), np.uint8) for _ in range(num // 2000))
  writer.write_prepared(tmp_path / "big", chunks, rng.integers(0, 10, num),
                        image_shape=(32, 32, 3), source="synthetic", shard_images=6000)
  size = num * 32 * 32 * 3
  steps = 2 * num // 32
  out = subprocess.run([sys.executable, "-c", _STREAM, os.fspath(tmp_path / "big"), str(steps)],
                       capture_output=True, text=True, timeout=120, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["read"] >= 2 * size
  assert result["growth"] < size / 6, result


_TRAIN = textwrap.dedent("""
    import json, re, sys
    sys.path.insert(0, sys.argv[3])
    from jaxdefense.training import train
    from tests.helpers import tiny_config

    c = tiny_config()
    c.data.name, c.data.image_size, c.train.epochs = "synthetic", 32, 1
    c.data.extra, c.data.extra_fraction, c.data.buffer_batches = (sys.argv[1],), 0.5, 2
    train.train_and_evaluate(c, sys.argv[2])
    text = open("/proc/self/status").read()
    print(json.dumps({"peak": int(re.search(r"VmHWM:\\s+(\\d+) kB", text).group(1)) * 1024}))
""")


def test_training_memory_does_not_grow_with_the_source(tmp_path):
  """The tiny training run with a 200 MB extra .npz peaks within a quarter of the source's
  size of the same run with a 3 MB one: the source is read by index, never loaded."""
  from tests.helpers import write_extra  # noqa: PLC0415
  peaks = {}
  for name, num in (("small", 1_000), ("big", 65_536)):
    path = write_extra(tmp_path / f"{name}.npz", num, (32, 32, 3), value=None)
    out = subprocess.run([sys.executable, "-c", _TRAIN, path, os.fspath(tmp_path / name), ROOT],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
  size = 65_536 * 32 * 32 * 3
  assert peaks["big"] - peaks["small"] < size / 4, peaks
