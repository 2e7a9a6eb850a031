"""PyTorch <-> jaxdefense weights (jaxdefense.interop.convert, jaxdefense/torch_layouts.py).

Each layout is checked against a small PyTorch model with the source's structure and key
names (tests/torch_models.py), randomly initialised (BatchNorm statistics included):
eval-mode logits and auxiliary outputs agree to 1e-5 in float32 on random inputs, the
round trip torch -> jax -> torch is exact and loads with strict=True, and bad files fail
with the key named.
"""
import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdefense import data, defenses, errors, models, parallel  # noqa: E402
from jaxdefense.interop import convert, torch_layouts  # noqa: E402
from jaxdefense.training import train, train_state  # noqa: E402
from tests import torch_models as tm  # noqa: E402
from tests.helpers import ROOT, TINY, load_config, tiny_config  # noqa: E402

SMALL_VGG = ((8, 8), (8, 8), (16, 16, 16), (16, 16, 16), (16, 16, 16))
HIDDEN = 8

# layout -> (PyTorch model factory, jaxdefense arch, backbone kwargs)
CASES = {
    "fsr_resnet18": (lambda: tm.ResNet(width=8, defense="fsr", hidden=HIDDEN), "resnet18",
                     {"width": 8}),
    "fsr_wrn": (lambda: tm.WideResNet(10, 2, defense="fsr", hidden=HIDDEN, sub_block1=True),
                "wide_resnet", {"depth": 10, "width": 2}),
    "fsr_vgg16": (lambda: tm.VGGFSR(SMALL_VGG, hidden=HIDDEN), "vgg16", {"stages": SMALL_VGG}),
    "cas_resnet18": (lambda: tm.ResNet(width=8, defense="cas"), "resnet18", {"width": 8}),
    "cas_wrn": (lambda: tm.WideResNet(10, 2, defense="cas", sub_block1=True), "wide_resnet",
                {"depth": 10, "width": 2}),
    "cifs_resnet18": (lambda: tm.ResNet(width=8, defense="cifs"), "resnet18", {"width": 8}),
    "cas_vgg16": (lambda: tm.VGGCAS(SMALL_VGG), "vgg16",
                  {"stages": SMALL_VGG, "classifier_batchnorm": True}),
    "resnet18": (lambda: tm.ResNet(width=8), "resnet18", {"width": 8}),
    "preact_resnet18": (lambda: tm.PreActResNet(width=8), "preact_resnet18",
                        {"width": 8, "shortcut_input": "raw", "final_bn": False}),
    "awp_preact_resnet18": (lambda: tm.PreActResNet(width=8, variant="awp"), "preact_resnet18",
                            {"width": 8}),
    "wrn": (lambda: tm.WideResNet(10, 2), "wide_resnet", {"depth": 10, "width": 2}),
    "trades_wrn": (lambda: tm.WideResNet(10, 2, sub_block1=True), "wide_resnet",
                   {"depth": 10, "width": 2}),
    "dm_wrn": (lambda: tm.DMWideResNet(10, 2), "wide_resnet",
               {"depth": 10, "width": 2, "activation": "swish", "conv_padding": "asymmetric",
                "input_mean": tm.MEAN, "input_std": tm.STD}),
    "dm_preact_resnet18": (lambda: tm.DMPreActResNet(width=8), "preact_resnet18",
                           {"width": 8, "activation": "swish", "conv_padding": "asymmetric",
                            "shortcut_kernel": 3, "shortcut_input": "raw",
                            "input_mean": tm.MEAN, "input_std": tm.STD}),
}


def test_every_layout_is_tested():
  assert set(CASES) == set(torch_layouts.LAYOUTS)


def _jax_model(name: str, num_classes: int = 10):
  _, arch, kwargs = CASES[name]
  defense = defenses.DefenseConfig(name=torch_layouts.LAYOUTS[name].defense, hidden=HIDDEN)
  return models.create(arch, num_classes=num_classes, defense=defense, **kwargs)


def _abstract(model):
  return jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3)))


