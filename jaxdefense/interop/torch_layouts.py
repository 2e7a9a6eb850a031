"""PyTorch state_dict layouts: which PyTorch module holds each jaxdefense module's weights.

A layout is a list of rules from a jaxdefense module path (the `/`-joined path of a
Conv, Dense, BatchNorm, or CAS head in the variables tree, e.g. `layer4_1/Conv_0`) to the
PyTorch module prefix holding the same tensors (`layer4.1.conv1`). Each was written from
the authors' or RobustBench's model code (file named in the description); the tensors under
a prefix follow from the module's kind (`jaxdefense.interop.convert`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

Rule = tuple[str, Callable[[re.Match], str]]


@dataclasses.dataclass(frozen=True)
class Layout:
  description: str
  archs: tuple[str, ...]                  # jaxdefense architectures it fits.
  defense: str                            # none | cas | fsr
  rules: tuple[Rule, ...]
  model_kwargs: dict = dataclasses.field(default_factory=dict)  # Required backbone options.
  # Torch keys the PyTorch forward pass never reads: skipped on import, written on export
  # (as a copy of `unused_source`'s keys with BN defaults and zero weights) so that
  # `load_state_dict(strict=True)` accepts the file.
  unused: str | None = None
  unused_source: str | None = None
  # CIFS probes (one jaxdefense module, the rule's prefix): where the output Linear and a
  # nonlinear probe's hidden Linear sit under it.
  probe_out: str = ""
  probe_hidden: str = ""


def _n(m: re.Match, i: int, offset: int = 0) -> int:
  return int(m[i]) + offset


def _sequential(index_of: dict[str, int]) -> Callable[[str, int], int]:
  """Index in a PyTorch Sequential of the i-th module of a kind (Conv_i, BatchNorm_i)."""
  return lambda kind, i: index_of[kind] + 3 * i


_CONVNET = _sequential({"Conv": 0, "BatchNorm": 1})  # conv-BN-ReLU repeated, then a convolution.


def _fsr_rules(site: str) -> tuple[Rule, ...]:
  """The FSR module at `site` (jaxdefense name), as the FSR code's top-level modules."""
  return (
      (rf"fsr_{site}/separation/(Conv|BatchNorm)_(\d)",
       lambda m: f"separation.sep_net.{_CONVNET(m[1], int(m[2]))}"),
      (rf"fsr_{site}/recalibration/(Conv|BatchNorm)_(\d)",
       lambda m: f"recalibration.rec_net.{_CONVNET(m[1], int(m[2]))}"),
      (rf"fsr_{site}/head", lambda m: "aux.0"),
  )


_BLOCK = {"Conv_0": "conv1", "BatchNorm_0": "bn1", "Conv_1": "conv2", "BatchNorm_1": "bn2"}

# kuangliu's ResNet (TRADES, MART, FSR, CAS, RobustBench `ResNet`).
_RESNET: tuple[Rule, ...] = (
    (r"Conv_0", lambda m: "conv1"),
    (r"BatchNorm_0", lambda m: "bn1"),
    (r"layer(\d)_(\d+)/(Conv_[01]|BatchNorm_[01])", lambda m: f"layer{m[1]}.{m[2]}.{_BLOCK[m[3]]}"),
    (r"layer(\d)_(\d+)/shortcut_conv", lambda m: f"layer{m[1]}.{m[2]}.shortcut.0"),
    (r"layer(\d)_(\d+)/shortcut_bn", lambda m: f"layer{m[1]}.{m[2]}.shortcut.1"),
    (r"linear", lambda m: "linear"),
)

# Pre-activation ResNet: RobustBench's `PreActResNet`, AWP's, Rice et al.'s.
_PREACT: tuple[Rule, ...] = (
    (r"Conv_0", lambda m: "conv1"),
    (r"layer(\d)_(\d+)/(Conv_[01]|BatchNorm_[01])",
     lambda m: f"layer{m[1]}.{m[2]}.{_BLOCK[m[3]]}"),
    (r"layer(\d)_(\d+)/shortcut_conv", lambda m: f"layer{m[1]}.{m[2]}.shortcut.0"),
    (r"final_bn", lambda m: "bn"),
    (r"linear", lambda m: "linear"),
)

