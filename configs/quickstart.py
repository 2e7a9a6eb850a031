r"""Quick start: PGD-AT on the embedded handwritten-digits data set, no download needed.

    python main.py --config=configs/quickstart.py --workdir=workdirs/quickstart

A small ResNet (3 stages of one basic block, widths 32-64-128) on scikit-learn's 1797
real 8x8 digits (upsampled to 16x16, fixed 1437/360 split), eps 32/255, 15 epochs.
`configs/quickstart.py:cas`, `:fsr` or `:cifs` trains the defended models (CIFS on the
last two blocks: layer2.0 with the nonlinear probe, layer3.0 with the linear one; at this
budget CIFS underfits: its mask shrinks the features by about 1/C and 15 epochs from
scratch do not let the head compensate). It takes minutes on a CPU; the README's results
table has what each ends at, with the full evaluation.

With extra data (`:extra`, or `:cas,extra` ...): the generated-data recipe's parts, with a
demonstration extra source (augmented copies of the training digits, not generated data):

    python -m jaxdefense.data.demo_extra --output=workdirs/digits_extra.npz
    python main.py --config=configs/quickstart.py:extra --workdir=workdirs/quickstart_extra

trained as `configs/generated.py:wang2023` trains: round(0.7 x 64) = 45 images of every
batch drawn with replacement from the extra source, 19 from the real set, an epoch counted
as ceil(1437 / 64) = 23 batches; TRADES (beta 5) with label smoothing 0.1 on its natural
CE; Nesterov SGD without weight decay on BatchNorm, one warm-up epoch then a cosine; a
weight EMA (decay 0.99, the dynamic warm-up over the first 2.5% of the steps, BatchNorm
statistics the model's), which is what is evaluated. It shows the pipeline running in a few
minutes on a CPU; its numbers say nothing about generated data.
"""
from jaxdefense import defenses
from jaxdefense.config import defaults, spec

EXTRA = "workdirs/digits_extra.npz"  # Written by `python -m jaxdefense.data.demo_extra`.


def get_config(argument: str = "none"):
  argument = "none,extra" if argument == "extra" else argument or "none"
  defense, with_extra = spec.parse(argument, "configs/quickstart.py",
                                   spec.Field("DEFENSE", defenses.NAMES),
                                   spec.Field("extra", ("extra",), ""))
  c = defaults.get()
  c.name = "quickstart"
  c.data.name = "digits"
  c.model.arch = "resnet"
  c.model.kwargs.stage_sizes = (1, 1, 1)
  c.model.kwargs.width = 32
  c.defense.name = defense
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
  if with_extra:
    _with_extra(c)
  return c


def _with_extra(c) -> None:
  c.name = "quickstart_extra"
  c.data.extra = (EXTRA,)
  c.data.extra_fraction = 0.7
  c.data.epoch_steps = "batch"
  c.objective.name = "trades"
  c.objective.beta = 5.0
  c.objective.label_smoothing = 0.1
  c.optim.nesterov = True
  c.optim.decay_batchnorm = False
  c.optim.schedule = "cosine"
  c.optim.warmup_epochs = 1
  c.train.ema_decay = 0.99
  c.train.ema_schedule = "warmup"
  c.train.ema_warmup_steps = 8  # 2.5% of the 15 x 23 = 345 steps.
  c.train.ema_batch_stats = "live"
