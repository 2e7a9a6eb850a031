"""Backbones: shapes and parameter counts (big models only through jax.eval_shape), the
authors' defense placements, configurable placement, input checks, train/eval behaviour and
the authors' weight-initialisation schemes (statistical checks on small real inits)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import defenses, models
from jaxdefense.models import resnet, vgg

ARCHS = ("resnet18", "resnet34", "resnet50", "preact_resnet18", "wrn34_10", "wrn28_10", "vgg16")

# Undefended parameter counts for 10 classes (the standard CIFAR variants) and the width
# of the features the linear classifier sees.
BASE_PARAMS = {
    "resnet18": (11_173_962, 512),
    "resnet34": (21_282_122, 512),
    "resnet50": (23_520_842, 2048),
    # Kuang Liu's 11,171,146 plus the final BN (512 scale + 512 bias) before pooling.
    "preact_resnet18": (11_172_170, 512),
    "wrn34_10": (46_160_474, 640),
    "wrn28_10": (36_479_194, 640),
    "vgg16": (15_253_578, 512),
}

# The authors' placements: site -> (channels, spatial size on 32x32 inputs).
CAS_SITES = {
    "resnet18": {"layer4.0": (512, 4), "layer4.1": (512, 4)},
    "resnet34": {f"layer4.{b}": (512, 4) for b in range(3)},
    "resnet50": {f"layer4.{b}": (2048, 4) for b in range(3)},
    "preact_resnet18": {"layer4.0": (512, 4), "layer4.1": (512, 4)},
    "wrn34_10": {"block3.4.preact": (640, 8), "final": (640, 8)},
    "wrn28_10": {"block3.3.preact": (640, 8), "final": (640, 8)},
    "vgg16": {f"stage5.{c}": (512, 2) for c in range(3)},
}
FSR_SITES = {
    "resnet18": {"layer4.1": (512, 4)},
    "resnet34": {"layer4.2": (512, 4)},
    "resnet50": {"layer4.2": (2048, 4)},
    "preact_resnet18": {"final": (512, 4)},
    "wrn34_10": {"final": (640, 8)},
    "wrn28_10": {"final": (640, 8)},
    "vgg16": {"stage4.2": (512, 4)},
}


def find_masks(state, prefix):
  """{module name: sown mask} for every module named prefix_* anywhere in the
  intermediates tree (a defense on a WRN pre-activation lives inside its block)."""
  found = {}
  def visit(tree):
    for key, value in tree.items():
      if key.startswith(prefix) and "mask" in value:
        found[key] = value["mask"][0]
      elif isinstance(value, dict):
        visit(value)
  visit(dict(state.get("intermediates", {})))
  return found


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def fsr_params(channels, classes, hidden=64):
  """Two conv nets (3 bias-free 3x3 convs, 2 BNs each) plus the shared Linear head."""
  net = 9 * channels * hidden + 9 * hidden * hidden + 9 * hidden * channels + 4 * hidden
  return 2 * net + channels * classes + classes


def abstract_run(model, size, batch=2, labels=None, train=False):
  """Shapes of (variables, output, state) of init + one apply, without computing anything."""
  def run(key):
    variables = models.init(model, key, (size, size, 3))
    out, state = model.apply(variables, jnp.zeros((batch, size, size, 3)), labels, train=train,
                             rngs={"gumbel": key}, mutable=["intermediates", "batch_stats"])
    return variables, out, state
  return jax.eval_shape(run, jax.random.key(0))


@pytest.mark.parametrize("num_classes, size", [(10, 32), (100, 32), (10, 64), (100, 64)])
@pytest.mark.parametrize("defense", ["none", "cas", "fsr"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_params_and_default_placement(arch, defense, num_classes, size):
  """Logit/aux shapes, parameter counts (standard count + the defense's hand-counted
  modules) and the authors' placement (aux names, feature-map shape at each site)."""
  model = models.create(arch, num_classes=num_classes,
                        defense=defenses.DefenseConfig(name=defense))
  variables, out, state = abstract_run(model, size)
  base, features = BASE_PARAMS[arch]
  expected = base + (num_classes - 10) * (features + 1)
  scale = size // 32
  if defense == "none":
    assert out.aux == {} and "intermediates" not in state
  elif defense == "cas":
    sites = CAS_SITES[arch]
    expected += sum(c * num_classes + num_classes for c, _ in sites.values())
    assert sorted(out.aux) == sorted(f"cas/{s}" for s in sites)
    masks = find_masks(state, "cas_")
    assert sorted(masks) == sorted("cas_" + s.replace(".", "_") for s in sites)
    for site, (channels, _) in sites.items():
      assert masks["cas_" + site.replace(".", "_")].shape == (2, channels)
  else:
    sites = FSR_SITES[arch]
    expected += sum(fsr_params(c, num_classes) for c, _ in sites.values())
    assert sorted(out.aux) == sorted(f"fsr/{s}/{p}" for s in sites
                                     for p in ("robust", "non_robust", "recalibrated"))
    masks = find_masks(state, "fsr_")
    assert sorted(masks) == sorted("fsr_" + s.replace(".", "_") for s in sites)
    for site, (channels, spatial) in sites.items():
      mask = masks["fsr_" + site.replace(".", "_")]
      assert mask.shape == (2, spatial * scale, spatial * scale, channels)
  assert out.logits.shape == (2, num_classes) and out.logits.dtype == jnp.float32
  for v in out.aux.values():
    assert v.shape == (2, num_classes)
  assert count(variables["params"]) == expected