# Zagoruyko's WideResNet as Madry's / TRADES' code has it (also MART, FSR, CAS, RobustBench).
_WRN: tuple[Rule, ...] = (
    (r"Conv_0", lambda m: "conv1"),
    (r"block(\d)_(\d+)/(Conv_[01]|BatchNorm_[01])",
     lambda m: f"block{m[1]}.layer.{m[2]}.{_BLOCK[m[3]]}"),
    (r"block(\d)_(\d+)/shortcut_conv", lambda m: f"block{m[1]}.layer.{m[2]}.convShortcut"),
    (r"final_bn", lambda m: "bn1"),
    (r"fc", lambda m: "fc"),
)

_DM_BLOCK = {"Conv_0": "conv_0", "BatchNorm_0": "batchnorm_0", "Conv_1": "conv_1",
             "BatchNorm_1": "batchnorm_1", "shortcut_conv": "shortcut"}
_DM_PREACT_BLOCK = {"Conv_0": "conv_2d_1", "BatchNorm_0": "batchnorm_0", "Conv_1": "conv_2d_2",
                    "BatchNorm_1": "batchnorm_1", "shortcut_conv": "shortcut"}
_DM = dict(activation="swish", conv_padding="asymmetric")

# VGG-16 of the FSR code: features split into block0..block4 Sequentials (conv-BN-ReLU).
_VGG_FSR: tuple[Rule, ...] = (
    (r"stage(\d)_(conv|bn)(\d)",
     lambda m: f"block{_n(m, 1, -1)}.{3 * int(m[3]) + (m[2] == 'bn')}"),
    (r"fc(\d)", lambda m: f"classifier.{2 * int(m[1])}"),
    (r"classifier", lambda m: "classifier.4"),
) + _fsr_rules("stage4_2")

# VGG-16 of the CAS code: layer1-4 of conv_layer Sequentials, layer5 of Conv_FC_Blocks,
# a Linear-BN-ReLU classifier (layer6, layer7) and layer8.
_VGG_CAS: tuple[Rule, ...] = (
    (r"stage([1-4])_(conv|bn)(\d)", lambda m: f"layer{m[1]}.{m[3]}.{int(m[2] == 'bn')}"),
    (r"stage5_(conv|bn)(\d)", lambda m: f"layer5.{m[2]}.{m[1]}"),
    (r"cas_stage5_(\d)", lambda m: f"layer5.{m[1]}.fc"),
    (r"fc(\d)", lambda m: f"layer{_n(m, 1, 6)}.0"),
    (r"fc(\d)_bn", lambda m: f"layer{_n(m, 1, 6)}.1"),
    (r"classifier", lambda m: "layer8"),
)

_SUB_BLOCK1 = dict(unused=r"sub_block1\.", unused_source="block1.")
_WRN_ARCHS = ("wide_resnet", "wrn34_10", "wrn28_10")
_RESNET18 = ("resnet18", "resnet")
_PREACT18 = ("preact_resnet18",)

