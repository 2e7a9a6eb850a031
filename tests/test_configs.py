"""Every config file: its docstring starts with the command that runs it, and each paper
recipe resolves to the values of the authors' script (file:line of the script as read,
bymavis/CAS_ICLR2021 @057fc63, wkim97/FSR @aa83b86, yaodongyu/TRADES @6e8e11b,
YisenWang/MART @2d83e17). Milestones are completed epochs: a script's `epoch >= 75` with
1-based epochs drops after 74."""
import glob
import importlib.util
import os

import jax
import pytest

from jaxdefense import build, models
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
}


def test_cifs_default_sites_and_probes_are_the_authors():
  """ResNet-18: layer4.0 nonlinear (width 128), layer4.1 linear; WRN: block3's last
  pre-activation nonlinear (width 240), final linear (docs/cifs.md section 1)."""
  for arch, nonlinear, linear, width in (("resnet18", "cifs_layer4_0", "cifs_layer4_1", 128),
                                          ("wrn34_10", "cifs_block3_4_preact", "cifs_final", 240)):
    c = load("cifs", arch)
    model = models.create(c.model.arch, num_classes=10,
                          defense=build.defense_config(c))
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


@pytest.mark.parametrize("bad", ["resnet50,pgd_at", "resnet18,awp"])
def test_bad_recipe_arguments_name_what_is_allowed(bad):
  with pytest.raises(ValueError, match="takes ARCH,OBJECTIVE.*got"):
    load("cas", bad)


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
