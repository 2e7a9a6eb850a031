r"""The FSR paper's recipe (Kim et al., CVPR 2023; github wkim97/FSR train.py), for FSR and
for the defenses it compares with, trained the same way.

    python main.py --config=configs/fsr.py:wrn34_10,fsr,cifar10 --workdir=workdirs/fsr_wrn
    python main.py --config=configs/fsr.py:resnet18,none,svhn --workdir=workdirs/at_resnet18_svhn

The argument is `ARCH,DEFENSE,DATASET`: ARCH resnet18 | wrn34_10 | vgg16, DEFENSE none | cas
| fsr, DATASET cifar10 | svhn | cifar100. PGD-AT: 100 epochs, batch 128, SGD 0.9, weight
decay 5e-4, lr 0.1 (SVHN 0.01) x0.1 from 1-based epochs 75 and 90, PGD-10 at eps 8/255,
step 2/255 (SVHN 1/255), random start; FSR lam_sep = lam_rec = 1, tau 0.1; the last
epoch is evaluated (`--checkpoint=last --config.eval.protocol=fsr`). It reproduces the FSR
paper's AT and AT + FSR rows (and, trained alike, its CAS rows): compare `main.py
--mode=eval`'s FGSM, PGD-20/100 and C&W columns with its tables (docs/method.md section 5).
`configs/wrn_fsr.py` is this config for WRN-34-10 + FSR.
"""
from jaxdefense.config import defaults, spec

ARCHS = ("resnet18", "wrn34_10", "vgg16")
DEFENSES = ("none", "cas", "fsr")


def get_config(argument: str = "resnet18,fsr,cifar10"):
  arch, defense, dataset = spec.parse(argument or "resnet18,fsr,cifar10", "configs/fsr.py",
                                      spec.Field("ARCH", ARCHS),
                                      spec.Field("DEFENSE", DEFENSES, "fsr"),
                                      spec.Field("DATASET", defaults.DATASETS, "cifar10"))
  return defaults.paper_recipe(arch, defense, dataset)
