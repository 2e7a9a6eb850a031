r"""Plain TRADES (Zhang et al., ICML 2019; github yaodongyu/TRADES train_trades_cifar10.py).

    python main.py --config=configs/trades.py --workdir=workdirs/trades_wrn

WRN-34-10 on CIFAR-10 (`configs/trades.py:resnet18` for ResNet-18 with the same recipe):
76 epochs, batch 128, SGD lr 0.1 momentum 0.9, weight decay 2e-4, lr x0.1 from 1-based
epoch 75 (the script's drops at 90 and 100 lie past epoch 76), eps 0.031, step 0.007, 10
steps from x + 0.001 N(0, 1), beta 6. The TRADES paper reports WRN-34-10 natural 84.92%,
robust 56.61% under 20-step PGD (1/lambda = 6; as cited from the paper, not re-checked
here).
"""
from jaxdefense.config import defaults


def get_config(arch: str = "wrn34_10"):
  c = defaults.get()
  c.name = f"trades_{arch or 'wrn34_10'}"
  c.data.name = "cifar10"
  c.model.arch = arch or "wrn34_10"
  c.objective.name = "trades"
  c.objective.beta = 6.0
  c.objective.attack.eps = c.eval_pgd.eps = c.eval.eps = 0.031
  c.objective.attack.step_size = 0.007
  c.eval_pgd.step_size = 0.003
  c.train.epochs = 76
  c.optim.weight_decay = 2e-4
  c.optim.milestones = (74,)
  return c