def test_headline_parameter_counts():
  """WRN-34-10 and ResNet-18 have the literature's parameter counts (46.2M, 11.2M)."""
  for arch, n in (("wrn34_10", 46_160_474), ("resnet18", 11_173_962)):
    variables, _, _ = abstract_run(models.create(arch, num_classes=10), 32)
    assert count(variables["params"]) == n


def test_insertion_points_listing():
  """insertion_points names every hookable place of each family."""
  assert models.insertion_points("resnet18") == (
      "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
      "layer4.0", "layer4.1")
  assert models.insertion_points("preact_resnet18")[-1] == "final"
  points = models.insertion_points("wide_resnet", depth=10, width=1)
  assert points == ("stem", "block1.0.preact", "block1.0", "block2.0.preact", "block2.0",
                    "block3.0.preact", "block3.0", "final")
  assert len(models.insertion_points("wrn34_10")) == 1 + 3 * 5 * 2 + 1
  assert models.insertion_points("vgg16")[:3] == ("stage1.0", "stage1.1", "stage2.0")
  assert len(models.insertion_points("vgg16")) == 13


@pytest.mark.parametrize("arch, defense, sites, expected", [
    ("resnet18", "cas", ("layer3.*",), {"layer3.0": (256, 8), "layer3.1": (256, 8)}),
    ("resnet18", "cas", ("stem", "layer*.1"), {"stem": (64, 32), "layer1.1": (64, 32),
                                               "layer2.1": (128, 16), "layer3.1": (256, 8),
                                               "layer4.1": (512, 4)}),
    ("resnet18", "fsr", ("layer2.0",), {"layer2.0": (128, 16)}),
    ("wrn34_10", "cas", ("block3.*.preact",),
     {"block3.0.preact": (320, 16)} | {f"block3.{b}.preact": (640, 8) for b in range(1, 5)}),
    ("vgg16", "fsr", ("stage3.2", "stage4.?"), {"stage3.2": (256, 8), "stage4.0": (512, 4),
                                                "stage4.1": (512, 4), "stage4.2": (512, 4)}),
])
def test_configurable_placement(arch, defense, sites, expected):
  """DefenseConfig.sites moves the defense (names and globs); the modules sit on feature
  maps of the expected channels (and, for FSR, spatial size)."""
  model = models.create(arch, num_classes=10,
                        defense=defenses.DefenseConfig(name=defense, sites=sites))
  _, out, state = abstract_run(model, 32)
  if defense == "cas":
    assert sorted(out.aux) == sorted(f"cas/{s}" for s in expected)
  else:
    assert sorted({k.split("/")[1] for k in out.aux}) == sorted(expected)
  masks = find_masks(state, f"{defense}_")
  assert len(masks) == len(expected)
  for site, (channels, spatial) in expected.items():
    mask = masks[f"{defense}_" + site.replace(".", "_")]
    if defense == "cas":
      assert mask.shape == (2, channels)
    else:
      assert mask.shape == (2, spatial, spatial, channels)


# ---------------------------------------------------------------- bad input

def _init(model, x, labels=None, train=False):
  """Traces init + apply on concrete inputs without computing (errors raise at trace)."""
  def run():
    variables = model.init({"params": jax.random.key(0), "gumbel": jax.random.key(1)},
                           x, labels, train=train)
    return model.apply(variables, x, labels, train=train, rngs={"gumbel": jax.random.key(2)},
                       mutable=["batch_stats"])
  return jax.eval_shape(run)


def test_rank3_input_rejected():
  """A single unbatched image is rejected with its shape and the expected layout."""
  model = models.create("resnet18", num_classes=10)
  with pytest.raises(ValueError, match=r"rank 4 \(N, H, W, C\).*got shape \(32, 32, 3\)"):
    _init(model, jnp.zeros((32, 32, 3)))


