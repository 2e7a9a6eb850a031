"""FGSM / PGD and the attack losses: exact eps-ball and [0, 1] constraints, effectiveness on a
small trained model, input gradients through the defenses' eval-mode masks against finite
differences, and the losses against hand computations."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense import attacks, defenses
from jaxdefense.attacks import losses
from jaxdefense.attacks.common import accurate_l2_norm
from jaxdefense.defenses import cas, fsr
from jaxdefense.models import ModelOutput, common
from tests import attack_models
from tests.reference import np_ce, np_log_softmax


class TinyNet(nn.Module):
  """conv3x3 - ReLU - conv3x3 - ReLU - mean - Dense: cheap to compile, smooth enough."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    return ModelOutput(nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2))), {})


def boundary_images():
  """(6, 8, 8, 1) images with pixels exactly at 0 and 1, just below 1, at multiples of
  1/255 and uniform floats."""
  rng = np.random.default_rng(0)
  x = np.empty((6, 8, 8, 1), np.float32)
  x[0] = 0.0
  x[1] = 1.0
  x[2] = rng.integers(0, 2, (8, 8, 1))
  x[3] = rng.uniform(size=(8, 8, 1))
  x[4] = rng.choice(np.float32([1 - 2 ** -24, 0.999, 1 - 8 / 255, 8 / 255, 1e-7, 0.5]), (8, 8, 1))
  x[5] = rng.integers(0, 256, (8, 8, 1)) / np.float32(255)
  return jnp.asarray(x), jnp.array([0, 1, 2, 3, 0, 1])


@pytest.fixture(scope="module")
def tiny():
  net = TinyNet()
  x, labels = boundary_images()
  params = net.init(jax.random.key(0), x)
  return (lambda v: net.apply(params, v)), x, labels


@functools.cache
def _attack_fn(attack, norm, random_start):
  """One compiled attack per configuration, eps a traced argument (valid: the checks skip
  tracers), so every eps reuses it."""
  if attack == "fgsm":
    return jax.jit(lambda f, x, labels, eps, key: attacks.fgsm(f, x, labels, eps=eps, norm=norm),
                   static_argnums=0)
  scale = 3.0 if norm == "linf" else 2.0
  return jax.jit(lambda f, x, labels, eps, key: attacks.pgd(
      f, x, labels, key, eps=eps, step_size=eps / scale, steps=6, norm=norm,
      random_start=random_start), static_argnums=0)


def _run(attack, model_fn, x, labels, eps, norm, random_start):
  return _attack_fn(attack, norm, random_start)(model_fn, x, labels, jnp.float32(eps),
                                                jax.random.key(3))


CASES = [("fgsm", "linf", False), ("fgsm", "l2", False), ("pgd", "linf", False),
         ("pgd", "linf", True), ("pgd", "l2", False), ("pgd", "l2", True)]


