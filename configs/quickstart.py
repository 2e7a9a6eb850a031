r"""Quick start: PGD-AT on the embedded handwritten-digits data set, no download needed.

    python main.py --config=configs/quickstart.py --workdir=workdirs/quickstart

A small ResNet (3 stages of one basic block, widths 32-64-128) on scikit-learn's 1797
real 8x8 digits (upsampled to 16x16, fixed 1437/360 split), eps 32/255, 15 epochs.
`configs/quickstart.py:cas`, `:fsr` or `:cifs` trains the defended models (CIFS on the
last two blocks: layer2.0 with the nonlinear probe, layer3.0 with the linear one; at this
budget CIFS underfits, ending near natural 75%, PGD-20 on its loss 59-65%: its mask shrinks
the features by about 1/C and 15 epochs from scratch do not let the head compensate). It
takes minutes on a CPU and ends at natural 99.2%, PGD-20 90.3% (CAS 99.2% / 90.6%, PGD-20
on its own loss; FSR 99.2% / 89.4%); the README's results table has the full evaluation.
"""
from jaxdefense import default_config


def get_config(defense: str = "none"):
  c = default_config.get()
  c.name = "quickstart"
  c.data.name = "digits"
  c.model.arch = "resnet"
  c.model.kwargs.stage_sizes = (1, 1, 1)
  c.model.kwargs.width = 32
  c.defense.name = defense or "none"
  c.objective.attack.eps = 32 / 255
  c.objective.attack.step_size = 8 / 255
  c.objective.attack.steps = 10
  c.optim.lr = 0.05
  c.optim.milestones = (10, 13)
  c.train.epochs = 15
  c.train.batch_size = 64
  c.train.log_every_steps = 10
  c.train.eval_every_epochs = 5
  c.train.eval_examples = 0
  c.train.eval_batch_size = 120
  c.train.checkpoint_every_steps = 100
  c.eval_pgd.eps = 32 / 255
  c.eval_pgd.step_size = 8 / 255
  c.eval.eps = 32 / 255
  c.eval.batch_size = 120
  return c
