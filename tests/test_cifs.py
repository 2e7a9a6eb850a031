"""CIFS (jaxdefense/defenses/cifs.py) against the closed forms of docs/cifs.md, computed in NumPy
from the module's own parameters; its second-order gradient against finite differences;
its class selection; the deployed model's input gradient with and without the mask's
input dependence."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense import attacks, defenses, models
from jaxdefense.training import objectives
from jaxdefense.defenses import cifs
from jaxdefense.models import common

N, H, W, C, K, HIDDEN = 5, 3, 3, 6, 4, 7


def _module(probe, **kw):
  return cifs.CIFS(K, inits=common.TORCH_DEFAULT, probe=probe, hidden=HIDDEN, **kw)


def _setup(probe, seed=0, dtype=np.float32, **kw):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N, H, W, C)).astype(dtype)
  labels = rng.integers(0, K, N).astype(np.int32)
  module = _module(probe, **kw)
  params = module.init(jax.random.key(seed), z, labels, train=True)["params"]
  params = jax.tree.map(lambda p: np.asarray(p, dtype) * 3, params)  # Sharper softmaxes.
  return module, params, z, labels


def _reference(probe, params, z, classes, mask_scale=1.0):
  """docs/cifs.md section 2: probe logits, relevance (closed form), mask, output (float64)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  g = np.asarray(z, np.float64).mean(axis=(1, 2))
  pick = lambda kernel: sum(kernel[:, classes[:, j]].T for j in range(classes.shape[1]))
  if probe == "linear":
    logits = g @ p["kernel"] + p["bias"]
    relevance = pick(p["kernel"])
  else:
    h = g @ p["hidden_kernel"] + p["hidden_bias"]
    logits = np.log1p(np.exp(5 * h)) / 5 @ p["kernel"] + p["bias"]
    relevance = (1 / (1 + np.exp(-5 * h)) * pick(p["kernel"])) @ p["hidden_kernel"].T
  e = np.exp(relevance - relevance.max(1, keepdims=True))
  mask = mask_scale * e / e.sum(1, keepdims=True)
  return logits, mask, np.asarray(z, np.float64) * mask[:, None, None, :]


@pytest.mark.parametrize("probe", cifs.PROBES)
@pytest.mark.parametrize("train", [True, False])
def test_forward_matches_the_closed_form(probe, train):
  module, params, z, labels = _setup(probe)
  (out, logits), state = module.apply({"params": params}, z, labels, train=train,
                                      mutable=["intermediates"])
  ranked = np.argsort(-np.asarray(logits), axis=1)
  classes = (np.stack([labels, ranked[:, 1]], 1) if train else ranked[:, :2])
  ref_logits, ref_mask, ref_out = _reference(probe, params, z, classes)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["intermediates"]["mask"][0], ref_mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state["intermediates"]["mask"][0]).sum(1), 1, rtol=1e-5)


def test_mask_scale_multiplies_the_mask():
  module, params, z, labels = _setup("linear", mask_scale=2.0)
  _, state = module.apply({"params": params}, z, labels, train=False, mutable=["intermediates"])
  np.testing.assert_allclose(np.asarray(state["intermediates"]["mask"][0]).sum(1), 2, rtol=1e-5)