@pytest.mark.parametrize("attack, norm, random_start", CASES)
def test_eps_ball_and_box_hold_exactly(tiny, attack, norm, random_start):
  """x_adv - x lies in the eps-ball (L-inf elementwise, L2 per example) and x_adv in [0, 1],
  checked in float32 with no tolerance, for eps 8/255, 0.1, 0.3, 1.0 (traced) and 8/255
  (a Python constant); the attack does move the input."""
  model_fn, x, labels = tiny
  xn = np.asarray(x)
  static = functools.partial(attacks.fgsm, eps=8 / 255) if attack == "fgsm" else \
      functools.partial(attacks.pgd, key=jax.random.key(3), eps=8 / 255, step_size=2 / 255,
                        steps=6, random_start=random_start)
  runs = [(8 / 255, static(model_fn, x, labels, norm=norm))]  # eps a Python constant.
  runs += [(eps, _run(attack, model_fn, x, labels, eps, norm, random_start))
           for eps in (8 / 255, 0.1, 0.3, 1.0)]
  for eps, x_adv in runs:
    x_adv = np.asarray(x_adv)
    assert x_adv.dtype == np.float32 and x_adv.shape == xn.shape
    assert np.all(x_adv >= 0) and np.all(x_adv <= 1)
    delta = np.float32(x_adv) - np.float32(xn)
    if norm == "linf":
      assert np.all(np.abs(delta) <= np.float32(eps)), eps
      if eps <= 0.3:  # Interior pixels reach the boundary.
        assert np.abs(delta[3]).max() > 0.99 * eps
    else:
      norms32 = np.sqrt(np.sum(np.square(delta), axis=(1, 2, 3), dtype=np.float32))
      assert np.all(norms32 <= np.float32(eps)), (eps, norms32 - np.float32(eps))
      for order in (np.float32(eps), np.float64(np.float32(eps))):  # Any summation order.
        squares = np.square(delta.reshape(len(delta), -1).astype(order.dtype))
        sequential = np.sqrt(np.cumsum(squares, axis=1)[:, -1])
        assert np.all(sequential <= order), (eps, order.dtype)
      norms64 = np.sqrt(np.sum(np.square(delta.astype(np.float64)), axis=(1, 2, 3)))
      assert np.all(norms64 <= np.float64(np.float32(eps))), eps
      assert norms64[3] > 0.5 * eps  # An interior image moves a good part of eps.
    # All-zero and all-one images can only move inwards.
    assert np.all(delta[0] >= 0) and np.all(delta[1] <= 0)


def test_accurate_l2_norm_is_within_an_ulp_of_float64():
  """The projection's norm (compensated sum of squares) equals the float64 norm to within
  2 float32 ulps, over 3072-entry examples spanning 6 orders of magnitude, where a plain
  sequential float32 sum is off by many."""
  rng = np.random.default_rng(0)
  v = (rng.standard_normal((8, 32, 32, 3)) * 10.0 ** rng.uniform(-6, 0, (8, 32, 32, 3)))
  v = v.astype(np.float32)
  exact = np.sqrt(np.sum(np.square(v.astype(np.float64)), axis=(1, 2, 3)))
  ours = np.asarray(jax.jit(accurate_l2_norm)(v)).reshape(-1)
  assert np.all(np.abs(ours - exact) <= 2 * np.spacing(exact.astype(np.float32)))
  sequential = np.sqrt(np.cumsum(np.square(v.reshape(8, -1)), axis=1)[:, -1])
  assert np.max(np.abs(sequential - exact) / np.spacing(exact.astype(np.float32))) > 2


@pytest.mark.parametrize("attack, norm, random_start", CASES)
def test_eps_zero_returns_input(tiny, attack, norm, random_start):
  """eps = 0 returns the input bit for bit (eps traced, and eps a Python constant)."""
  model_fn, x, labels = tiny
  np.testing.assert_array_equal(_run(attack, model_fn, x, labels, 0.0, norm, random_start), x)
  if attack == "fgsm":
    x_adv = attacks.fgsm(model_fn, x, labels, eps=0, norm=norm)
  else:
    x_adv = attacks.pgd(model_fn, x, labels, jax.random.key(0), eps=0, step_size=0.1, steps=2,
                        norm=norm, random_start=random_start)
  np.testing.assert_array_equal(x_adv, x)


def test_pgd_linf_equals_manual_iteration(tiny):
  """PGD L-inf from x equals the hand-written loop x <- clip(clip(x + a sign(g), x +- eps),
  0, 1) with the gradient of the summed CE, in NumPy."""
  model_fn, x, labels = tiny
  eps, step = 0.1, 0.03
  x_adv = attacks.pgd(model_fn, x, labels, eps=eps, step_size=step, steps=4,
                      random_start=False)
  loss = lambda v: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      model_fn(v).logits, labels))
  ref = np.asarray(x, np.float64)
  xn = ref.copy()
  for _ in range(4):
    g = np.asarray(jax.grad(loss)(jnp.asarray(ref, jnp.float32)))
    ref = np.clip(np.clip(ref + step * np.sign(g), xn - eps, xn + eps), 0, 1)
  np.testing.assert_allclose(x_adv, ref, atol=1e-6)


