"""jaxdefense.convolution: same values and gradients as lax's convolution, canonical inside
loops."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import convolution

CASES = [  # (size, in, out, kernel, stride, padding)
    (8, 3, 4, 3, 1, ((1, 1), (1, 1))),
    (8, 3, 4, 3, 2, ((1, 1), (1, 1))),
    (9, 3, 4, 3, 2, ((1, 1), (1, 1))),  # odd size: the last row is not covered by stride 2
    (8, 4, 6, 1, 2, ((0, 0), (0, 0))),  # 1x1 strided shortcut
    (7, 2, 3, 3, 1, "SAME"),
    (10, 2, 3, 3, 2, "SAME"),
    (7, 2, 3, 3, 1, "VALID"),
    (9, 2, 3, 3, 3, ((2, 0), (0, 1))),  # asymmetric padding, stride 3
    (2, 4, 5, 3, 1, ((1, 1), (1, 1))),  # input smaller than the kernel: padded first
    (1, 4, 5, 3, 1, "SAME"),
    (2, 3, 2, 3, 2, ((1, 1), (1, 1))),  # ... and its input gradient too
]


@pytest.mark.parametrize("size,cin,cout,kernel,stride,padding", CASES)
def test_values_and_gradients_match_lax(size, cin, cout, kernel, stride, padding):
  with jax.enable_x64(True):
    key_x, key_w, key_t = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (2, size, size + 1, cin), jnp.float64)  # not square
    w = jax.random.normal(key_w, (kernel, kernel, cin, cout), jnp.float64)

    def loss(fn, x, w):
      y = fn(x, w, (stride, stride), padding, dimension_numbers=convolution.CANONICAL)
      return jnp.sum(jnp.sin(y) * jax.random.normal(key_t, y.shape, jnp.float64))

    both = jax.jit(lambda x, w: [jax.value_and_grad(lambda x, w: loss(fn, x, w), (0, 1))(x, w)
                                 for fn in (convolution.conv_general_dilated,
                                            jax.lax.conv_general_dilated)])
    ours, ref = both(x, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-12)
    for g, g_ref in zip(ours[1], ref[1]):
      assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
      np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def test_input_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (1, 5, 5, 2), jnp.float64)
    w = jax.random.normal(jax.random.key(2), (3, 3, 2, 3), jnp.float64)
    f = lambda x: jnp.sum(convolution.conv_general_dilated(
        x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=convolution.CANONICAL) ** 2)
    grad = np.asarray(jax.grad(f)(x))
    for index in [(0, 0, 0, 0), (0, 2, 3, 1), (0, 4, 4, 0), (0, 3, 0, 1)]:
      e = np.zeros(x.shape)
      e[index] = 1e-6
      numeric = (f(x + e) - f(x - e)) / 2e-6
      np.testing.assert_allclose(grad[index], numeric, rtol=1e-6)


def test_bfloat16_gradient_keeps_input_dtype():
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4), jnp.bfloat16)
  f = lambda fn: jax.grad(lambda x: jnp.sum(fn(
      x, w, (2, 2), "SAME", dimension_numbers=convolution.CANONICAL).astype(jnp.float32)))(x)
  ours, ref = f(convolution.conv_general_dilated), f(jax.lax.conv_general_dilated)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_other_layouts_and_dilations_are_lax_itself():
  """Cases outside the plain NHWC/HWIO one are passed to lax unchanged (no custom VJP)."""
  x = jnp.ones((1, 3, 6, 6))
  w = jnp.ones((4, 3, 3, 3))
  jaxpr = str(jax.make_jaxpr(lambda x: convolution.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))(x))
  assert "custom_vjp" not in jaxpr
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  grouped = lambda x: convolution.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=convolution.CANONICAL, feature_group_count=2)
  assert "custom_vjp" not in str(jax.make_jaxpr(grouped)(x))
  np.testing.assert_allclose(grouped(x), jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=convolution.CANONICAL, feature_group_count=2))


def test_module_keeps_nn_conv_parameters():
  x = jnp.ones((2, 8, 8, 3))
  ours = convolution.Conv(5, (3, 3), (2, 2), padding=1)
  ref = nn.Conv(5, (3, 3), (2, 2), padding=1)
  variables = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref.init(
      jax.random.key(0), x))
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-6)
  grad = lambda m: jax.grad(lambda x: jnp.sum(m.apply(variables, x) ** 2))(x)
  np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-5)


def test_input_gradient_in_a_loop_has_only_canonical_convolutions():
  """What the module is for: inside a compiled while loop every convolution, the input
  gradient's included, has XLA CPU's canonical layout (b01f_01io->b01f), which it runs
  through Eigen; JAX's own transpose leaves a swapped-kernel one there (a naive loop nest)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the layout rewrite is specific to XLA CPU")
  w1 = jax.random.normal(jax.random.key(1), (3, 3, 3, 8)) * 0.1
  w2 = jax.random.normal(jax.random.key(2), (3, 3, 8, 4)) * 0.1

  def model(x):
    h = jnp.tanh(convolution.Conv(8, (3, 3), use_bias=False).apply({"params": {"kernel": w1}}, x))
    return convolution.Conv(4, (3, 3), (2, 2), use_bias=False).apply({"params": {"kernel": w2}}, h)

  def attack(x):
    step = lambda _, v: v + 0.01 * jnp.sign(jax.grad(lambda u: jnp.sum(model(u) ** 2))(v))
    return jax.lax.fori_loop(0, 3, step, x, unroll=1)

  hlo = jax.jit(attack).lower(jnp.ones((2, 8, 8, 3))).compile().as_text()
  assert "while" in hlo
  labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
  assert len(labels) >= 3, hlo  # two forward, at least one input gradient
  assert set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.parametrize("size", [1, 2, 3])
def test_small_inputs_keep_the_canonical_layout(size):
  """XLA CPU swaps the operands of a convolution whose input is smaller than its kernel into
  a layout it runs as a naive loop nest; padding first keeps the fast layout (VGG-16's last
  stage is 2x2 on 32x32 images)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the operand swap is specific to XLA CPU")
  x = jnp.ones((4, size, size, 16))
  w = jnp.ones((3, 3, 16, 8))
  grad = jax.grad(lambda x: jnp.sum(convolution.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=convolution.CANONICAL) ** 2))
  hlo = jax.jit(grad).lower(x).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
  assert labels and set(labels) == {"b01f_01io->b01f"}, labels
