"""CAS and FSR modules, their auxiliary losses and DefenseConfig, against NumPy references
re-derived from docs/method.md sections 1-2 (float64, computed from the modules' own params)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import defenses
from jaxdefense.defenses import cas, fsr
from jaxdefense.models import common
from tests.reference import np_ce

E = 1e-8


# ---------------------------------------------------------------- NumPy references

def np_conv3x3(x, k):
  """3x3 cross-correlation, stride 1, zero padding 1, no bias; x NHWC, k HWIO."""
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w, :] @ k[i, j] for i in range(3) for j in range(3))


def np_bn(x, params, stats, train):
  if train:
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))  # Batch stats, biased variance.
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"]


def np_convnet(x, params, stats, train):
  """conv3x3 - BN - ReLU - conv3x3 - BN - ReLU - conv3x3; also returns the BN batch stats."""
  batch = []
  for i in range(2):
    x = np_conv3x3(x, params[f"Conv_{i}"]["kernel"])
    batch.append((x.mean((0, 1, 2)), x.var((0, 1, 2))))
    x = np.maximum(np_bn(x, params[f"BatchNorm_{i}"], stats[f"BatchNorm_{i}"], train), 0)
  return np_conv3x3(x, params["Conv_2"]["kernel"]), batch


def np_gumbel(u):
  return -np.log(-np.log(u + E) + E)


def np_gumbel_sigmoid(r, tau, u1, u2):
  """The explicit two-way softmax of docs/method.md section 2.2, max-shifted for float64."""
  p = 1 / (1 + np.exp(-r))
  l1 = (np.log(p + E) + np_gumbel(u1)) / (tau + E)
  l2 = (np.log(1 - p + E) + np_gumbel(u2)) / (tau + E)
  top = np.maximum(l1, l2)
  return np.exp(l1 - top) / (np.exp(l1 - top) + np.exp(l2 - top))


def to_np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def randomise(tree, seed, low=-0.5, high=0.5):
  """Adds uniform noise to every leaf (makes BN scale/bias and running stats non-trivial)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda l: l + jnp.asarray(rng.uniform(low, high, l.shape), l.dtype), tree)


class RngProbe(nn.Module):
  """Draws the key a root-level module's first make_rng('gumbel') returns."""

  @nn.compact
  def __call__(self):
    return self.make_rng("gumbel")


# ---------------------------------------------------------------- CAS

@pytest.mark.parametrize("train", [False, True])
def test_cas_forward_matches_numpy(train):
  """CAS output and logits equal g = mean_HW f, a = g W + b, out = f * W[:, y]
  (y = labels in train mode, argmax(a) in eval mode)."""
  num_classes, n = 5, 8
  module = cas.CAS(num_classes, inits=common.TORCH_DEFAULT)
  f = jax.random.normal(jax.random.key(0), (n, 3, 4, 7))
  labels = jnp.arange(n, dtype=jnp.int32) % num_classes
  variables = module.init(jax.random.key(1), f, labels, train=train)
  (out, logits), state = module.apply(variables, f, labels, train=train,
                                      mutable=["intermediates"])

  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["bias"], np.float64)
  assert kernel.shape == (7, num_classes) and bias.shape == (num_classes,)
  fn = np.asarray(f, np.float64)
  a = fn.mean((1, 2)) @ kernel + bias
  y = np.asarray(labels) if train else a.argmax(-1)
  mask = kernel[:, y].T
  np.testing.assert_allclose(logits, a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["intermediates"]["mask"][0], mask, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out, fn * mask[:, None, None, :], rtol=1e-5, atol=1e-6)
  if not train:
    # The eval mask follows the head's own prediction, not the labels passed in.
    assert not np.array_equal(a.argmax(-1), np.asarray(labels))