# ---------------------------------------------------------------- a small trained model

class DigitsNet(nn.Module):
  """A small CNN called like the library's backbones: apply(v, x, labels, train=...)."""

  @nn.compact
  def __call__(self, x, labels=None, *, train: bool):
    del labels, train
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return ModelOutput(nn.Dense(10)(x), {})


@pytest.fixture(scope="module")
def digits_model():
  """DigitsNet trained for 300 Adam steps on sklearn's 8x8 digits in [0, 1]; held-out split."""
  x_train, y_train, x_test, y_test = attack_models.digits()
  model = DigitsNet()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss_fn = lambda p: jnp.mean(losses.cross_entropy(
        model.apply({"params": p}, xb, train=True), yb))
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  rng = np.random.default_rng(1)
  for _ in range(300):
    idx = rng.integers(0, len(y_train), 128)
    params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])
  return model, {"params": params}, jnp.asarray(x_test), jnp.asarray(y_test)


def test_pgd_beats_fgsm_on_trained_model(digits_model):
  """On a trained model PGD's loss exceeds FGSM's, which exceeds the clean loss; PGD accuracy
  is far below clean accuracy; attacks.make runs the direct call on the deployed model.
  Margins, not exact values: the model's training is not bit-deterministic on GPUs."""
  model, variables, x, y = digits_model
  fn = attacks.deployed(model, variables)
  eps = 0.2
  x_fgsm = attacks.make(model, attacks.fgsm, eps=eps)(variables, x, y)
  run_pgd = attacks.make(model, attacks.pgd, eps=eps, step_size=eps / 4, steps=10,
                         random_start=False)
  x_pgd = run_pgd(variables, x, y)
  x_pgd_rs = attacks.make(model, attacks.pgd, eps=eps, step_size=eps / 4, steps=10)(
      variables, x, y, jax.random.key(0))
  stats = {}
  for name, xa in (("clean", x), ("fgsm", x_fgsm), ("pgd", x_pgd), ("pgd_rs", x_pgd_rs)):
    out = fn(xa)
    stats[name] = (float(jnp.mean(losses.cross_entropy(out, y))),
                   float(jnp.mean(jnp.argmax(out.logits, -1) == y)))
  assert stats["clean"][1] > 0.9
  assert stats["pgd"][0] > stats["fgsm"][0] > stats["clean"][0]
  assert stats["pgd_rs"][0] > stats["fgsm"][0]
  assert stats["pgd"][1] < 0.25 * stats["clean"][1]
  assert stats["pgd_rs"][1] < 0.25 * stats["clean"][1]
  assert stats["pgd"][1] <= stats["fgsm"][1]
  direct = jax.jit(lambda v: attacks.pgd(fn, v, y, eps=eps, step_size=eps / 4, steps=10,
                                         random_start=False))(x)
  # The same attack; two compilations may round differently (GPU reductions are not
  # bit-deterministic) and flip a sign step on a near-zero gradient entry.
  assert np.mean(np.asarray(direct) == np.asarray(x_pgd)) > 0.95
  direct_out = fn(direct)
  assert float(jnp.mean(losses.cross_entropy(direct_out, y))) == pytest.approx(
      stats["pgd"][0], rel=0.02)
  assert abs(float(jnp.mean(jnp.argmax(direct_out.logits, -1) == y)) - stats["pgd"][1]) <= 0.02
  for xa in (x_fgsm, x_pgd, x_pgd_rs):
    assert np.all(np.abs(np.float32(xa) - np.float32(x)) <= np.float32(eps))


