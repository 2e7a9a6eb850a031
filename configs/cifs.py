r"""The CIFS recipe (Yan et al., ICML 2021; github HanshuYAN/CIFS CIFAR10_Res18_CIFS.py).

    python main.py --config=configs/cifs.py:resnet18 --workdir=workdirs/cifs_resnet18
    python main.py --config=configs/cifs.py:resnet18 --config.objective.name=natural \
        --workdir=workdirs/cifs_resnet18_natural     # the authors' warm start, stage 1
    python main.py --config=configs/cifs.py:resnet18 \
        --config.init_from=workdirs/cifs_resnet18_natural --workdir=workdirs/cifs_resnet18_ws

The argument is `ARCH[,DATASET]`: ARCH resnet18 (the authors': CIFS on layer4.0 with the
nonlinear probe, width 128, and layer4.1 with the linear one) | wrn34_10 | wrn28_10 (their
WRN placement, probe width 240: block3's last pre-activation and the final BN-ReLU) |
vgg16 (ours: the CIFS code has no VGG; the last two layers of stage 5), DATASET cifar10
(default) | svhn | cifar100. PGD-AT: 120 epochs, batch 128, SGD 0.9, weight decay 2e-4,
lr 0.1 x0.1 after 75 and 90 completed epochs (MultiStepLR stepped at each epoch's end),
PGD-10 at eps 8/255, step 2/255, random start, on the joint loss 3/(beta+1) (CE +
beta x mean probe CE), beta 2; the best checkpoint by PGD-20 on the joint loss (step 0.8/255,
no random start) over the test set, as the authors select it. The authors' CIFS run started
from a naturally trained CIFS model (its best clean checkpoint, weights only): the last two
commands; `python -m jaxdefense.interop.convert import --layout=cifs_resnet18` brings their
checkpoints in. Evaluate with `--config.eval.protocol=cifs` (their test script; `full` adds
the attacks through the mask's input dependence). It reproduces the CIFS paper's
ResNet-18 CIFAR-10 row; the authors' repository log ends at 82.21% clean / 51.37% PGD-20
(joint) at epoch 119.
"""
from jaxdefense.config import defaults, spec

ARCHS = ("resnet18", "wrn34_10", "wrn28_10", "vgg16")


def get_config(argument: str = "resnet18"):
  arch, dataset = spec.parse(argument or "resnet18", "configs/cifs.py",
                             spec.Field("ARCH", ARCHS),
                             spec.Field("DATASET", defaults.DATASETS, "cifar10"))
  c = defaults.paper_recipe(arch, "cifs", dataset)
  c.name = f"cifs_{arch}_{dataset}"
  c.defense.beta = 2.0
  c.objective.attack.loss = "defense"
  c.train.epochs = 120
  c.optim.weight_decay = 2e-4
  c.optim.milestones = (75, 90)
  c.eval_pgd.steps = 20
  c.eval_pgd.step_size = 0.8 / 255
  c.eval_pgd.random_start = False
  c.eval_pgd.loss = "defense"
  return c