def test_cas_train_and_eval_masks_differ_where_prediction_is_wrong():
  """Train mode masks with W[label], eval mode with W[argmax]; they agree exactly where the
  label equals the head's prediction."""
  module = cas.CAS(4, inits=common.TORCH_DEFAULT)
  f = jax.random.normal(jax.random.key(2), (16, 2, 2, 6))
  labels = jnp.arange(16, dtype=jnp.int32) % 4
  variables = module.init(jax.random.key(3), f, labels, train=True)
  out_train, logits = module.apply(variables, f, labels, train=True)
  out_eval, _ = module.apply(variables, f, labels, train=False)
  same = np.asarray(jnp.argmax(logits, -1) == labels)
  assert same.any() and (~same).any()
  np.testing.assert_array_equal(np.asarray(out_train)[same], np.asarray(out_eval)[same])
  assert np.all(np.any(np.asarray(out_train)[~same] != np.asarray(out_eval)[~same],
                       axis=(1, 2, 3)))


# ---------------------------------------------------------------- FSR

def _fsr_setup(tau=0.1, hidden=5, num_classes=3, shape=(4, 4, 4, 6)):
  module = fsr.FSR(num_classes, inits=common.TORCH_DEFAULT, tau=tau, hidden=hidden)
  f = jax.random.normal(jax.random.key(10), shape)
  variables = module.init({"params": jax.random.key(11)}, f, train=False, stochastic=False)
  variables = {"params": randomise(variables["params"], 12),
               "batch_stats": randomise(variables["batch_stats"], 13, 0.0, 0.5)}
  return module, f, variables


