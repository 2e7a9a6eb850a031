"""Every config file: its docstring starts with the command that runs it, and each paper
recipe resolves to the values of the authors' script (file:line of the script as read,
bymavis/CAS_ICLR2021 @057fc63, wkim97/FSR @aa83b86, yaodongyu/TRADES @6e8e11b,
YisenWang/MART @2d83e17). Milestones are completed epochs: a script's `epoch >= 75` with
1-based epochs drops after 74."""
import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest

from jaxdefense import defenses, models
from jaxdefense.config import spec
from jaxdefense.data import batching
from jaxdefense.training import optim, train_state
from tests.helpers import ROOT, load_config as load

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


RECIPES = {
    # Standard_Adv_Training/train.py: max_epoch 200 (L38), lr 0.1 (L40), wd 1e-4 (L41),
    # MultiStepLR [75, 90] stepped at the start of 1-based epochs (L88-96), eps 8/255 (L30),
    # step 2/255 (L32), 10 steps (L34), beta 2 (L56), CAS CE in the attack loss (reg_attack).
    ("cas", "resnet18,pgd_at"): {
        "model.arch": "resnet18", "defense.name": "cas", "defense.beta": 2.0,
        "objective.name": "pgd_at", "train.epochs": 200, "train.batch_size": 128,
        "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
        "optim.milestones": (74, 89), "objective.attack.eps": 8 / 255,
        "objective.attack.step_size": 2 / 255, "objective.attack.steps": 10,
        "objective.attack.loss": "defense"},
    # Trades/train_trades_cifar10_cas.py: 100 epochs (L22), wd 5e-4 (L24-29), lr drops at
    # epoch >= 75, 90, 100 (L219-229), eps 0.031, 10 steps, step 0.007, TRADES beta 4.0
    # (L32-38), CAS beta 2.0 (trades_reg L48).
    ("cas", "wrn34_10,trades"): {
        "model.arch": "wrn34_10", "objective.name": "trades", "objective.beta": 4.0,
        "train.epochs": 100, "optim.weight_decay": 5e-4, "optim.milestones": (74, 89, 99),
        "objective.attack.eps": 0.031, "objective.attack.step_size": 0.007,
        "objective.attack.steps": 10, "defense.beta": 2.0},
    # MART/train_mart_cas.py: 120 epochs (L23), wd 2e-4 (L25-30), drops at >= 75/90/100
    # (L117-127), MART beta 5.0 (L39), eps 0.031, step 0.007; VGG16_cas.py: Linear-BN-ReLU
    # classifier (L54-60), PyTorch default init, CAS on the 3 convolutions of layer5.
    ("cas", "vgg16,mart"): {
        "model.arch": "vgg16", "model.kwargs.classifier_batchnorm": True,
        "model.kwargs.init_scheme": "torch", "objective.name": "mart", "objective.beta": 5.0,
        "train.epochs": 120, "optim.weight_decay": 2e-4, "optim.milestones": (74, 89, 99),
        "objective.attack.eps": 0.031, "objective.attack.step_size": 0.007},
    # FSR train.py: 100 epochs (L34), bs 128 (L33), lr 0.1 (L32), SGD 0.9 wd 5e-4 (L105),
    # lr drops at epoch >= 75, 90 (L119-126), eps 8 (L37), alpha 0.25 -> 2/255 (L38),
    # 10 steps (L116), lam_sep = lam_rec = 1 (L30-31), tau 0.1 (L39).
    ("fsr", "wrn34_10,fsr,cifar10"): {
        "model.arch": "wrn34_10", "defense.name": "fsr", "objective.name": "pgd_at",
        "train.epochs": 100, "train.batch_size": 128, "optim.lr": 0.1,
        "optim.weight_decay": 5e-4, "optim.milestones": (74, 89),
        "objective.attack.eps": 8 / 255, "objective.attack.step_size": 2 / 255,
        "objective.attack.steps": 10, "defense.lam_sep": 1.0, "defense.lam_rec": 1.0,
        "defense.tau": 0.1},
    # FSR run.sh for SVHN: --lr 0.01 --alpha 0.125 (step 1/255).
    ("fsr", "resnet18,none,svhn"): {
        "data.name": "svhn", "defense.name": "none", "optim.lr": 0.01,
        "objective.attack.step_size": 1 / 255, "optim.milestones": (74, 89)},
    # TRADES train_trades_cifar10.py: bs 128 (L16), 76 epochs (L20), wd 2e-4 (L22), lr 0.1
    # (L24), momentum 0.9 (L26), eps 0.031 (L30), 10 steps (L32), step 0.007 (L34), beta 6
    # (L36); lr drops at epoch >= 75 (L137-147), the later ones past epoch 76.
    ("trades", None): {
        "model.arch": "wrn34_10", "objective.name": "trades", "objective.beta": 6.0,
        "train.epochs": 76, "train.batch_size": 128, "optim.lr": 0.1, "optim.momentum": 0.9,
        "optim.weight_decay": 2e-4, "optim.milestones": (74,), "objective.attack.eps": 0.031,
        "objective.attack.step_size": 0.007, "objective.attack.steps": 10},
    # MART train_wideresnet.py: bs 128 (L21), 90 epochs (L25), wd 7e-4 (L27), lr 0.1 (L29),
    # eps 0.031 (L35), 10 steps (L37), step 0.007 (L39), beta 6 (L41); drops at >= 75, 90
    # (>= 100 past epoch 90) (L109-119).
    ("mart", None): {
        "model.arch": "wrn34_10", "objective.name": "mart", "objective.beta": 6.0,
        "train.epochs": 90, "optim.lr": 0.1, "optim.weight_decay": 7e-4,
        "optim.milestones": (74, 89), "objective.attack.eps": 0.031,
        "objective.attack.step_size": 0.007, "objective.attack.steps": 10},
    # MART train_resnet.py: 120 epochs, wd 3.5e-3, lr 0.01, beta 5.0.
    ("mart", "resnet18"): {
        "model.arch": "resnet18", "train.epochs": 120, "optim.lr": 0.01,
        "optim.weight_decay": 3.5e-3, "objective.beta": 5.0, "optim.milestones": (74, 89, 99)},
    # CIFS CIFAR10_Res18_CIFS.py (HanshuYAN/CIFS @2e68025): bs 128 (L20), Joint attack loss
    # (L24), beta_cls 2 (L25), 120 epochs (L27), momentum 0.9 (L29), wd 2e-4 (L30), lr 0.1
    # (L31), MultiStepLR [75, 90] (L32) stepped after each epoch (L148-149); training PGD
    # eps 8/255, 10 x 2/255, random start, test PGD 20 x 0.1 eps, no random start, joint
    # loss with beta_atk 2 (L220-227).
    ("cifs", "resnet18"): {
        "model.arch": "resnet18", "defense.name": "cifs", "defense.beta": 2.0,
        "defense.loss_rescale": True, "objective.name": "pgd_at", "train.epochs": 120,
        "train.batch_size": 128, "optim.lr": 0.1, "optim.momentum": 0.9,
        "optim.weight_decay": 2e-4, "optim.milestones": (75, 90),
        "objective.attack.eps": 8 / 255, "objective.attack.step_size": 2 / 255,
        "objective.attack.steps": 10, "objective.attack.loss": "defense",
        "eval_pgd.steps": 20, "eval_pgd.step_size": 0.8 / 255, "eval_pgd.random_start": False,
        "eval_pgd.loss": "defense"},
    # DM-Improves-AT @b390f25, the README's train-wa.py command (README.md:58-69): cifar10s,
    # batch 512, wrn-28-10-swish, 400 epochs, lr 0.2, beta 5, unsup-fraction 0.7, ls 0.1;
    # defaults core/utils/parser.py: wd 5e-4 (L40), cosinew (L41: OneCycleLR, pct_start
    # 0.025, stepped per epoch, core/utils/train.py:92-94), nesterov (L42), attack
    # 8/255, 2/255, 10 steps (L46-48); tau 0.995 (train-wa.py:29); SGD momentum 0.9, no
    # decay on 'batchnorm' params (gowal21uncovering/utils/watrain.py:62-71); an epoch is
    # ceil(50000 / 512) = 98 batches (core/data/semisup.py:15); EMA warm-up
    # 0.025 x 400 x 98 = 980 on the 1-based step (watrain.py:50-51, 131-133, 248-258: 979
    # 0-based updates), BN statistics the model's (update_bn, watrain.py:139, 270-272); BN
    # momentum 0.01, swish, mean/std in the model (core/models/wideresnetwithswish.py:12-13,
    # 21, 36); label smoothing on the natural CE of every example (trades.py:42, 110).
    ("generated", "wang2023,wrn28_10"): {
        "model.arch": "wide_resnet", "model.kwargs.depth": 28, "model.kwargs.width": 10,
        "model.kwargs.activation": "swish", "model.kwargs.conv_padding": "asymmetric",
        "model.kwargs.bn_momentum": 0.99,
        "model.kwargs.input_mean": (0.4914, 0.4822, 0.4465),
        "model.kwargs.input_std": (0.2471, 0.2435, 0.2616),
        "data.extra_fraction": 0.7, "data.epoch_steps": "batch", "train.batch_size": 512,
        "train.epochs": 400, "optim.lr": 0.2, "optim.lr_reference_batch": 0,
        "objective.name": "trades", "objective.beta": 5.0,
        "objective.label_smoothing": 0.1, "objective.label_smoothing_on": "all",
        "objective.attack.eps": 8 / 255, "objective.attack.step_size": 2 / 255,
        "objective.attack.steps": 10, "optim.weight_decay": 5e-4,
        "optim.decay_batchnorm": False, "optim.nesterov": True,
        "optim.schedule": "onecycle", "optim.warmup_epochs": 10, "train.ema_decay": 0.995,
        "train.ema_schedule": "warmup", "train.ema_warmup_steps": 979,
        "train.ema_batch_stats": "live"},
    # deepmind-research @f5de0ed adversarial_robustness/jax/experiment.py: batch 1024 (L56),
    # 400 epochs (L50), lr 0.1 x B / 256 (L68), 10 warm-up epochs then cosine (L69-73),
    # SGD 0.9 Nesterov (L430-431), wd 5e-4 (L125) off batchnorm (utils.py:92-94), EMA .995
    # (L126) dynamic from step 0 over the parameters only (utils.py:113-120, L353-354),
    # label smoothing .1 on the extra labels (L130, L521-524), TRADES beta 6 (L315),
    # supervised_batch_ratio .3 (L128); WRN-28-10 swish, BN decay .99 (model_zoo.py:95-99).
    ("generated", "gowal2021,wrn28_10"): {
        "model.kwargs.depth": 28, "model.kwargs.width": 10, "model.kwargs.bn_momentum": 0.99,
        "model.kwargs.activation": "swish", "train.batch_size": 1024, "train.epochs": 400,
        "optim.lr": 0.1, "optim.lr_reference_batch": 256, "optim.schedule": "cosine",
        "optim.warmup_epochs": 10, "optim.momentum": 0.9, "optim.nesterov": True,
        "optim.weight_decay": 5e-4, "optim.decay_batchnorm": False, "train.ema_decay": 0.995,
        "train.ema_schedule": "warmup", "train.ema_warmup_steps": 0,
        "train.ema_batch_stats": "live", "objective.label_smoothing": 0.1,
        "objective.label_smoothing_on": "extra", "objective.name": "trades",
        "objective.beta": 6.0, "data.extra_fraction": 0.7, "data.epoch_steps": "batch"},
    ("generated", "wang2023,wrn70_16"): {"model.kwargs.depth": 70, "model.kwargs.width": 16},
    ("generated", "gowal2021,wrn28_10,cifar100"): {
        "data.name": "cifar100", "model.kwargs.input_mean": (0.5071, 0.4865, 0.4409)},
}