def test_pgd_l2_and_cw_on_trained_model(digits_model):
  """PGD-L2 raises the CE above clean; PGD on the C&W loss lowers the margin."""
  model, variables, x, y = digits_model
  fn = attacks.deployed(model, variables)
  x_l2 = jax.jit(lambda v: attacks.pgd(fn, v, y, eps=1.0, step_size=0.25, steps=8, norm="l2",
                                       random_start=False))(x)
  x_cw = jax.jit(lambda v: attacks.pgd(fn, v, y, eps=0.1, step_size=0.01, steps=8,
                                       random_start=False, loss=losses.cw(50.0)))(x)
  clean = fn(x)
  assert jnp.mean(losses.cross_entropy(fn(x_l2), y)) > 2 * jnp.mean(
      losses.cross_entropy(clean, y))
  assert jnp.mean(losses.margin(fn(x_cw).logits, y)) < jnp.mean(losses.margin(clean.logits, y))


# ---------------------------------------------------------------- gradients through defenses

class TinyDefended(nn.Module):
  """conv - [CAS or FSR] - conv - mean - Dense, everything in float64; returns the main and
  auxiliary logits without the library's float32 cast of the logits."""
  defense: str
  train: bool = False

  @nn.compact
  def __call__(self, x, labels=None):
    f64 = jnp.float64
    x = nn.relu(nn.Conv(6, (3, 3), dtype=f64, param_dtype=f64)(x))
    if self.defense == "cas":
      x, aux = cas.CAS(4, inits=common.TORCH_DEFAULT, dtype=f64)(x, labels, train=self.train)
      aux = [aux]
    else:
      x, aux = fsr.FSR(4, inits=common.TORCH_DEFAULT, tau=0.5, hidden=4, dtype=f64)(
          x, train=self.train, stochastic=False)
      aux = [aux[p] for p in fsr.PARTS]
    x = nn.relu(nn.Conv(6, (3, 3), dtype=f64, param_dtype=f64)(x))
    return nn.Dense(4, dtype=f64, param_dtype=f64)(jnp.mean(x, axis=(1, 2))), aux


def _ce64(logits, labels):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def _setup64(defense):
  """TinyDefended with random float64 params drawn in NumPy (no PRNG compiles), non-trivial
  BN running statistics, a (3, 6, 6, 2) input and labels; call under jax.enable_x64."""
  net = TinyDefended(defense)
  x = jax.random.uniform(jax.random.key(2), (3, 6, 6, 2), jnp.float64)
  labels = jnp.array([0, 3, 1])
  shapes = jax.eval_shape(net.init, jax.random.key(0), x, labels)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      bound = 1 / np.sqrt(np.prod(shape[:-1]))
      return jnp.asarray(rng.uniform(-bound, bound, shape))
    low, high = {"bias": (-0.1, 0.1), "scale": (0.5, 1.5), "mean": (-0.02, 0.02),
                 "var": (0.5, 1.5)}[name]
    return jnp.asarray(rng.uniform(low, high, shape))
  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return net, variables, x, labels


def _grad_and_fd(net, variables, x, labels, h=None):
  """Input gradient of sum(CE(main) + sum_k CE(aux_k)) (eval mode); with a step h also its
  projections on three random directions and the central finite differences along them."""
  def total(v):
    logits, aux = net.apply(variables, v, labels)
    return jnp.sum(_ce64(logits, labels) + sum(_ce64(a, labels) for a in aux))
  grad = jax.grad(total)(x)
  if h is None:
    return grad
  dirs = np.random.default_rng(1).normal(size=(3,) + x.shape)
  analytic = np.array([float(jnp.vdot(grad, d)) for d in dirs])
  numeric = np.array([float(total(x + h * d) - total(x - h * d)) / (2 * h) for d in dirs])
  return grad, analytic, numeric


def test_input_gradient_through_cas_eval_mask_matches_finite_differences():
  """CAS in eval mode (mask W[argmax a]): input gradients equal central finite differences
  (float64, tight); the eval mask is the train mask of the head's own prediction."""
  with jax.enable_x64(True):
    net, variables, x, labels = _setup64("cas")
    grad, analytic, numeric = _grad_and_fd(net, variables, x, labels, h=1e-6)
    assert grad.dtype == jnp.float64 and np.all(np.abs(analytic) > 1e-3)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
    logits, (a,) = net.apply(variables, x, labels)
    same, _ = TinyDefended("cas", train=True).apply(variables, x, jnp.argmax(a, -1))
    np.testing.assert_array_equal(same, logits)
    assert not np.array_equal(np.argmax(a, -1), labels)  # The labels were not used.