LAYOUTS: dict[str, Layout] = {
    "fsr_resnet18": Layout("wkim97/FSR models/resnet_fsr.py ResNet18_FSR", _RESNET18, "fsr",
                           _RESNET + _fsr_rules(r"layer4_1")),
    "fsr_wrn": Layout("wkim97/FSR models/wideresnet34_fsr.py WideResNet34_FSR (its unused "
                      "sub_block1 included)", _WRN_ARCHS, "fsr", _WRN + _fsr_rules("final"),
                      **_SUB_BLOCK1),
    "fsr_vgg16": Layout("wkim97/FSR models/vgg_fsr.py vgg16_FSR", ("vgg16",), "fsr", _VGG_FSR),
    "cas_resnet18": Layout("bymavis/CAS_ICLR2021 */models/resnet_cas.py ResNet18 (CAS heads "
                           "in layer4)", _RESNET18, "cas",
                           _RESNET + ((r"cas_layer4_(\d)", lambda m: f"layer4.{m[1]}.fc"),)),
    "cas_wrn": Layout("bymavis/CAS_ICLR2021 */models/wideresnet_cas.py WideResNet (CAS in the "
                      "last block of block3 and extra_fc; unused sub_block1 included)",
                      _WRN_ARCHS, "cas",
                      _WRN + ((r"block3_(\d+)/cas_block3_\d+_preact",
                               lambda m: f"block3.layer.{m[1]}.fc"),
                              (r"cas_final", lambda m: "extra_fc")), **_SUB_BLOCK1),
    "cas_vgg16": Layout("bymavis/CAS_ICLR2021 */models/VGG16_cas.py VGG16_REG (needs "
                        "model.kwargs classifier_batchnorm=True)", ("vgg16",), "cas", _VGG_CAS,
                        model_kwargs={"classifier_batchnorm": True}),
    "cifs_resnet18": Layout("HanshuYAN/CIFS models/nets/resnet_CIFS.py ResNet18_L4 (CIFS "
                            "blocks in layer4: nonlinear then linear probe)", _RESNET18, "cifs",
                            _RESNET + ((r"cifs_layer4_(\d)",
                                        lambda m: f"layer4.{m[1]}.Probe.Probe"),),
                            probe_out=".1", probe_hidden=".0.fc"),
    "resnet18": Layout("kuangliu's ResNet-18 as in TRADES, MART and RobustBench "
                       "(architectures/resnet.py ResNet)", _RESNET18, "none", _RESNET),
    "preact_resnet18": Layout("RobustBench architectures/resnet.py PreActResNet18 (projection "
                              "shortcuts on the raw input, no final BN)", _PREACT18, "none",
                              _PREACT,
                              model_kwargs={"shortcut_input": "raw", "final_bn": False}),
    "awp_preact_resnet18": Layout("AWP AT_AWP/preactresnet.py PreActResNet18, = RobustBench "
                                  "PreActResNet(PreActBlockV2, bn_before_fc=True)", _PREACT18,
                                  "none", _PREACT),
    "wrn": Layout("RobustBench architectures/wide_resnet.py WideResNet (depth and width from "
                  "the config), as Madry's, TRADES' and MART's without sub_block1",
                  _WRN_ARCHS, "none", _WRN),
    "trades_wrn": Layout("TRADES models/wideresnet.py WideResNet (and MART's): the same with "
                         "the unused sub_block1", _WRN_ARCHS, "none", _WRN, **_SUB_BLOCK1),
    "dm_wrn": Layout("RobustBench architectures/dm_wide_resnet.py DMWideResNet (Swish, "
                     "TF-style padding; the config sets input_mean/std)", _WRN_ARCHS, "none", (
                         (r"Conv_0", lambda m: "init_conv"),
                         (r"block(\d)_(\d+)/(\w+)",
                          lambda m: f"layer.{_n(m, 1, -1)}.block.{m[2]}.{_DM_BLOCK[m[3]]}"),
                         (r"final_bn", lambda m: "batchnorm"),
                         (r"fc", lambda m: "logits")), model_kwargs=_DM),
    "dm_preact_resnet18": Layout("RobustBench architectures/dm_wide_resnet.py DMPreActResNet "
                                 "depth 18 (Swish, 3x3 shortcuts on the raw input)", _PREACT18,
                                 "none", (
                                     (r"Conv_0", lambda m: "conv_2d"),
                                     (r"layer(\d)_(\d+)/(\w+)",
                                      lambda m: f"layer_{_n(m, 1, -1)}.{m[2]}."
                                                f"{_DM_PREACT_BLOCK[m[3]]}"),
                                     (r"final_bn", lambda m: "batchnorm"),
                                     (r"linear", lambda m: "logits")),
                                 model_kwargs=dict(_DM, shortcut_kernel=3, shortcut_input="raw")),
}


def torch_prefix(layout: Layout, module: str) -> str | None:
  """The PyTorch module prefix of jaxdefense module path `module`, None if no rule has it."""
  for pattern, prefix in layout.rules:
    m = re.fullmatch(pattern, module)
    if m:
      return prefix(m)
  return None