def test_generated_recipes_step_counts_and_rates_are_the_codes():
  """Wang et al.: 98 steps an epoch, 39,200 in all, the EMA a copy of the weights for the
  first 979 updates (decay 0) and 0.995-capped after; DeepMind: peak rate 0.4, 49 x 400 =
  19,600 steps (its code: int(400 x 50000 / 1024) = 19,531, docs/fidelity.md)."""
  wang, gowal = load("generated", "wang2023,wrn28_10"), load("generated", "gowal2021,wrn28_10")
  counts = [batching.steps_per_epoch(50_000, c.train.batch_size,
                                     extra_fraction=c.data.extra_fraction,
                                     epoch_steps=c.data.epoch_steps) for c in (wang, gowal)]
  assert counts == [98, 49]
  assert optim.peak_learning_rate(gowal) == pytest.approx(0.4)
  decay = train_state.ema_decay(wang)
  assert [float(decay(jnp.asarray(k))) for k in (0, 978)] == [0.0, 0.0]
  assert float(decay(jnp.asarray(979))) == pytest.approx(0.1)  # DM's first: (1+0)/(10+0)
  assert float(decay(jnp.asarray(39_199))) == pytest.approx(0.995)
  assert float(train_state.ema_decay(gowal)(jnp.asarray(0))) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", ["wang2023", "wang2023,wrn34_10", "kim2023,wrn28_10",
                                 "gowal2021,wrn28_10,svhn"])