def test_uint8_input_rejected():
  """uint8 images are rejected, naming the dtype and how to convert."""
  model = models.create("wrn34_10", num_classes=10)
  with pytest.raises(TypeError, match=r"floating point in \[0, 1\]; got dtype uint8.*255"):
    _init(model, jnp.zeros((2, 32, 32, 3), jnp.uint8))


def test_missing_insertion_point_rejected():
  """A defense at a site the backbone lacks lists the available insertion points."""
  model = models.create("resnet18", num_classes=10,
                        defense=defenses.DefenseConfig(name="cas", sites=("block3.4.preact",)))
  with pytest.raises(ValueError, match=r"'block3.4.preact' is not an insertion point of "
                                       r"ResNet; available: stem, layer1.0, .*layer4.1"):
    _init(model, jnp.zeros((2, 32, 32, 3)))
  model = models.create("vgg16", num_classes=10,
                        defense=defenses.DefenseConfig(name="fsr", sites=("final",)))
  with pytest.raises(ValueError, match=r"'final' is not an insertion point of VGG; "
                                       r"available: stage1.0"):
    _init(model, jnp.zeros((2, 32, 32, 3)))


@pytest.mark.parametrize("labels, bad", [([0, 10], 10), ([-1, 3], -1), ([99, 0], 99)])
def test_label_out_of_range_rejected(labels, bad):
  """Concrete out-of-range labels are named with the allowed range."""
  model = models.create("resnet18", num_classes=10, defense=defenses.DefenseConfig(name="cas"))
  with pytest.raises(ValueError, match=rf"label {bad} is out of range: labels must lie in "
                                       r"\[0, 9\] for num_classes=10"):
    _init(model, jnp.zeros((2, 32, 32, 3)), jnp.array(labels), train=True)


def test_float_labels_rejected():
  """Non-integer labels are rejected with their dtype."""
  model = models.create("resnet18", num_classes=10)
  with pytest.raises(TypeError, match=r"integer class indices; got dtype float32"):
    _init(model, jnp.zeros((2, 32, 32, 3)), jnp.array([0.0, 1.0]))


def test_unknown_architecture_rejected():
  """An unknown architecture name lists the known ones."""
  with pytest.raises(ValueError, match=r"unknown architecture 'resnet19'; allowed: .*resnet18, "
                                       r"resnet34, .*wrn34_10.*vgg16"):
    models.create("resnet19", num_classes=10)


def test_cas_train_without_labels_rejected():
  """CAS in train mode needs the ground-truth labels and says so."""
  model = models.create("wrn34_10", num_classes=10, defense=defenses.DefenseConfig(name="cas"))
  with pytest.raises(ValueError, match=r"CAS in training mode .* pass labels=\.\.\."):
    _init(model, jnp.zeros((2, 32, 32, 3)), None, train=True)
  _init(model, jnp.zeros((2, 32, 32, 3)), None, train=False)  # Eval mode needs no labels.


def test_bad_architecture_fields_rejected():
  """A WRN depth that is not 6n + 4 and num_classes < 2 are rejected."""
  with pytest.raises(ValueError, match=r"depth must be 6n \+ 4.*got 12"):
    _init(models.create("wide_resnet", num_classes=10, depth=12, width=1),
          jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"num_classes must be >= 2, got 1"):
    _init(models.create("resnet18", num_classes=1), jnp.zeros((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"at least 32x32; got 16x16"):
    _init(models.create("vgg16", num_classes=10), jnp.zeros((2, 16, 16, 3)))


# ---------------------------------------------------------------- train / eval behaviour

@pytest.mark.parametrize("defense", ["none", "cas", "fsr"])
def test_train_updates_batch_stats_and_eval_is_deterministic(defense):
  """Train mode updates every BN's running stats; eval mode is deterministic, needs no
  rng and does not depend on the labels; train and eval outputs differ."""
  model = models.create("wide_resnet", num_classes=5, depth=10, width=1,
                        defense=defenses.DefenseConfig(name=defense))
  variables = models.init(model, jax.random.key(0), (8, 8, 3))
  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 3))
  labels = jnp.arange(6) % 5
  out, state = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, x, labels, rngs={"gumbel": jax.random.key(2)})
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(state["batch_stats"])
  assert len(old) == len(new) > 0
  for a, b in zip(old, new):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
  eval_apply = jax.jit(functools.partial(model.apply, train=False))
  eval1 = eval_apply(variables, x, labels)
  eval2 = eval_apply(variables, x, None)
  eval3 = eval_apply(variables, x, None)
  for other in (eval2, eval3):
    np.testing.assert_array_equal(eval1.logits, other.logits)
    for k in eval1.aux:
      np.testing.assert_array_equal(eval1.aux[k], other.aux[k])
  assert np.abs(np.asarray(eval1.logits) - np.asarray(out.logits)).max() > 1e-4
  assert sorted(eval1.aux) == sorted(out.aux)


