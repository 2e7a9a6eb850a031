r"""The FSR paper's recipe for WRN-34-10 + FSR (Kim et al., CVPR 2023): `fsr.py:wrn34_10,fsr`.

    python main.py --config=configs/wrn_fsr.py --workdir=workdirs/wrn_fsr
    python main.py --mode=eval --checkpoint=last --config=configs/wrn_fsr.py \
        --workdir=workdirs/wrn_fsr --config.eval.protocol=fsr

CIFAR-10 by default; `configs/wrn_fsr.py:svhn` or `:cifar100` for the other data sets
(SVHN: lr 0.01, training step 1/255), prepared with `tfds build` first (README). PGD-AT,
100 epochs, batch 128, FSR with lam_sep = lam_rec = 1, tau 0.1 (the recipe is
`configs/fsr.py`'s). It reproduces the FSR paper's WRN-34-10 + FSR row (its FGSM, PGD-20,
PGD-100 and C&W columns, `--config.eval.protocol=fsr` on the last epoch); docs/method.md
section 5 says what to compare against.
"""
from jaxdefense.config import defaults


def get_config(dataset: str = "cifar10"):
  return defaults.paper_recipe("wrn34_10", "fsr", dataset or "cifar10")
