r"""The CAS paper's training recipes (Bai et al., ICLR 2021; github bymavis/CAS_ICLR2021).

    python main.py --config=configs/cas.py:resnet18,pgd_at --workdir=workdirs/cas_resnet18_pgd_at
    python main.py --config=configs/cas.py:wrn34_10,trades --workdir=workdirs/cas_wrn_trades
    python main.py --config=configs/cas.py:vgg16,mart --workdir=workdirs/cas_vgg16_mart

The argument is `ARCH,OBJECTIVE`: ARCH resnet18 | wrn34_10 | vgg16 (the CAS code's VGG-16:
PyTorch's default init, Linear-BN-ReLU classifier, CAS on the three convolutions of stage
5), OBJECTIVE pgd_at | trades | mart; CIFAR-10 (the CAS heads are 10-way in the authors'
code). Each recipe is its script's defaults (the values and their lines are in
tests/test_configs.py); CAS beta = 2 throughout, the CAS heads' CE inside the training
attack's loss. Learning rates drop by 10x from the scripts' 1-based epochs 75, 90 (and
100), i.e. after 74, 89 (and 99) completed epochs.
- pgd_at (Standard_Adv_Training/train.py, the README's command): 200 epochs, lr 0.1,
  weight decay 1e-4, PGD-10 eps 8/255 step 2/255 with random start.
- trades (Trades/train_trades_cifar10_cas.py): 100 epochs, weight decay 5e-4, TRADES
  beta 4, eps 0.031, step 0.007, a third drop at epoch 100.
- mart (MART/train_mart_cas.py): 120 epochs, weight decay 2e-4, MART beta 5, eps 0.031,
  step 0.007, lr 0.1/0.01/0.001/1e-4.
It reproduces the CAS paper's white-box table (CIFAR-10, each defense with and without
CAS: `--config.defense.name=none` for the rows without), evaluated with
`--config.eval.protocol=cas` on the best checkpoint (docs/method.md section 5).
"""
from jaxdefense.config import defaults, spec

ARCHS = ("resnet18", "wrn34_10", "vgg16")
OBJECTIVES = ("pgd_at", "trades", "mart")


def get_config(argument: str = "resnet18,pgd_at"):
  arch, objective = spec.parse(argument or "resnet18,pgd_at", "configs/cas.py",
                               spec.Field("ARCH", ARCHS),
                               spec.Field("OBJECTIVE", OBJECTIVES, "pgd_at"))
  c = defaults.get()
  c.name = f"cas_{arch}_{objective}"
  c.data.name = "cifar10"
  c.model.arch = arch
  if arch == "vgg16":
    c.model.kwargs.classifier_batchnorm = True
    c.model.kwargs.init_scheme = "torch"
  c.defense.name = "cas"
  c.defense.beta = 2.0
  c.objective.name = objective
  c.objective.attack.loss = "defense"
  c.optim.lr = 0.1
  if objective == "pgd_at":
    c.train.epochs = 200
    c.optim.weight_decay = 1e-4
    c.optim.milestones = (74, 89)
  else:
    c.objective.attack.eps = c.eval_pgd.eps = c.eval.eps = 0.031
    c.objective.attack.step_size = 0.007
    c.eval_pgd.step_size = 0.003
    c.optim.milestones = (74, 89, 99)
    if objective == "trades":
      c.train.epochs, c.optim.weight_decay, c.objective.beta = 100, 5e-4, 4.0
    else:
      c.train.epochs, c.optim.weight_decay, c.objective.beta = 120, 2e-4, 5.0
  return c
