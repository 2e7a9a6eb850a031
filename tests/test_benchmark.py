"""benchmarks/benchmark.py: its option parsing and its table's arithmetic (not its timings)."""
import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
_SPEC = importlib.util.spec_from_file_location("benchmarks_benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = benchmark  # Its dataclasses look their module up there.
_SPEC.loader.exec_module(benchmark)


def test_batch_sizes_per_model_and_for_every_model():
  assert benchmark.parse_batch_sizes("resnet18:32,wrn34_10:8,wrn34_10:16",
                                     ["resnet18", "wrn34_10"]) == {
                                         "resnet18": [32], "wrn34_10": [8, 16]}
  assert benchmark.parse_batch_sizes("4,8", ["resnet18", "vgg16"]) == {
      "resnet18": [4, 8], "vgg16": [4, 8]}
  # Sizes of models not asked for are ignored (the platform defaults name all of them).
  assert benchmark.parse_batch_sizes(benchmark.DEFAULT_BATCH_SIZES["cpu"], ["vgg16"]) == {
      "vgg16": [32]}


@pytest.mark.parametrize("spec,message", [
    ("resnet50:8", "unknown model 'resnet50'"),
    ("wrn34_10:8", "no batch size for model 'resnet18'"),
    ("resnet18:0", "must be positive"),
])
def test_bad_batch_sizes_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    benchmark.parse_batch_sizes(spec, ["resnet18"])


def test_bad_options_are_refused(capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--defenses=fsr,sap"])
  assert "--defenses must name one or more of none, cas, fsr, cifs; got fsr, sap" in (
      capsys.readouterr().err)


def _result(defense, step_s, flops=1e12, mfu=0.5):
  timing = {"median_s": step_s, "images_per_s": 32 / step_s, "flops": flops,
            "flop_per_s": flops / step_s, "mfu": mfu, "compile_s": 1.0,
            "xla_memory_bytes": 2**30}
  return {"model": "resnet18", "defense": defense, "dtype": "float32", "batch_size": 32,
          "step": timing, "attack": {"images_per_s": 10.0}, "eval": {"images_per_s": 100.0},
          "peak_memory_bytes": 2**31, "peak_memory_kind": "rss"}


def test_table_reports_overhead_over_the_undefended_step():
  text = benchmark.table([_result("none", 2.0), _result("fsr", 2.2, mfu=0.25)])
  header, _, none_row, fsr_row = text.splitlines()
  assert header.split()[:4] == ["model", "defense", "dtype", "batch"]
  assert "+0.0%" in none_row and "50.0%" in none_row
  assert "+10.0%" in fsr_row and "25.0%" in fsr_row  # 2.2 s / 2.0 s - 1; MFU as given
  assert "16.0" in none_row  # step images/s: 32 / 2.0


def test_flops_count_convolutions_and_matmuls():
  """cpu_flops equals the closed form 2 N H' W' k^2 C_in C_out + 2 N D K for a stride-1
  VALID convolution (output H' = H - k + 1) followed by a dense layer, on whatever backend
  runs the test (XLA's GPU analysis of the compiled function misses the convolution)."""
  import jax
  import jax.numpy as jnp

  def fn(x, w, v):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(y.shape[0], -1) @ v

  n, h, c_in, c_out, k, classes = 4, 8, 3, 16, 3, 10
  out = h - k + 1
  args = (jnp.ones((n, h, h, c_in)), jnp.ones((k, k, c_in, c_out)),
          jnp.ones((out * out * c_out, classes)))
  expected = 2 * n * out * out * k * k * c_in * c_out + 2 * n * out * out * c_out * classes
  assert benchmark.cpu_flops(fn, args) == pytest.approx(expected, rel=0.01)


_AA_PATH = _PATH.parent / "autoattack.py"
_AA_SPEC = importlib.util.spec_from_file_location("benchmarks_autoattack", _AA_PATH)
aa_benchmark = importlib.util.module_from_spec(_AA_SPEC)
_AA_SPEC.loader.exec_module(aa_benchmark)


def test_autoattack_budget_scales_iterations_and_queries_alike():
  assert aa_benchmark.budget(1.0) == (100, 5000)
  assert aa_benchmark.budget(0.05) == (5, 250)
  assert aa_benchmark.budget(1e-4) == (1, 1)  # At least one of each.


def test_autoattack_pytorch_pass_counter_counts_examples_per_call():
  """adv-lib's count: examples x forward calls, examples x backward calls."""
  import torch
  inner = torch.nn.Linear(3, 2)
  counted = aa_benchmark.counted_torch(lambda x: (inner(x),))
  x = torch.zeros(5, 3, requires_grad=True)
  counted(x).sum().backward()
  with torch.no_grad():
    counted(torch.zeros(4, 3))
  assert counted.passes == [9, 5]