def _fsr_reference(f, variables, tau, train, u1, u2):
  p, s = to_np(variables["params"]), to_np(variables["batch_stats"])
  fn = np.asarray(f, np.float64)
  scores, sep_stats = np_convnet(fn, p["separation"], s["separation"], train)
  m = np_gumbel_sigmoid(scores, tau, u1, u2)
  f_r, f_nr = fn * m, fn * (1 - m)
  recal, rec_stats = np_convnet(f_nr, p["recalibration"], s["recalibration"], train)
  f_rec = f_nr + recal * (1 - m)
  head = lambda v: v.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
  parts = {"robust": head(f_r), "non_robust": head(f_nr), "recalibrated": head(f_rec)}
  return f_r + f_rec, parts, m, {"separation": sep_stats, "recalibration": rec_stats}


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_fsr_eval_forward_matches_numpy(tau):
  """Eval-mode FSR (running BN stats, U = 0.5) equals the NumPy re-derivation: mask,
  output f_r + f_rec and the shared head's three aux logits."""
  module, f, variables = _fsr_setup(tau=tau)
  (out, parts), state = module.apply(variables, f, train=False, stochastic=False,
                                     mutable=["intermediates"])
  half = np.full(f.shape, 0.5)
  ref_out, ref_parts, ref_mask, _ = _fsr_reference(f, variables, tau, False, half, half)
  assert 0.05 < ref_mask.mean() < 0.95  # A mask that is neither all-on nor all-off.
  np.testing.assert_allclose(state["intermediates"]["mask"][0], ref_mask, atol=2e-5)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)
  assert set(parts) == set(fsr.PARTS)
  for name in fsr.PARTS:
    np.testing.assert_allclose(parts[name], ref_parts[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_fsr_train_forward_matches_numpy(tau):
  """Train-mode FSR (batch BN stats, U ~ Uniform drawn from the 'gumbel' rng exactly as the
  module does) equals the NumPy re-derivation; running stats move with PyTorch momentum 0.1."""
  module, f, variables = _fsr_setup(tau=tau)
  key = jax.random.key(7)
  (out, parts), state = module.apply(variables, f, train=True, stochastic=True,
                                     rngs={"gumbel": key},
                                     mutable=["intermediates", "batch_stats"])
  u1, u2 = np.asarray(jax.random.uniform(RngProbe().apply({}, rngs={"gumbel": key}),
                                         (2,) + f.shape, jnp.float32), np.float64)
  ref_out, ref_parts, ref_mask, batch = _fsr_reference(f, variables, tau, True, u1, u2)
  np.testing.assert_allclose(state["intermediates"]["mask"][0], ref_mask, atol=1e-4)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=2e-4)
  for name in fsr.PARTS:
    np.testing.assert_allclose(parts[name], ref_parts[name], rtol=1e-4, atol=1e-4)
  # The random mask differs from the deterministic U = 0.5 one.
  half = np.full(f.shape, 0.5)
  assert np.abs(ref_mask - _fsr_reference(f, variables, tau, True, half, half)[2]).max() > 0.1
  # Running averages: new = 0.9 old + 0.1 batch (flax keeps the biased batch variance).
  old = to_np(variables["batch_stats"])
  for net in ("separation", "recalibration"):
    for i, (mean, var) in enumerate(batch[net]):
      new = state["batch_stats"][net][f"BatchNorm_{i}"]
      before = old[net][f"BatchNorm_{i}"]
      np.testing.assert_allclose(new["mean"], 0.9 * before["mean"] + 0.1 * mean,
                                 rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(new["var"], 0.9 * before["var"] + 0.1 * var,
                                 rtol=1e-4, atol=1e-5)


def test_fsr_eval_is_deterministic_and_train_depends_on_rng():
  """Eval mode needs no 'gumbel' rng and repeats exactly; train mode: same key, same
  output; different keys, different outputs."""
  module, f, variables = _fsr_setup()
  out1, _ = module.apply(variables, f, train=False, stochastic=False)
  out2, _ = module.apply(variables, f, train=False, stochastic=False)
  np.testing.assert_array_equal(out1, out2)
  train_apply = functools.partial(module.apply, train=True, stochastic=True,
                                  mutable=["batch_stats"])

  def train_out(seed):
    (out, _), _ = train_apply(variables, f, rngs={"gumbel": jax.random.key(seed)})
    return np.asarray(out)
  np.testing.assert_array_equal(train_out(1), train_out(1))
  assert np.abs(train_out(1) - train_out(2)).max() > 1e-3
  # Train-mode BN without the noise is deterministic too, and differs from the noisy one.
  (det, _), _ = module.apply(variables, f, train=True, stochastic=False, mutable=["batch_stats"])
  assert np.abs(np.asarray(det) - train_out(1)).max() > 1e-3


def test_fsr_stochastic_needs_gumbel_rng():
  """Train mode with Gumbel noise and no 'gumbel' rng stream fails loudly."""
  module, f, variables = _fsr_setup()
  with pytest.raises(Exception, match="gumbel"):
    module.apply(variables, f, train=True, stochastic=True, mutable=["batch_stats"])


# ---------------------------------------------------------------- Gumbel-sigmoid

@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0, 3.0])
def test_gumbel_sigmoid_equals_two_way_softmax(tau):
  """gumbel_sigmoid equals softmax([l1, l2] / tau)[0] on moderate scores, with U = 0.5
  (key None) and with U drawn from the key as (2,) + shape uniforms."""
  r = jax.random.normal(jax.random.key(0), (3, 5, 7)) * 3
  rn = np.asarray(r, np.float64)
  half = np.full(r.shape, 0.5)
  np.testing.assert_allclose(fsr.gumbel_sigmoid(r, tau, None),
                             np_gumbel_sigmoid(rn, tau, half, half), atol=1e-5)
  # With U = 0.5 the Gumbel terms cancel: m = sigmoid((log p - log(1-p)) / tau) ~ sigmoid(r/tau).
  np.testing.assert_allclose(fsr.gumbel_sigmoid(r, tau, None), 1 / (1 + np.exp(-rn / tau)),
                             atol=1e-4)
  key = jax.random.key(4)
  u1, u2 = np.asarray(jax.random.uniform(key, (2,) + r.shape, jnp.float32), np.float64)
  np.testing.assert_allclose(fsr.gumbel_sigmoid(r, tau, key),
                             np_gumbel_sigmoid(rn, tau, u1, u2), atol=5e-5)


def _naive_gumbel_sigmoid(r, tau, key):
  """The unstable form exp(l1/tau) / (exp(l1/tau) + exp(l2/tau)) in float32."""
  p = jax.nn.sigmoid(r)
  u1, u2 = jax.random.uniform(key, (2,) + r.shape, jnp.float32)
  g = lambda u: -jnp.log(-jnp.log(u + E) + E)
  e1 = jnp.exp((jnp.log(p + E) + g(u1)) / (tau + E))
  e2 = jnp.exp((jnp.log(1 - p + E) + g(u2)) / (tau + E))
  return e1 / (e1 + e2)


