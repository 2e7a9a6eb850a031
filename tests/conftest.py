"""Test defaults: main.py's XLA CPU settings and fast compilation, float32 matmuls at full
precision so reference comparisons are tight, and one persistent compilation cache for the
session, shared with pytest-xdist's workers and the subprocesses tests start (many tests
compile the same tiny programs: training runs, resumes, main.py runs). On a GPU the workers
share it, so none preallocates its memory. gs:// tests get a bucket (`gcs_bucket`) on a
storage server each worker starts on loopback when a test first asks for one."""
import os
import shutil
import tempfile
import uuid

import fsspec
import jax
import pytest

from jaxdefense import xla_flags
from tests import storage_server

xla_flags.set_cpu_defaults()  # Before JAX's first computation, as main.py does.
# The suite is bound by compilation of tiny programs: LLVM at -O0 compiles them about twice
# as fast (measured: test_precision 47 -> 27 s, APGD's masked-run test 12.5 -> 6.4 s). It
# changes only the machine code (XLA's HLO passes are the same); the subprocesses tests
# start inherit it, except those that set their own XLA_FLAGS.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# pytest-xdist's workers inherit the controller's environment, hence its cache.
_OWNER = "JAXDEFENSE_TEST_XLA_CACHE" not in os.environ
if _OWNER:
  os.environ["JAXDEFENSE_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxdefense-test-xla-cache-")
_CACHE = os.environ["JAXDEFENSE_TEST_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
  del config
  if _OWNER:
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def rolled_attack_loops():
  """Attack loops compiled rolled (`unroll=1`) instead of the measured default (whole up to
  20 steps): the same iterations, several times less to compile, for tests that run many
  attacks on tiny models once."""
  from jaxdefense.attacks import common  # Every attack's loop asks common.loop_unroll.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(common, "default_unroll", lambda steps: 1)
    yield


@pytest.fixture(scope="session")
def storage_server_url():
  """fake-gcs-server on a free loopback port for the session (each pytest-xdist worker
  starts its own), stopped at its end; its http://127.0.0.1:PORT (tests/storage_server.py)."""
  with storage_server.running() as url:
    yield url


@pytest.fixture
def gcs_bucket(storage_server_url, monkeypatch):
  """A fresh gs:// prefix in the storage server's bucket; the test and the processes it
  starts reach the server (its environment variables, and fsspec's anonymous token here)."""
  for name, value in storage_server.environment(storage_server_url).items():
    monkeypatch.setenv(name, value)
  monkeypatch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}),
                                                  "token": "anon"})
  return f"gs://{storage_server.BUCKET}/{uuid.uuid4().hex[:12]}"