def test_class_selection():
  """Training: the label and the probe's second class (the label twice when it is the
  second, the top class unused when the label is third); eval: the top two."""
  logits = jnp.array([[5.0, 4.0, 1.0, 0.0]] * 3)
  labels = jnp.array([0, 1, 2])
  np.testing.assert_array_equal(cifs.select_classes(logits, labels, train=True),
                                [[0, 1], [1, 1], [2, 1]])
  np.testing.assert_array_equal(cifs.select_classes(logits, labels, train=False),
                                [[0, 1]] * 3)
  module, params, z, _ = _setup("linear")
  logits = np.asarray(module.apply({"params": params}, z, None, train=False)[1])
  second = np.argsort(-logits, axis=1)[:, 1]
  _, state = module.apply({"params": params}, z, second, train=True, mutable=["intermediates"])
  _, ref_mask, _ = _reference("linear", params, z, np.stack([second, second], 1))
  np.testing.assert_allclose(state["intermediates"]["mask"][0], ref_mask, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("probe", cifs.PROBES)
def test_second_order_gradient_to_the_probe_equals_finite_differences(probe):
  """A loss on the masked output reaches the probe weights through the mask (the authors'
  create_graph=True); float64 central differences agree, and b2 gets nothing."""
  with jax.enable_x64(True):
    module, params, z, labels = _setup(probe, dtype=np.float64)
    weights = np.random.default_rng(1).normal(size=(N, H, W, C))

    def downstream(p):  # Only the output: the probe CE path is excluded.
      out, _ = module.apply({"params": p}, z, labels, train=True)
      return jnp.sum(out * weights)

    grads = jax.grad(downstream)(params)
    np.testing.assert_array_equal(grads["bias"], 0)
    for name in params:
      flat = np.asarray(params[name]).ravel()
      for i in np.random.default_rng(2).choice(flat.size, min(6, flat.size), replace=False):
        step = np.zeros_like(flat)
        step[i] = 1e-6
        shift = lambda s: {**params, name: (flat + s).reshape(params[name].shape)}
        fd = (downstream(shift(step)) - downstream(shift(-step))) / 2e-6
        assert float(grads[name].ravel()[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9), \
            (name, i)


@pytest.mark.parametrize("probe", cifs.PROBES)
def test_no_gradient_reaches_the_features_through_the_mask(probe):
  """d output / d z is the mask itself (times the cotangent): the relevance is taken at
  the detached pooled features. With mask_stop_gradient=False it is not (nonlinear)."""
  module, params, z, labels = _setup(probe)
  weights = np.random.default_rng(1).normal(size=z.shape).astype(np.float32)
  loss = lambda m, v: jnp.sum(m.apply({"params": params}, v, labels, train=True)[0] * weights)
  _, state = module.apply({"params": params}, z, labels, train=True, mutable=["intermediates"])
  mask = np.asarray(state["intermediates"]["mask"][0])
  np.testing.assert_allclose(jax.grad(functools.partial(loss, module))(z),
                             weights * mask[:, None, None, :], rtol=1e-5, atol=1e-7)
  if probe == "nonlinear":
    live = _module(probe, mask_stop_gradient=False)
    assert not np.allclose(jax.grad(functools.partial(loss, live))(z),
                           weights * mask[:, None, None, :], rtol=1e-3, atol=1e-5)


def test_aux_loss_is_the_authors_joint_loss():
  """CE(main) + aux = 3/(beta+1) (CE(main) + beta mean CE(probes)); beta 2: no rescale."""
  rng = np.random.default_rng(0)
  logits, p1, p2 = (rng.normal(size=(N, K)).astype(np.float32) for _ in range(3))
  labels = rng.integers(0, K, N)
  ce = lambda a: optax.softmax_cross_entropy_with_integer_labels(a, labels)
  for beta, rescale in ((2.0, True), (4.0, True), (4.0, False)):
    aux, _ = cifs.aux_loss(logits, {"cifs/a": p1, "cifs/b": p2}, labels, beta=beta,
                           rescale=rescale)
    scale = 3 / (beta + 1) if rescale else 1.0
    expected = scale * (ce(logits) + beta * (ce(p1) + ce(p2)) / 2)
    np.testing.assert_allclose(ce(logits) + aux, expected, rtol=1e-5)


def _tiny_model(dtype=jnp.float32, **defense):
  return models.create("resnet", num_classes=4, stage_sizes=(1, 1), width=4, dtype=dtype,
                       defense=defenses.DefenseConfig(name="cifs", **defense))


def test_model_places_a_nonlinear_then_a_linear_probe():
  shapes = lambda model: jax.eval_shape(
      lambda: models.init(model, jax.random.key(0), (8, 8, 1)))["params"]
  params = shapes(_tiny_model())
  assert "hidden_kernel" in params["cifs_layer1_0"]
  assert "hidden_kernel" not in params["cifs_layer2_0"]
  params = shapes(_tiny_model(linear_sites=("layer1.0", "layer2.0")))
  assert "hidden_kernel" not in params["cifs_layer1_0"]
  with pytest.raises(ValueError, match=r"linear_sites \['stem'\] are not active"):
    shapes(_tiny_model(linear_sites=("stem",)))


def test_training_mode_needs_labels_and_trades_is_refused():
  model = _tiny_model()
  variables = jax.eval_shape(lambda: models.init(model, jax.random.key(0), (8, 8, 1)))
  with pytest.raises(ValueError, match="CIFS in training mode masks channels by the"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 8, 8, 1)), train=True,
                                         mutable=["batch_stats"]), variables)
  with pytest.raises(ValueError, match="objective 'trades' is not defined for CIFS"):
    objectives.make("trades", model, model.defense, objectives.AttackConfig())


@pytest.mark.parametrize("mask_gradient", [False, True])
def test_deployed_input_gradient_equals_finite_differences(mask_gradient):
  """Eval mode, float64: with the mask's gradient (the adaptive attack's view) the input
  gradient of the CE is the function's; with the authors' detach it is the gradient of
  the same network with the masks held at their values."""
  with jax.enable_x64(True):
    model = _tiny_model(jnp.float64, mask_stop_gradient=not mask_gradient)
    variables = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.jit(
        lambda k: models.init(model, k, (8, 8, 1)))(jax.random.key(1)))
    x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1))
    labels = jnp.array([1, 3])
    frozen = {}
    if not mask_gradient:  # The masks of x, held fixed (module outputs replaced).
      _, state = jax.jit(lambda v: model.apply(variables, v, train=False,
                                               mutable=["intermediates"]))(x)
      frozen = {k: v["mask"][0] for k, v in state["intermediates"].items()}

    @jax.jit
    def ce(v):
      if frozen:
        def freeze(next_fun, args, kwargs, context):
          if isinstance(context.module, cifs.CIFS) and context.method_name == "__call__":
            z = args[0]
            _, logits = next_fun(*args, **kwargs)
            return z * frozen[context.module.name][:, None, None, :], logits
          return next_fun(*args, **kwargs)
        with nn.intercept_methods(freeze):
          out = model.apply(variables, v, train=False)
      else:
        out = model.apply(variables, v, train=False)
      return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(out.logits, labels))

    deployed = attacks.deployed(model, variables)
    grad = jax.grad(lambda v: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        deployed(v).logits, labels)))(x)
    for i in np.random.default_rng(3).choice(x.size, 8, replace=False):
      step = np.zeros(x.size)
      step[i] = 1e-6
      step = step.reshape(x.shape)
      fd = (ce(x + step) - ce(x - step)) / 2e-6
      assert float(grad.ravel()[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9), i
