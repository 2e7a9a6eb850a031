"""Checkpoints: bit-identical round trip, keep-last-k plus best, atomicity, SIGTERM, sharding."""
import os
import re
import signal
import subprocess
import sys
import textwrap
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath

from jaxdefense import checkpoint, models, parallel
from jaxdefense.training import optim, train_state
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class State:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any
  rng: jax.Array


def make_state(seed: int) -> State:
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"dense": {"kernel": jax.random.normal(k1, (5, 3)), "bias": jnp.zeros(3)},
            "scale": jax.random.uniform(k2, (3,), dtype=jnp.bfloat16)}
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return State(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state, ema=None,
               rng=jax.random.fold_in(jax.random.key(seed), 7))


def assert_bit_identical(a: Any, b: Any) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def run_python(code: str, *, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                        env={**os.environ, **(env or {})}, capture_output=True, text=True,
                        timeout=120)


def test_round_trip_is_bit_identical_with_metadata(tmp_path):
  state = make_state(3)
  metadata = {"epoch": 2, "step_in_epoch": np.int64(17), "config": "resnet18_cas",
              "metrics": {"pgd_accuracy": np.float32(0.25), "loss": 1.5}}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=3,
                               best_metric="pgd_accuracy") as ckpt:
    assert ckpt.save(11, state, metrics={"pgd_accuracy": 0.25}, metadata=metadata)
    ckpt.wait()
    restored, step, meta = ckpt.restore(make_state(0))
  assert step == 11
  assert isinstance(restored, State) and restored.ema is None
  assert_bit_identical(restored, state)
  assert restored.rng.dtype == state.rng.dtype
  assert meta == {"epoch": 2, "step_in_epoch": 17, "config": "resnet18_cas",
                  "metrics": {"pgd_accuracy": 0.25, "loss": 1.5}}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=3,
                               best_metric="pgd_accuracy") as reopened:
    restored, step, _ = reopened.restore(jax.eval_shape(lambda: make_state(0)))
  assert step == 11
  assert_bit_identical(restored, state)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_keeps_last_k_plus_best(tmp_path, mode):
  accs = [0.1, 0.9, 0.3, 0.4, 0.5, 0.6]
  if mode == "min":
    accs = [-a for a in accs]
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=2, best_mode=mode,
                               best_metric="pgd_accuracy") as ckpt:
    for step, acc in enumerate(accs, start=1):
      assert ckpt.save(step, make_state(step), metrics={"pgd_accuracy": acc, "loss": 0.0})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.latest_step() == 6 and ckpt.best_step() == 2
    restored, step, _ = ckpt.restore(make_state(0), which="best")
  assert step == 2
  assert_bit_identical(restored, make_state(2))
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 5, 6]
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=2, best_mode=mode,
                               best_metric="pgd_accuracy") as reopened:
    assert reopened.best_step() == 2


def test_steps_without_the_metric_never_count_as_best(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=1,
                               best_metric="pgd_accuracy") as ckpt:
    ckpt.save(1, make_state(1))
    ckpt.save(2, make_state(2), metrics={"pgd_accuracy": 0.5})
    ckpt.save(3, make_state(3), metrics={"loss": 9.0})
    ckpt.save(4, make_state(4), metrics={"pgd_accuracy": float("nan")})
    ckpt.save(5, make_state(5))
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5]
    assert ckpt.best_step() == 2


def test_saves_every_n_steps_and_when_forced(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=3, keep=10, best_metric=None) as ckpt:
    saved = [step for step in range(1, 8) if ckpt.save(step, make_state(step))]
    assert saved == [3, 6]
    assert ckpt.save(7, make_state(7), force=True)
    assert not ckpt.save(7, make_state(7), force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 6, 7]
    with pytest.raises(ValueError, match="not ranked"):
      ckpt.restore(make_state(0), which="best")


def test_restore_with_nothing_saved(tmp_path):
  directory = tmp_path / "checkpoints"
  with checkpoint.Checkpointer(directory, save_every_steps=1, keep=1,
                               best_metric="pgd_accuracy") as ckpt:
    assert ckpt.latest_step() is None and ckpt.best_step() is None
    assert ckpt.restore(make_state(0)) is None
    with pytest.raises(FileNotFoundError, match=re.escape(str(directory))):
      ckpt.restore(make_state(0), which="best")
    with pytest.raises(FileNotFoundError, match=re.escape(f"step 5 in {directory}")):
      ckpt.restore(make_state(0), which=5)
    with pytest.raises(ValueError, match="which must be"):
      ckpt.restore(make_state(0), which="first")