def _gumbel_sigmoid64(scores, tau, key):
  """The eval-mode (U = 0.5) mask formula in the input's precision."""
  assert key is None
  p = jax.nn.sigmoid(scores)
  return jax.nn.sigmoid((jnp.log(p + 1e-8) - jnp.log(1 - p + 1e-8)) / (tau + 1e-8))


def test_input_gradient_through_fsr_eval_matches_finite_differences(monkeypatch):
  """FSR in eval mode (fixed U = 0.5 mask): with the mask formula evaluated in float64 the
  input gradient equals central finite differences tightly; the library's float32 mask
  gives the same gradient to float32 precision; the path through the mask matters
  (blocking its gradient changes the result)."""
  with jax.enable_x64(True):
    net, variables, x, labels = _setup64("fsr")
    _, state = jax.jit(lambda v: net.apply(variables, v, labels, mutable=["intermediates"]))(x)
    assert np.asarray(jax.tree_util.tree_leaves(state)[0]).std() > 1e-3  # A live mask.
    grad32 = _grad_and_fd(net, variables, x, labels)
    gumbel_sigmoid = fsr.gumbel_sigmoid
    monkeypatch.setattr(fsr, "gumbel_sigmoid", _gumbel_sigmoid64)
    grad, analytic, numeric = _grad_and_fd(net, variables, x, labels, h=1e-5)
    assert grad.dtype == jnp.float64 and np.all(np.abs(analytic) > 1e-3)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
    np.testing.assert_allclose(grad32, grad, rtol=1e-4, atol=1e-7)
    monkeypatch.setattr(fsr, "gumbel_sigmoid",
                        lambda *a: jax.lax.stop_gradient(gumbel_sigmoid(*a)))
    blocked = _grad_and_fd(net, variables, x, labels)
    assert float(jnp.max(jnp.abs(blocked - grad))) > 1e-3 * float(jnp.max(jnp.abs(grad)))


# ---------------------------------------------------------------- losses

