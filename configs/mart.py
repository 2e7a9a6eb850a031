r"""Plain MART (Wang et al., ICLR 2020; github YisenWang/MART).

    python main.py --config=configs/mart.py --workdir=workdirs/mart_wrn
    python main.py --config=configs/mart.py:resnet18 --workdir=workdirs/mart_resnet18

WRN-34-10 (train_wideresnet.py): 90 epochs, batch 128, SGD lr 0.1 momentum 0.9, weight
decay 7e-4, beta 6. ResNet-18 (train_resnet.py): 120 epochs, lr 0.01, weight decay 3.5e-3,
beta 5. Both: eps 0.031, step 0.007, 10 steps from x + 0.001 N(0, 1), lr x0.1 from
1-based epochs 75, 90 and 100 (those reached). The MART paper reports WRN-34-10 natural
84.17%, PGD-20 58.56% (as cited from the paper, not re-checked here).
"""
from jaxdefense.config import defaults, spec

ARCHS = ("wrn34_10", "resnet18")


def get_config(argument: str = "wrn34_10"):
  arch, = spec.parse(argument or "wrn34_10", "configs/mart.py", spec.Field("ARCH", ARCHS))
  c = defaults.get()
  c.name = f"mart_{arch}"
  c.data.name = "cifar10"
  c.model.arch = arch
  c.objective.name = "mart"
  c.objective.attack.eps = c.eval_pgd.eps = c.eval.eps = 0.031
  c.objective.attack.step_size = 0.007
  c.eval_pgd.step_size = 0.003
  if arch == "wrn34_10":
    c.train.epochs, c.optim.lr, c.optim.weight_decay, c.objective.beta = 90, 0.1, 7e-4, 6.0
    c.optim.milestones = (74, 89)
  else:
    c.train.epochs, c.optim.lr, c.optim.weight_decay, c.objective.beta = 120, 0.01, 3.5e-3, 5.0
    c.optim.milestones = (74, 89, 99)
  return c
