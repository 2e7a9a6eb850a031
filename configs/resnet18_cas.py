r"""resnet18, PGD-AT + CAS (Bai et al., ICLR 2021; beta = 2), CIFAR-10.

    python main.py --config=configs/resnet18_cas.py --workdir=workdirs/resnet18_cas

Append `:cifar100` or `:svhn` to the config path for the other data sets (SVHN: lr
0.01, training step 1/255). The data must be prepared with `tfds build` first (README).
The paper recipe (100 epochs, batch 128); not yet run with this code: no GPU or TPU was
available where it was written, so no time or accuracy is claimed here — results.json and
`main.py --mode=eval` give them. The papers report the gains this recipe should show
(METHOD.md section 5).
"""
from jaxdefense import default_config


def get_config(dataset: str = "cifar10"):
  return default_config.paper_recipe("resnet18", "cas", dataset or "cifar10")
