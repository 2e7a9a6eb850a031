r"""VGG-16 + CAS as the CAS code builds it (PyTorch's default init, Linear-BN-ReLU
classifier, CAS on the three convolutions of stage 5), PGD-AT, CIFAR-10.

    python main.py --config=configs/vgg16_cas.py --workdir=workdirs/vgg16_cas

`configs/cas.py:vgg16,pgd_at` (the CAS Standard_Adv_Training script's recipe: 200 epochs,
weight decay 1e-4); `:trades` or `:mart` after the path select those recipes. Not yet run
with this code (no GPU was lent where it was written).
"""
import importlib.util
import os

_SPEC = importlib.util.spec_from_file_location(
    "cas_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cas.py"))
_CAS = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_CAS)


def get_config(objective: str = "pgd_at"):
  return _CAS.get_config(f"vgg16,{objective or 'pgd_at'}")
