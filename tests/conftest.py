"""Test defaults: main.py's XLA CPU settings, float32 matmuls at full precision so reference
comparisons are tight, and one persistent compilation cache for the session, shared with the
subprocesses tests start (many tests compile the same tiny programs: training runs,
resumes, main.py runs)."""
import os
import shutil
import tempfile

import jax

from jaxdefense import xla_flags

xla_flags.set_cpu_defaults()  # Before JAX's first computation, as main.py does.

_CACHE = tempfile.mkdtemp(prefix="jaxdefense-test-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
  del config
  shutil.rmtree(_CACHE, ignore_errors=True)