@pytest.mark.parametrize("kappa", [0.0, 0.5, 50.0])
def test_cw_loss_by_hand(kappa):
  """cw(kappa) = -max(z_y - max_{j != y} z_j + kappa, 0), per example."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 6, 40)
  ref = []
  for zi, yi in zip(z.astype(np.float64), y):
    other = max(zi[j] for j in range(6) if j != yi)
    ref.append(-max(zi[yi] - other + kappa, 0.0))
  got = losses.cw(kappa)(ModelOutput(jnp.asarray(z), {}), jnp.asarray(y))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  if kappa == 0.0:
    assert (np.asarray(got) == 0).any() and (np.asarray(got) < 0).any()


def test_trades_kl_by_hand():
  """trades_kl(clean)(adv) = sum_j p_j (log p_j - log q_j), p = softmax(clean); no gradient
  flows into the clean logits; KL of a distribution with itself is 0."""
  rng = np.random.default_rng(1)
  clean = rng.normal(size=(7, 5)).astype(np.float32) * 2
  adv = rng.normal(size=(7, 5)).astype(np.float32) * 2
  lp, lq = np_log_softmax(clean), np_log_softmax(adv)
  ref = np.sum(np.exp(lp) * (lp - lq), axis=-1)
  labels = jnp.zeros(7, jnp.int32)
  got = losses.trades_kl(jnp.asarray(clean))(ModelOutput(jnp.asarray(adv), {}), labels)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert np.all(ref > 0)
  np.testing.assert_allclose(
      losses.trades_kl(jnp.asarray(clean))(ModelOutput(jnp.asarray(clean), {}), labels), 0.0,
      atol=1e-6)
  grad_clean = jax.grad(lambda c: jnp.sum(losses.trades_kl(c)(
      ModelOutput(jnp.asarray(adv), {}), labels)))(jnp.asarray(clean))
  np.testing.assert_array_equal(grad_clean, 0.0)


def test_dlr_loss_by_hand():
  """dlr = -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)."""
  rng = np.random.default_rng(2)
  z = rng.normal(size=(10, 5)).astype(np.float64)
  y = rng.integers(0, 5, 10)
  srt = -np.sort(-z, axis=-1)
  other = np.array([np.max(np.delete(zi, yi)) for zi, yi in zip(z, y)])
  ref = -(z[np.arange(10), y] - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
  got = losses.dlr(ModelOutput(jnp.asarray(z, jnp.float32), {}), jnp.asarray(y))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["none", "cas", "fsr"])
def test_defense_loss_is_ce_plus_aux(name):
  """defense_loss = CE(main) + the defense's aux loss (0 for none), by hand."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 1])
  aux = {}
  if name == "cas":
    aux = {f"cas/s{i}": rng.normal(size=(4, 3)).astype(np.float32) for i in range(2)}
    config = defenses.DefenseConfig(name="cas", beta=3.0)
    extra = 3.0 * (np_ce(aux["cas/s0"], labels) + np_ce(aux["cas/s1"], labels)) / 2
  elif name == "fsr":
    aux = {f"fsr/final/{p}": rng.normal(size=(4, 3)).astype(np.float32)
           for p in ("robust", "non_robust", "recalibrated")}
    config = defenses.DefenseConfig(name="fsr", lam_sep=0.5, lam_rec=2.0)
    order = np.argsort(-logits, axis=-1)
    y_wrong = np.where(order[:, 0] == labels, order[:, 1], order[:, 0])
    extra = (0.5 * (np_ce(aux["fsr/final/robust"], labels)
                    + np_ce(aux["fsr/final/non_robust"], y_wrong))
             + 2.0 * np_ce(aux["fsr/final/recalibrated"], labels))
  else:
    config = defenses.DefenseConfig()
    extra = 0.0
  got = losses.defense_loss(config)(
      ModelOutput(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in aux.items()}),
      jnp.asarray(labels))
  np.testing.assert_allclose(got, np_ce(logits, labels) + extra, rtol=1e-5)


# ---------------------------------------------------------------- bad input

def test_bad_attack_arguments_rejected(tiny):
  """Unknown norm, negative eps, negative steps and random_start without a key raise
  ValueErrors that name the value and what is allowed."""
  model_fn, x, labels = tiny
  with pytest.raises(ValueError, match=r"unknown norm 'l0'; allowed: linf, l2, l1"):
    attacks.pgd(model_fn, x, labels, jax.random.key(0), eps=0.1, step_size=0.01, steps=2,
                norm="l0")
  with pytest.raises(ValueError, match=r"unknown norm 'Linf'; allowed: linf, l2, l1"):
    attacks.fgsm(model_fn, x, labels, eps=0.1, norm="Linf")
  with pytest.raises(ValueError, match=r"eps must be >= 0, got -0.1"):
    attacks.pgd(model_fn, x, labels, jax.random.key(0), eps=-0.1, step_size=0.01, steps=2)
  with pytest.raises(ValueError, match=r"eps must be >= 0, got -0.03"):
    attacks.fgsm(model_fn, x, labels, eps=-0.03)
  with pytest.raises(ValueError, match=r"steps must be >= 0, got -1"):
    attacks.pgd(model_fn, x, labels, jax.random.key(0), eps=0.1, step_size=0.01, steps=-1)
  with pytest.raises(ValueError, match=r"random_start=True.* needs a PRNG key"):
    attacks.pgd(model_fn, x, labels, eps=0.1, step_size=0.01, steps=2)
  with pytest.raises(ValueError, match=r"needs >= 3 classes, got 2"):
    losses.dlr(ModelOutput(jnp.zeros((2, 2)), {}), jnp.array([0, 1]))