def test_stray_temporary_directory_is_ignored(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=5) as ckpt:
    ckpt.save(1, make_state(1))
    ckpt.wait()
    for name in ("2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000000000"):
      (tmp_path / name / "state").mkdir(parents=True)
      (tmp_path / name / "state" / "manifest.ocdbt").write_bytes(b"truncated")
    assert ckpt.latest_step() == 1
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=5) as reopened:
    assert reopened.latest_step() == 1
    restored, step, _ = reopened.restore(make_state(0))
    assert step == 1
    assert_bit_identical(restored, make_state(1))
    assert reopened.save(2, make_state(2))
    reopened.wait()
    assert reopened.all_steps() == [1, 2]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path):
  result = run_python(f"""
    import os, signal
    import jax.numpy as jnp
    from jaxdefense import checkpoint
    ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, save_every_steps=1, keep=5)
    ckpt.save(1, {{"w": jnp.full((1024, 1024), 1.0), "x": jnp.ones((32, 1024, 1024))}})
    ckpt.wait()
    ckpt.save(2, {{"w": jnp.full((1024, 1024), 2.0), "x": jnp.ones((32, 1024, 1024))}})
    os.kill(os.getpid(), signal.SIGKILL)
  """)
  assert result.returncode == -signal.SIGKILL, result.stderr
  names = {p.name for p in tmp_path.iterdir()}
  assert "1" in names and ("2" in names or any(n.startswith("2.orbax-checkpoint-tmp")
                                               for n in names)), names
  target = {"w": jnp.zeros((1024, 1024)), "x": jnp.zeros((32, 1024, 1024))}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=5) as ckpt:
    restored, step, _ = ckpt.restore(target)
  assert step in (1, 2)
  np.testing.assert_array_equal(restored["w"], np.full((1024, 1024), float(step)))


def test_sigterm_sets_flag_and_loop_saves_then_exits(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  with checkpoint.Checkpointer(tmp_path, save_every_steps=100, keep=2) as ckpt:
    with ckpt.preemption_guard():
      assert signal.getsignal(signal.SIGTERM) != previous
      state = make_state(0)
      for step in range(1, 10):
        state = state.replace(step=jnp.asarray(step, jnp.int32))
        if step == 4:
          os.kill(os.getpid(), signal.SIGTERM)
        ckpt.save(step, state)
        if ckpt.reached_preemption(step):
          assert ckpt.save(step, state, force=True, metadata={"preempted": True})
          break
      assert ckpt.preempted and step == 4
    assert signal.getsignal(signal.SIGTERM) == previous
    ckpt.wait()
    restored, saved_step, meta = ckpt.restore(make_state(0))
  assert saved_step == 4 and int(restored.step) == 4 and meta == {"preempted": True}


def test_sigterm_handler_sets_flag_and_is_uninstalled(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  ckpt = checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=1)
  try:
    ckpt.install_sigterm_handler()
    assert not ckpt.preempted and not ckpt.reached_preemption(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.preempted and ckpt.reached_preemption(1)
  finally:
    ckpt.close()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_several_processes_ask_orbax_for_the_preemption_sync_point(tmp_path):
  """With several processes the check is the CheckpointManager's: false (not an error) where
  JAX's preemption service is off, else JAX's sync point."""
  from jax.experimental import multihost_utils

  def service_off(step):
    raise RuntimeError("Preemption sync manager has not been initialized")
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=1) as ckpt:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(jax, "process_count", lambda: 2)
      patch.setattr(multihost_utils, "reached_preemption_sync_point", service_off)
      assert not ckpt.reached_preemption(2) and not ckpt.preempted
      patch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 3)
      assert not ckpt.reached_preemption(2) and ckpt.reached_preemption(3) and ckpt.preempted