# ---------------------------------------------------------------- initialisation

def _kernels(params, ndim=4):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat
          if p[-1].key == "kernel" and v.ndim == ndim}


def test_wide_resnet_init_follows_authors():
  """WRN: conv kernels N(0, 2 / (k*k*out)) (He fan_out, normal not uniform), Linear
  weights U(+-1/sqrt(fan_in)), zero Linear bias, BN scale 1 / bias 0; hosted FSR convs
  use the same He scheme."""
  model = models.create("wide_resnet", num_classes=10, depth=10, width=2,
                        defense=defenses.DefenseConfig(name="fsr"))
  params = models.init(model, jax.random.key(0), (8, 8, 3))["params"]
  convs = _kernels(params)
  assert len(convs) == 1 + 3 * 2 + 3 + 6  # stem, 2 per block, 3 shortcuts, FSR's 6.
  z = []
  for name, k in convs.items():
    std = math.sqrt(2.0 / (k.shape[0] * k.shape[1] * k.shape[3]))
    if k.size >= 10_000:
      assert abs(k.std() / std - 1) < 0.05, name
    z.append((k / std).ravel())
  z = np.concatenate(z)
  assert z.size > 100_000
  assert abs(z.std() - 1) < 0.01 and abs(z.mean()) < 0.01
  assert np.abs(z).max() > 3.5  # Gaussian tails: neither uniform nor truncated at 2 std.
  assert abs(np.mean(np.abs(z) > 2) - 0.0455) < 0.005
  fc = params["fc"]
  bound = 1 / math.sqrt(fc["kernel"].shape[0])
  assert np.abs(fc["kernel"]).max() <= bound and np.abs(fc["kernel"]).max() > 0.9 * bound
  np.testing.assert_array_equal(fc["bias"], 0.0)
  np.testing.assert_array_equal(params["fsr_final"]["head"]["bias"], 0.0)
  np.testing.assert_array_equal(params["final_bn"]["scale"], 1.0)
  np.testing.assert_array_equal(params["final_bn"]["bias"], 0.0)


def test_resnet_init_follows_pytorch_defaults():
  """ResNet: conv kernels U(+-1/sqrt(fan_in)) (PyTorch's kaiming_uniform(a=sqrt(5))),
  Linear weight and bias U(+-1/sqrt(fan_in)); CAS head likewise."""
  model = resnet.ResNet(num_classes=10, stage_sizes=(1, 1),
                        defense=defenses.DefenseConfig(name="cas"))
  params = models.init(model, jax.random.key(0), (8, 8, 3))["params"]
  convs = _kernels(params)
  assert len(convs) == 6  # stem, 2 + 2 block convs, 1 shortcut.
  for name, k in convs.items():
    bound = 1 / math.sqrt(k.shape[0] * k.shape[1] * k.shape[2])
    assert np.abs(k).max() <= bound, name
    if k.size >= 10_000:
      assert np.abs(k).max() > 0.99 * bound, name
      assert abs(k.std() / (bound / math.sqrt(3)) - 1) < 0.03, name
      assert abs(np.mean(np.abs(k) < bound / 2) - 0.5) < 0.03, name  # Flat, not bell-shaped.
  for dense in (params["linear"], params["cas_layer2_0"]):
    bound = 1 / math.sqrt(128)
    for leaf in (dense["kernel"], dense["bias"]):
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.5 * bound


def test_vgg_init_follows_fsr_code():
  """VGG: conv kernels He-normal fan_out, zero conv biases, Linear N(0, 0.01), zero bias."""
  model = vgg.VGG(num_classes=10, stages=((32,), (64, 64)))
  params = models.init(model, jax.random.key(0), (8, 8, 3))["params"]
  k = np.asarray(params["stage2_conv1"]["kernel"])
  assert abs(k.std() / math.sqrt(2 / (9 * 64)) - 1) < 0.05
  for name in ("stage1_conv0", "stage2_conv0", "stage2_conv1", "fc0", "fc1", "classifier"):
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  w = np.concatenate([np.asarray(params[n]["kernel"]).ravel() for n in ("fc0", "fc1")])
  assert abs(w.std() / 0.01 - 1) < 0.02 and np.abs(w).max() > 0.035