def _torch_state_dict(name: str, seed: int = 0):
  module = tm.randomize(CASES[name][0](), seed)
  return module, {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_aux_outputs_match_pytorch(name):
  module, sd = _torch_state_dict(name)
  model = _jax_model(name)
  variables = convert.to_variables(sd, torch_layouts.LAYOUTS[name], _abstract(model), 10)
  x = np.random.default_rng(1).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    logits, aux = module(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  out = model.apply(variables, x, train=False)
  assert logits.abs().max() > 0.1  # Not a degenerate (all-zero) network.
  np.testing.assert_allclose(np.asarray(out.logits), logits.numpy(), rtol=1e-5, atol=1e-5)
  assert len(out.aux) == len(aux)
  for ours, theirs in zip(out.aux.values(), aux):
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_exact_and_loads_strictly(name):
  module, sd = _torch_state_dict(name, seed=2)
  layout = torch_layouts.LAYOUTS[name]
  variables = convert.to_variables(sd, layout, _abstract(_jax_model(name)), 10)
  back = convert.to_state_dict(variables, layout)
  unused = layout.unused.replace("\\", "") if layout.unused else None
  assert set(back) == set(sd)
  for key, value in sd.items():
    if unused and key.startswith(unused):
      continue  # Never read by the forward pass; exported as BN defaults and zeros.
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  fresh = CASES[name][0]()
  fresh.load_state_dict(collections.OrderedDict(
      (k, torch.from_numpy(np.asarray(v))) for k, v in back.items()), strict=True)


def test_data_parallel_prefix_is_stripped():
  _, sd = _torch_state_dict("resnet18")
  wrapped = {f"module.{k}": v for k, v in sd.items()}
  model = _jax_model("resnet18")
  a = convert.to_variables(wrapped, torch_layouts.LAYOUTS["resnet18"], _abstract(model), 10)
  b = convert.to_variables(sd, torch_layouts.LAYOUTS["resnet18"], _abstract(model), 10)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("edit, expected", [
    (lambda sd: sd.pop("layer2.0.shortcut.0.weight"),
     r"1 missing key\(s\) \[layer2\.0\.shortcut\.0\.weight\]; 0 unexpected"),
    (lambda sd: sd.update(extra=torch.zeros(1)),
     r"0 missing key\(s\) \[\]; 1 unexpected key\(s\) \[extra\]"),
    (lambda sd: sd.update({"layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1)}),
     r"layer1\.0\.conv1\.weight has shape \(8, 8, 1, 1\); the config's model needs \(8, 8, 3, 3\)"),
    (lambda sd: sd.update({"linear.weight": torch.zeros(100, 64), "linear.bias": torch.zeros(100)}),
     r"linear\.\w+ has shape \(100,?.*class-count mismatch, the file has 100 classes"),
])
def test_bad_state_dicts_name_the_key(edit, expected):
  _, sd = _torch_state_dict("resnet18")
  edit(sd)
  with pytest.raises(errors.WeightsMismatch, match=expected):
    convert.to_variables(sd, torch_layouts.LAYOUTS["resnet18"],
                         _abstract(_jax_model("resnet18")), 10)


def test_cas_heads_hard_coded_to_ten_classes_are_named():
  _, sd = _torch_state_dict("cas_resnet18")
  model = _jax_model("cas_resnet18", num_classes=100)
  sd["linear.weight"], sd["linear.bias"] = torch.zeros(100, 64), torch.zeros(100)
  with pytest.raises(errors.WeightsMismatch, match="hard-codes 10 classes"):
    convert.to_variables(sd, torch_layouts.LAYOUTS["cas_resnet18"], _abstract(model), 100)


def test_a_model_the_layout_does_not_hold_is_refused():
  model = models.create("resnet18", num_classes=10, width=8,
                        defense=defenses.DefenseConfig(name="cas", sites=("layer3.*",)))
  with pytest.raises(errors.WeightsMismatch, match="module 'cas_layer3_0'"):
    convert.tensors(torch_layouts.LAYOUTS["cas_resnet18"], _abstract(model))


def test_unknown_layout_lists_the_layouts():
  with pytest.raises(errors.WeightsMismatch, match="unknown layout 'foo'; allowed: fsr_resnet18"):
    convert.get_layout("foo")


def _run(module_or_script, *args, cwd):
  cmd = [sys.executable, *(["-m", module_or_script] if "." in module_or_script
                           and not module_or_script.endswith(".py") else [module_or_script]),
         *args]
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_evaluate_export_and_fine_tune_through_a_workdir(tmp_path):
  """The README's path with relative paths: `convert import` a PyTorch file (a training
  checkpoint dict with DataParallel's prefix) into a workdir, `main.py --mode=eval` it
  (the natural accuracy is PyTorch's on the same points), `convert export` it back
  (bit-exact), and start a training from it with --config.init_from (at lr 0 the
  parameters stay the imported ones)."""
  module = tm.randomize(tm.ResNet(blocks=(1, 1), width=8, in_channels=1), seed=3)
  sd = {k: v.clone() for k, v in module.state_dict().items()}
  torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
             tmp_path / "model.pt")
  config = os.path.join(ROOT, "configs", "quickstart.py")
  common = [f"--config={config}", *TINY, "--workdir=runs/imported"]
  run = _run("jaxdefense.interop.convert", "import", "--layout=resnet18", "--torch=model.pt",
             *common, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "imported model.pt (resnet18) as step 0" in run.stdout

  run = _run(os.path.join(ROOT, "main.py"), "--mode=eval", "--checkpoint=last", *common,
             "--config.eval.attacks=('fgsm',)", cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((tmp_path / "runs/imported/eval.json").read_text())
  dataset = data.from_config(tiny_config())
  with torch.no_grad():
    x = torch.from_numpy(dataset.test_images.astype(np.float32).transpose(0, 3, 1, 2) / 255)
    expected = (module(x)[0].argmax(1).numpy() == dataset.test_labels).mean()
  assert report["results"]["natural"]["accuracy"] == pytest.approx(expected, abs=1e-9)

  run = _run("jaxdefense.interop.convert", "export", "--layout=resnet18", "--torch=back.pt",
             *common, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  back = torch.load(tmp_path / "back.pt", weights_only=True)
  assert set(back) == set(sd)
  for key, value in sd.items():
    torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)

  c = tiny_config()
  c.init_from = "runs/imported"
  c.optim.lr = 0.0
  c.train.epochs = 1
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    train.train_and_evaluate(c, "runs/fine_tuned")
  finally:
    os.chdir(cwd)
  model = models.from_config(c, dataset.num_classes)
  mesh = parallel.make_mesh()
  tuned, _ = train_state.restore_variables(c, tmp_path / "runs/fine_tuned", "latest", model,
                                     dataset.image_shape, mesh)
  imported, _ = train_state.restore_variables(c, tmp_path / "runs/imported", "latest", model,
                                        dataset.image_shape, mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(tuned["params"]),
               jax.device_get(imported["params"]))


def test_import_refuses_a_config_of_another_model(tmp_path):
  torch.save(tm.ResNet(width=8).state_dict(), tmp_path / "model.pt")
  config = os.path.join(ROOT, "configs", "quickstart.py") + ":cas"
  run = _run("jaxdefense.interop.convert", "import", "--layout=resnet18", "--torch=model.pt",
             f"--config={config}", "--workdir=runs/x", cwd=tmp_path)
  assert run.returncode == errors.WeightsMismatch.exit_code
  assert "error: layout resnet18" in run.stderr
  assert "defense.name='cas' (needs 'none')" in run.stderr
  assert not (tmp_path / "runs/x/checkpoints").exists()


def test_help_lists_the_layouts():
  run = _run("jaxdefense.interop.convert", "--help", cwd=ROOT)
  assert "python -m jaxdefense.interop.convert import --layout=" in run.stdout, run.stderr
  for name in torch_layouts.LAYOUTS:
    assert name in run.stdout


# Each layout with the config the README pairs it with, and the PyTorch model at full size.
FULL_SIZE = {
    "fsr_resnet18": (("fsr", "resnet18,fsr"), lambda: tm.ResNet(defense="fsr")),
    "fsr_wrn": (("fsr", "wrn34_10,fsr"), lambda: tm.WideResNet(defense="fsr", sub_block1=True)),
    "fsr_vgg16": (("fsr", "vgg16,fsr"), lambda: tm.VGGFSR(
        ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3))),
    "cas_resnet18": (("cas", "resnet18,pgd_at"), lambda: tm.ResNet(defense="cas")),
    "cas_wrn": (("cas", "wrn34_10,trades"), lambda: tm.WideResNet(defense="cas", sub_block1=True)),
    "cas_vgg16": (("cas", "vgg16,pgd_at"), lambda: tm.VGGCAS(
        ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3))),
    "cifs_resnet18": (("cifs", "resnet18"), lambda: tm.ResNet(defense="cifs")),
    "resnet18": (("mart", "resnet18"), lambda: tm.ResNet()),
    "trades_wrn": (("trades", "wrn34_10"), lambda: tm.WideResNet(sub_block1=True)),
    "wrn": (("robustbench", "wrn70_16"), lambda: tm.WideResNet(70, 16)),
    "dm_wrn": (("robustbench", "dm_wrn28_10"), lambda: tm.DMWideResNet(28, 10)),
    "preact_resnet18": (("robustbench", "preact_resnet18"), lambda: tm.PreActResNet()),
    "dm_preact_resnet18": (("robustbench", "dm_preact_resnet18"), lambda: tm.DMPreActResNet()),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_each_layouts_config_builds_the_full_size_pytorch_model(name):
  """The config named in the README for a layout fits it (arch, defense, backbone options)
  and maps to exactly the full-size PyTorch model's keys and shapes (shapes only)."""
  (config_name, argument), factory = FULL_SIZE[name]
  config = load_config(config_name, argument)
  layout = torch_layouts.LAYOUTS[name]
  convert.check_config(config, layout, name)
  model = models.from_config(config, 10)
  ts = convert.tensors(layout, _abstract(model))
  torch_shapes = {k: tuple(v.shape) for k, v in factory().state_dict().items()
                  if not k.endswith("num_batches_tracked")
                  and not (layout.unused and k.startswith("sub_block1."))}
  assert {t.key: t.torch_shape for t in ts} == torch_shapes