def test_restores_into_target_shardings():
  result = run_python("""
    import tempfile
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxdefense import checkpoint
    mesh = jax.make_mesh((2,), ("data",))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = {"params": jax.device_put(jnp.arange(8.0).reshape(4, 2), rep),
             "batch": jax.device_put(jnp.arange(4.0), shard),
             "rng": jax.device_put(jax.random.key(1), rep)}
    with checkpoint.Checkpointer(tempfile.mkdtemp(), save_every_steps=1, keep=1) as ckpt:
      ckpt.save(1, state)
      restored, _, _ = ckpt.restore(state)
      for name in state:
        assert restored[name].sharding == state[name].sharding, name
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
      resharded, _, _ = ckpt.restore(target)
    assert resharded["batch"].sharding == rep
    np.testing.assert_array_equal(resharded["batch"], np.arange(4.0))
    np.testing.assert_array_equal(jax.random.key_data(resharded["rng"]),
                                  jax.random.key_data(jax.random.key(1)))
    print("ok")
  """, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _placeholders(tree):
  return jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)


def test_placeholder_leaves_are_not_read_and_damage_still_falls_back(tmp_path, capsys):
  """A target whose optimizer state, step and key are `ocp.PLACEHOLDER`: its parameters
  are the saved ones bit for bit, the placeholders come back as such; a step that does not
  restore (its tree metadata deleted) is skipped for the next older one, as in a full
  restore (read-only: nothing moved; else moved aside)."""
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=2,
                               best_metric="pgd_accuracy") as ckpt:
    ckpt.save(2, make_state(2), metrics={"pgd_accuracy": 0.5})
    ckpt.save(4, make_state(4), metrics={"pgd_accuracy": 0.25})
  blank = make_state(0)
  target = blank.replace(step=ocp.PLACEHOLDER, opt_state=_placeholders(blank.opt_state),
                         rng=ocp.PLACEHOLDER)
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=2, best_metric="pgd_accuracy",
                               read_only=True) as ckpt:
    restored, step, _ = ckpt.restore(target, which="latest")
  assert step == 4 and restored.step is ocp.PLACEHOLDER and restored.rng is ocp.PLACEHOLDER
  assert all(leaf is ocp.PLACEHOLDER for leaf in jax.tree.leaves(restored.opt_state))
  assert_bit_identical(restored.params, make_state(4).params)
  os.remove(tmp_path / "4" / "state" / "_METADATA")
  for read_only, moved in ((True, []), (False, ["4"])):
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep=2,
                                 best_metric="pgd_accuracy", read_only=read_only) as ckpt:
      restored, step, _ = ckpt.restore(target, which="latest")
    assert step == 2 and "checkpoint step 4 in" in capsys.readouterr().out
    assert_bit_identical(restored.params, make_state(2).params)
    damaged = tmp_path.parent / f"{tmp_path.name}_damaged"
    assert (sorted(os.listdir(damaged)) if damaged.exists() else []) == moved


@pytest.mark.parametrize("ema", [True, False])
def test_restore_variables_reads_the_variables_alone(tmp_path, monkeypatch, ema):
  """train_state.restore_variables gives the variables a full restore of the train state
  gives (its EMA when the run keeps one, else params and batch_stats) and orbax reads no
  other array of the checkpoint (the full restore, through the same spy, reads them all,
  the optimizer state included)."""
  config = tiny_config()
  config.train.ema_decay = 0.5 if ema else 0.0
  model = models.from_config(config, 10)
  state = train_state.create(model, optim.make_optimizer(config, 3)[0], jax.random.key(0),
                             (8, 8, 1), ema=ema)
  if ema:
    state = state.replace(ema=jax.tree.map(lambda a: a + 1, state.ema))  # Not the params.
  directory = tmp_path / "checkpoints"
  with checkpoint.Checkpointer(directory, save_every_steps=1, keep=1,
                               best_metric=train_state.BEST_METRIC) as ckpt:
    ckpt.save(3, state, metrics={train_state.BEST_METRIC: 0.5})
  read: list[str] = []
  deserialize = ocp.type_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    read.extend(info.name.split(".")[0] for info in infos)
    return await deserialize(self, infos, args)
  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", spy)
  with checkpoint.Checkpointer(directory, save_every_steps=1, keep=1,
                               best_metric=train_state.BEST_METRIC, read_only=True) as ckpt:
    full, _, _ = ckpt.restore(jax.eval_shape(lambda: state), which="best")
  assert {"opt_state", "params"} <= set(read)
  read.clear()
  variables, step = train_state.restore_variables(config, epath.Path(tmp_path), "best", model,
                                                  (8, 8, 1), parallel.make_mesh())
  assert step == 3
  assert set(read) == ({"ema"} if ema else {"params", "batch_stats"})
  assert_bit_identical(variables, full.variables(use_ema=ema))