@pytest.mark.parametrize("tau", [0.001, 0.01, 0.1])
def test_gumbel_sigmoid_saturated_scores_finite(tau):
  """For saturated scores (+-1e4, +-80, 0) the mask stays finite and in [0, 1] and its
  gradient is finite, including small tau where the naive exp-softmax overflows to NaN."""
  r = jnp.tile(jnp.array([1e4, -1e4, 80.0, -80.0, 0.0, 30.0, -30.0], jnp.float32), 200)
  key = jax.random.key(1)
  if tau <= 0.01:  # l / tau > 88 is common here: exp overflows, inf / inf = NaN.
    assert not np.all(np.isfinite(_naive_gumbel_sigmoid(r, tau, key)))
  for k in (None, key):
    m = np.asarray(fsr.gumbel_sigmoid(r, tau, k))
    assert np.all(np.isfinite(m)) and np.all((m >= 0) & (m <= 1))
    grad_fn = jax.grad(lambda v: jnp.sum(fsr.gumbel_sigmoid(v, tau, k)))
    for grad in (grad_fn(r), jax.jit(grad_fn)(r)):  # XLA may rewrite the jitted form.
      assert np.all(np.isfinite(np.asarray(grad)))
  # Deterministic limits: a very robust score gives m = 1, a very non-robust one m = 0.
  m = np.asarray(fsr.gumbel_sigmoid(r[:4], tau, None))
  np.testing.assert_allclose(m, [1, 0, 1, 0], atol=1e-6)


# ---------------------------------------------------------------- auxiliary losses

def test_cas_aux_loss_matches_hand_computation():
  """CAS aux loss = beta * mean over CAS modules of CE(a_k, y); non-CAS entries ignored."""
  rng = np.random.default_rng(0)
  labels = np.array([0, 3, 2, 1, 3], np.int32)
  aux = {f"cas/layer4.{i}": rng.normal(size=(5, 4)).astype(np.float32) for i in range(3)}
  aux["fsr/final/robust"] = rng.normal(size=(5, 4)).astype(np.float32)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  config = defenses.DefenseConfig(name="cas", beta=2.5)
  loss, parts = defenses.aux_loss(config, jnp.asarray(logits), aux, jnp.asarray(labels))
  ce = np.mean([np_ce(aux[f"cas/layer4.{i}"], labels) for i in range(3)], axis=0)
  assert loss.shape == (5,)
  np.testing.assert_allclose(loss, 2.5 * ce, rtol=1e-5)
  np.testing.assert_allclose(parts["cas_ce"], ce, rtol=1e-5)


def test_most_likely_wrong():
  """y_wrong is the top class when it is wrong, else the second-ranked class."""
  logits = jnp.array([[3.0, 1.0, 2.0, 0.0],   # top 0 == label 0 -> second 2
                      [3.0, 1.0, 2.0, 0.0],   # top 0 != label 2 -> 0
                      [0.1, 0.2, 0.3, 5.0],   # top 3 == label 3 -> second 2
                      [0.1, 0.2, 0.3, 5.0]])  # top 3 != label 1 -> 3
  labels = jnp.array([0, 2, 3, 1])
  np.testing.assert_array_equal(fsr.most_likely_wrong(logits, labels), [2, 0, 2, 3])


