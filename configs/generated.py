r"""Adversarial training with generated data in every batch: the recipes of Wang et al. 2023
(github wzekai99/DM-Improves-AT, `train-wa.py`) and Gowal et al. 2021 (DeepMind,
github google-deepmind/deepmind-research `adversarial_robustness/jax/experiment.py`).

    python main.py --config=configs/generated.py:wang2023,wrn28_10 \
        --config.data.extra="('/data/edm/1m.npz',)" --workdir=workdirs/wang_wrn28_10
    python main.py --config=configs/generated.py:gowal2021,wrn28_10 \
        --config.data.extra="('/data/cifar10_ddpm.npz',)" --workdir=workdirs/gowal_wrn28_10
    python -m jaxdefense.data.prepare --source=/data/edm/20m.npz --output=/data/edm/20m

The argument is `RECIPE,ARCH[,DATASET]`: RECIPE wang2023 | gowal2021, ARCH wrn28_10 |
wrn70_16 (Swish WideResNets with the data set's mean / std inside the model and TF-style
padding, the `dm_wrn` layout), DATASET cifar10 (default) | cifar100. `data.extra` names the
generated images (an .npz with `image` and `label`, or a directory prepared from one for
sources too large for memory); `--config.defense.name=cas|fsr|cifs` trains a defense on top
of either recipe. Both draw 70% of every batch from the generated images (with replacement)
and count an epoch as ceil(50000 / batch) steps; both train TRADES with PGD-10 at 8/255,
step 2/255, SGD with Nesterov momentum, weight decay 5e-4 off BatchNorm, 10 warm-up epochs
of 400, BatchNorm momentum 0.01 (PyTorch's), and evaluate a parameter EMA (decay 0.995,
dynamic warm-up, BatchNorm statistics the model's).
- wang2023: batch 512, lr 0.2 on PyTorch's OneCycleLR stepped per epoch (a cosine from
  0.008 up to 0.2 over 10 epochs, then down; momentum 0.95 -> 0.85 -> 0.95), TRADES beta 5,
  label smoothing 0.1 on every label (the natural CE term), the EMA copying the weights for
  the first 2.5% of training. Its README
  reports WRN-28-10 92.44% clean / 67.31% AutoAttack and WRN-70-16 93.25% / 70.69% (with
  20M and 50M images per the paper).
- gowal2021: batch 1024, lr 0.1 x 1024 / 256 = 0.4 (linear warm-up from 0, then a cosine
  to 0, per step), momentum 0.9, TRADES beta 6, label smoothing 0.1 on the generated
  images' labels only. Its README reports WRN-28-10 with 1M DDPM images
  87.33% clean / 60.75% AutoAttack (Rebuffi et al. 2021, the same code).
DeepMind's code keeps its final EMA (no best checkpoint): evaluate it with
`--mode=eval --checkpoint=last --config.eval.protocol=autoattack`. Where these differ from
the authors' code (their training attacks, the real images repeated in DeepMind's batches,
DeepMind's zero-initialised logits, the checkpoint selection): docs/fidelity.md,
"Generated-data recipes"."""
import ml_collections

from jaxdefense import data
from jaxdefense.config import defaults, spec

RECIPES = ("wang2023", "gowal2021")
ARCHS = {"wrn28_10": (28, 10), "wrn70_16": (70, 16)}
CIFAR_TRAIN = 50_000


def get_config(argument: str = "wang2023,wrn28_10"):
  recipe, arch, dataset = spec.parse(argument or "wang2023,wrn28_10", "configs/generated.py",
                                     spec.Field("RECIPE", RECIPES), spec.Field("ARCH", ARCHS),
                                     spec.Field("DATASET", data.MEAN_STD, "cifar10"))
  c = defaults.get()
  c.name = f"{recipe}_{arch}_{dataset}"
  c.data.name = dataset
  # The released file names (the docstring says where they are); give their paths.
  c.data.extra = ((f"{dataset}_ddpm.npz",) if recipe == "gowal2021" else ("1m.npz",))
  c.data.extra_fraction = 0.7
  c.data.epoch_steps = "batch"
  depth, width = ARCHS[arch]
  mean, std = data.MEAN_STD[dataset]
  c.model.arch = "wide_resnet"
  c.model.kwargs = ml_collections.ConfigDict({
      "depth": depth, "width": width, "activation": "swish", "conv_padding": "asymmetric",
      "input_mean": mean, "input_std": std, "bn_momentum": 0.99})
  c.objective.name = "trades"
  c.objective.attack.eps, c.objective.attack.step_size = 8 / 255, 2 / 255
  c.objective.attack.steps = 10
  c.objective.label_smoothing = 0.1
  c.optim.momentum, c.optim.nesterov = 0.9, True
  c.optim.weight_decay, c.optim.decay_batchnorm = 5e-4, False
  c.optim.schedule, c.optim.warmup_epochs = "cosine", 10
  c.train.epochs = 400
  c.train.ema_decay, c.train.ema_schedule, c.train.ema_batch_stats = 0.995, "warmup", "live"
  c.train.eval_every_epochs = 25
  c.eval.protocol = "autoattack"
  if recipe == "wang2023":
    c.optim.schedule = "onecycle"  # Its `cosinew`: OneCycleLR(pct_start=0.025) per epoch.
    c.train.batch_size = 512
    c.optim.lr = 0.2
    c.objective.beta = 5.0
    c.objective.label_smoothing_on = "all"
    steps_per_epoch = -(-CIFAR_TRAIN // c.train.batch_size)  # 98.
    # The EMA is the weights until 2.5% of the steps (watrain.py's warmup_steps, counted
    # from its 1-based global step).
    c.train.ema_warmup_steps = int(0.025 * c.train.epochs * steps_per_epoch) - 1
  else:
    c.train.batch_size = 1024
    c.optim.lr, c.optim.lr_reference_batch = 0.1, 256
    c.objective.beta = 6.0
    c.objective.label_smoothing_on = "extra"
    c.train.ema_warmup_steps = 0
  return c