def test_bad_generated_arguments_name_what_is_allowed(bad):
  with pytest.raises(ValueError, match="RECIPE,ARCH"):
    load("generated", bad)


def test_cifs_default_sites_and_probes_are_the_authors():
  """ResNet-18: layer4.0 nonlinear (width 128), layer4.1 linear; WRN: block3's last
  pre-activation nonlinear (width 240), final linear (docs/cifs.md section 1)."""
  for arch, nonlinear, linear, width in (("resnet18", "cifs_layer4_0", "cifs_layer4_1", 128),
                                          ("wrn34_10", "cifs_block3_4_preact", "cifs_final", 240)):
    c = load("cifs", arch)
    model = models.create(c.model.arch, num_classes=10,
                          defense=defenses.from_config(c))
    params = jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3)))["params"]
    flat_params = {"/".join(k.key for k in path): leaf.shape
                   for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert any(k.endswith(f"{nonlinear}/hidden_kernel") and v[1] == width
               for k, v in flat_params.items()), arch
    assert f"{linear}/kernel" in flat_params and f"{linear}/hidden_kernel" not in flat_params


@pytest.mark.parametrize("name,argument", sorted(RECIPES, key=str))
def test_recipe_resolves_to_the_authors_script(name, argument):
  values = flat(load(name, argument))
  for key, expected in RECIPES[(name, argument)].items():
    got = values[key]
    if isinstance(expected, float):
      assert got == pytest.approx(expected, rel=1e-9), key
    else:
      assert (tuple(got) if isinstance(got, (list, tuple)) else got) == expected, key


def test_cas_vgg16_places_cas_on_stage5_with_the_cas_codes_classifier():
  c = load("cas", "vgg16,pgd_at")
  model = models.create(c.model.arch, num_classes=10, **dict(c.model.kwargs))
  assert model.default_sites("cas") == ("stage5.*",)
  assert model.classifier_batchnorm and model.init_scheme == "torch"


@pytest.mark.parametrize("name,bad,usage", [
    ("cas", "resnet50,pgd_at", "ARCH[,OBJECTIVE]"), ("cas", "resnet18,awp", "ARCH[,OBJECTIVE]"),
    ("cifs", "resnet18,mnist", "ARCH[,DATASET]"), ("fsr", "resnet18,fsr,cifar10,x",
                                                   "ARCH[,DEFENSE[,DATASET]]"),
    ("generated", "wang2023", "RECIPE,ARCH[,DATASET]"), ("mart", "vgg16", "ARCH"),
    ("robustbench", "wrn28_10,svhn", "ARCH[,DATASET]"),
    ("quickstart", "fsr,cas", "DEFENSE[,extra]")])
def test_bad_recipe_arguments_name_what_is_allowed(name, bad, usage):
  """A bad `:ARGUMENT` of any config file: one line with the usage and the allowed words."""
  with pytest.raises(ValueError, match=rf"configs/{name}.py takes {re.escape(usage)} with .* in "
                                       rf".*; got '{bad}'"):
    load(name, bad)


def test_config_arguments_take_each_missing_trailing_word_from_its_default():
  fields = (spec.Field("A", ("a", "b")), spec.Field("B", ("c", "d"), "d"),
            spec.Field("C", ("e", "f"), "f"))
  assert spec.parse("b", "x.py", *fields) == ("b", "d", "f")
  assert spec.parse("a,c", "x.py", *fields) == ("a", "c", "f")
  assert spec.parse("a,c,e", "x.py", *fields) == ("a", "c", "e")
  assert spec.usage(fields) == "A[,B[,C]]"
  for bad in ("", "c", "a,c,e,f", "a,e"):
    with pytest.raises(ValueError, match=r"^x.py takes A\[,B\[,C\]\] with A in a, b, B in c, d "
                                         rf"and C in e, f; got '{bad}'$"):
      spec.parse(bad, "x.py", *fields)
  assert (load("quickstart", "extra").defense.name, load("quickstart", "extra").data.extra) == (
      "none", load("quickstart", "none,extra").data.extra)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_starts_with_the_command_that_runs_it(path):
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  name = os.path.basename(path)
  assert f"python main.py --config=configs/{name}" in module.__doc__.split("\n\n")[1]


def test_vgg_torch_init_scheme_is_pytorchs_default():
  """init_scheme="torch" (the CAS code's VGG): every conv / Linear weight and bias is
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases included (the FSR scheme zeroes them)."""
  import jax
  import numpy as np
  model = models.create("vgg16", num_classes=10, stages=((16,), (32,)), init_scheme="torch",
                        classifier_batchnorm=True)
  params = models.init(model, jax.random.key(0), (8, 8, 3))["params"]
  for name in ("stage1_conv0", "stage2_conv0", "fc0", "classifier"):
    kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
    for w in (kernel, bias):
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0.5 * bound, name
  with pytest.raises(ValueError, match="unknown VGG init_scheme 'he'; allowed: fsr, torch"):
    models.init(models.create("vgg16", num_classes=10, stages=((4,),), init_scheme="he"),
                jax.random.key(0), (8, 8, 3))