def test_fsr_aux_loss_matches_hand_computation():
  """FSR aux loss = lam_sep (CE(robust, y) + CE(non_robust, y_wrong)) + lam_rec
  CE(recalibrated, y), each CE averaged over the FSR sites; y_wrong from the main logits,
  with examples whose top prediction is right and wrong."""
  rng = np.random.default_rng(1)
  labels = np.array([1, 0, 2, 2], np.int32)
  logits = np.array([[0.0, 4.0, 1.0], [0.0, 4.0, 1.0], [2.0, 0.5, 3.0], [3.0, 0.5, 2.0]],
                    np.float32)
  y_wrong = np.array([2, 1, 0, 0])  # right, wrong, right, wrong
  sites = ("layer3.1", "layer4.1")
  aux = {f"fsr/{s}/{p}": rng.normal(size=(4, 3)).astype(np.float32)
         for s in sites for p in fsr.PARTS}
  aux["cas/layer4.0"] = rng.normal(size=(4, 3)).astype(np.float32)  # Ignored.
  config = defenses.DefenseConfig(name="fsr", lam_sep=0.7, lam_rec=1.3)
  loss, parts = defenses.aux_loss(config, jnp.asarray(logits), aux, jnp.asarray(labels))
  mean = lambda part, y: np.mean([np_ce(aux[f"fsr/{s}/{part}"], y) for s in sites], axis=0)
  robust, non_robust = mean("robust", labels), mean("non_robust", y_wrong)
  recal = mean("recalibrated", labels)
  np.testing.assert_allclose(loss, 0.7 * (robust + non_robust) + 1.3 * recal, rtol=1e-5)
  np.testing.assert_allclose(parts["fsr_robust_ce"], robust, rtol=1e-5)
  np.testing.assert_allclose(parts["fsr_non_robust_ce"], non_robust, rtol=1e-5)
  np.testing.assert_allclose(parts["fsr_recalibrated_ce"], recal, rtol=1e-5)
  # One site alone: no averaging.
  one = {k: v for k, v in aux.items() if "layer4.1" in k}
  loss1, _ = defenses.aux_loss(config, jnp.asarray(logits), one, jnp.asarray(labels))
  np.testing.assert_allclose(
      loss1, 0.7 * (np_ce(one["fsr/layer4.1/robust"], labels)
                    + np_ce(one["fsr/layer4.1/non_robust"], y_wrong))
      + 1.3 * np_ce(one["fsr/layer4.1/recalibrated"], labels), rtol=1e-5)


def test_aux_loss_none_and_missing_outputs():
  """'none' adds zero; a configured CAS/FSR with no outputs of its kind raises."""
  labels = jnp.array([0, 1])
  logits = jnp.zeros((2, 3))
  loss, parts = defenses.aux_loss(defenses.DefenseConfig(), logits, {}, labels)
  np.testing.assert_array_equal(loss, [0.0, 0.0])
  assert parts == {}
  for name in ("cas", "fsr"):
    with pytest.raises(ValueError, match=f"'{name}' is configured but the model produced no"):
      defenses.aux_loss(defenses.DefenseConfig(name=name), logits, {}, labels)


# ---------------------------------------------------------------- DefenseConfig

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="trades"), r"unknown defense 'trades'; allowed: none, cas, fsr"),
    (dict(name="cas", beta=-1.0), r"defense.beta must be >= 0, got -1.0"),
    (dict(name="fsr", lam_sep=-0.5), r"defense.lam_sep must be >= 0, got -0.5"),
    (dict(name="fsr", lam_rec=-2), r"defense.lam_rec must be >= 0, got -2"),
    (dict(name="fsr", tau=0.0), r"defense.tau must be > 0, got 0.0"),
    (dict(name="fsr", tau=-0.1), r"defense.tau must be > 0, got -0.1"),
    (dict(name="fsr", hidden=0), r"defense.hidden must be >= 1, got 0"),
    (dict(name="cas", beta=float("nan")), r"defense.beta must be >= 0, got nan"),
    (dict(name="cas", sites=()), r"defense.sites must name at least one insertion point"),
])
def test_defense_config_rejects_bad_values(kwargs, message):
  """DefenseConfig names the bad field, its value and what is allowed."""
  with pytest.raises(ValueError, match=message):
    defenses.DefenseConfig(**kwargs)


def test_defense_config_sites_normalised_and_resolved():
  """A single site string becomes a 1-tuple; globs expand against insertion points and an
  unmatched pattern lists what is available."""
  assert defenses.DefenseConfig(name="cas", sites="layer4.*").sites == ("layer4.*",)
  assert defenses.DefenseConfig(name="cas", sites=["a", "b"]).sites == ("a", "b")
  available = ("stem", "layer1.0", "layer1.1", "layer2.0")
  assert defenses.resolve_sites(("layer1.*", "stem"), available, "Net") == {
      "layer1.0", "layer1.1", "stem"}
  with pytest.raises(ValueError, match=r"'layer9.0' is not an insertion point of Net; "
                                       r"available: stem, layer1.0, layer1.1, layer2.0"):
    defenses.resolve_sites(("layer9.0",), available, "Net")
