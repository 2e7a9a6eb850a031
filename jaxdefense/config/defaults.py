"""Every field a run reads, with the papers' defaults (docs/method.md section 3).

Config files in `configs/` start from `get()` and change what their recipe needs; any field
can be overridden on the command line, e.g. `--config.optim.lr=0.05`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "default"
  c.seed = 0
  # A workdir whose latest checkpoint initialises a fresh training (one trained here, or
  # PyTorch weights imported by `python -m jaxdefense.interop.convert import`): fine-tuning.
  c.init_from = config_dict.placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"             # One of jaxdefense.data.NAMES.
  c.data.data_dir = config_dict.placeholder(str)  # TFDS directory (default ~/tensorflow_datasets)
  c.data.num_train = config_dict.placeholder(int)  # Keep the first N training points.
  c.data.num_test = config_dict.placeholder(int)   # Keep the first N test points.
  c.data.image_size = config_dict.placeholder(int)  # digits / synthetic only.
  # Extra labelled images mixed into every batch (generated data): files or globs, local or
  # gs://, each an .npz with `image` uint8 (N, H, W, C) and `label`, or a directory made by
  # `python -m jaxdefense.data.prepare` (random access, never held whole in memory).
  c.data.extra = ()
  c.data.extra_fraction = 0.0         # Every global batch holds round(f x batch) extra images.
  # How many steps an epoch is when extra data is mixed in (jaxdefense.data.EPOCH_STEPS):
  # "real" = one pass over the real training set's share of the batches (num_train // real
  # images per batch); "batch" = ceil(num_train / batch_size) steps (the real set's size in
  # batches, as DM-Improves-AT).
  c.data.epoch_steps = "real"
  c.data.buffer_batches = 4           # Batches read ahead on each host (bounds host memory).
  # Remote (gs://) extra data: range requests in flight per host, and a local directory to
  # copy it into in the background, read from as it fills (docs/generated.md).
  c.data.read_concurrency = 256
  c.data.extra_cache_dir = config_dict.placeholder(str)

  c.model = ml_collections.ConfigDict()
  c.model.arch = "resnet18"           # See jaxdefense.models.ARCHITECTURES.
  c.model.dtype = "float32"           # Compute dtype, one of models.DTYPES.
  c.model.kwargs = ml_collections.ConfigDict()    # Architecture fields, e.g. depth, width.

  c.defense = ml_collections.ConfigDict()
  c.defense.name = "none"             # One of defenses.NAMES.
  c.defense.sites = ()                # Insertion points / globs; () = the authors' placement.
  c.defense.beta = 2.0                # CAS / CIFS auxiliary (probe) CE weight.
  c.defense.tau = 0.1                 # FSR Gumbel-sigmoid temperature.
  c.defense.lam_sep = 1.0             # FSR separation loss weight.
  c.defense.lam_rec = 1.0             # FSR recalibration loss weight.
  c.defense.hidden = 64               # FSR separation / recalibration width.
  c.defense.probe_hidden = 0          # CIFS nonlinear probe width; 0 = the backbone's
  #                                     (128; WRN 240).
  c.defense.linear_sites = ()         # CIFS sites with a linear probe; () = the deepest one.
  c.defense.mask_scale = 1.0          # CIFS mask = mask_scale x softmax (the July 2021 code: 2).
  c.defense.loss_rescale = True       # CIFS: the joint loss x 3 / (beta + 1).

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "pgd_at"         # One of training.objectives.NAMES.
  c.objective.beta = 6.0              # TRADES / MART robust-term weight.
  # Label smoothing s of the objective's cross-entropy on the labels, (1 - s) onehot + s / K,
  # on every example ("all") or on the extra (generated) examples only ("extra")
  # (training.objectives.LABEL_SMOOTHING_ON).
  c.objective.label_smoothing = 0.0
  c.objective.label_smoothing_on = "all"
  # AWP (Wu et al. 2020): the weights perturbed layer-wise by gamma x ||w|| in the
  # direction that increases the loss before each update, removed after it; 0 turns it off.
  c.objective.awp_gamma = 0.0
  c.objective.awp_warmup_epochs = 0   # Completed epochs before AWP starts.
  c.objective.attack = ml_collections.ConfigDict()
  c.objective.attack.eps = 8 / 255
  c.objective.attack.step_size = 2 / 255
  c.objective.attack.steps = 10
  c.objective.attack.loss = "auto"    # attacks.losses.ATTACK_LOSSES; auto: the authors'.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.optim.decay_batchnorm = True      # False: no weight decay on BatchNorm scales and biases.
  # One of training.optim.SCHEDULES; onecycle: PyTorch's OneCycleLR stepped per epoch, its
  # momentum cycled 0.95 -> 0.85 -> 0.95, warmup_epochs its rising phase.
  c.optim.schedule = "piecewise"
  # Linear warm-up from 0 over the first warmup_epochs (any schedule), then the schedule.
  c.optim.warmup_epochs = 0.0
  # > 0: the learning rate is lr x batch_size / lr_reference_batch (DeepMind: 0.1 x B / 256).
  c.optim.lr_reference_batch = 0
  # Completed epochs after which lr *= decay_factor (piecewise). The authors' scripts drop
  # from their 1-based epoch 75 and 90 on, i.e. after 74 and 89 completed epochs.
  c.optim.milestones = (74, 89)
  c.optim.decay_factor = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 100
  c.train.batch_size = 128            # Global batch, split over all devices.
  c.train.ema_decay = 0.0             # 0 turns the weight EMA off; else it is evaluated.
  # training.train_state.EMA_SCHEDULES. constant: decay ema_decay at every step. warmup:
  # decay 0 (the EMA copies the weights) for the first ema_warmup_steps updates, then
  # min(ema_decay, (1 + d) / (10 + d)), d the updates since (DeepMind's, Wang et al.'s).
  c.train.ema_schedule = "constant"
  c.train.ema_warmup_steps = 0
  # training.steps.EMA_BATCH_STATS. average: the EMA averages BatchNorm statistics too;
  # live: it takes the model's (both generated-data recipes average the parameters only).
  c.train.ema_batch_stats = "average"
  c.train.log_every_steps = 50
  c.train.eval_every_epochs = 5
  c.train.eval_examples = 1000        # Test points for in-training evaluation (0 = all).
  c.train.eval_batch_size = 200
  c.train.checkpoint_every_steps = 1000
  c.train.keep_checkpoints = 3
  # Seconds a training's lease on its workdir (lock.json) lasts unrenewed: the run renews it
  # every lease_timeout_s / 4 and at each checkpoint save; a run that died (killed, preempted,
  # requeued on another host) is taken over by the same command once it is this old.
  c.train.lease_timeout_s = 300.0

  # The in-training robust accuracy (PGD-20), which also ranks checkpoints for "best".
  c.eval_pgd = ml_collections.ConfigDict()
  c.eval_pgd.eps = 8 / 255
  c.eval_pgd.step_size = 2 / 255
  c.eval_pgd.steps = 20
  c.eval_pgd.random_start = True
  c.eval_pgd.loss = "auto"            # ATTACK_LOSSES; auto: CAS, CIFS their own, else CE.

  c.eval = ml_collections.ConfigDict()  # --mode=eval (docs/evaluation.md).
  c.eval.num_examples = 0             # The first N test points (0 = all).
  c.eval.batch_size = 200
  c.eval.eps = 8 / 255
  c.eval.seed = 0
  c.eval.norm = "linf"                # attacks.common.NORMS (not linf: protocol autoattack,
  #                                     or PGD / AutoAttack attacks).
  c.eval.dtype = ""                   # Compute dtype of the evaluation ("" = model.dtype;
  #                                     bfloat16: perturbations and losses stay float32).
  # One of evaluation.protocols.PROTOCOLS: the attacks of each paper's protocol,
  # RobustBench's, or all of them with the adaptive ones.
  c.eval.protocol = "full"
  # Non-empty: these attacks instead of the protocol's, of fgsm, pgd20, pgd100, pgd20_rs, cw,
  # cas_fgsm, cas_pgd20, cas_cw, cifs_fgsm, cifs_pgd20, cifs_pgd100, cifs_cw,
  # cifs_mask_pgd100, autoattack, autoattack_rand, adaptive, eot; the adaptive ones run
  # where they apply (adaptive: CAS / FSR / CIFS; eot, autoattack_rand: FSR; cifs_mask: CIFS).
  c.eval.attacks = ()
  c.eval.adaptive_steps = 100         # PGD steps on the defense's own training loss.
  c.eval.eot_samples = 20             # Gumbel-mask draws averaged per EOT step.
  # AutoAttack's budgets (apgd_ce = APGD-CE, ...): None keeps the version's for the norm
  # (attacks.auto_attack.version_options: L-inf / L2 standard APGD-CE 1 restart, APGD-T 9
  # targets; L1 APGD-CE 5 restarts, APGD-T 5 targets over decreasing eps), e.g.
  # --config.eval.autoattack_options.square.queries=1000 (the rand version's EOT draws are
  # eval.eot_samples).
  number = lambda: ml_collections.config_dict.placeholder(int)  # A fresh field each.
  flag = lambda: ml_collections.config_dict.placeholder(bool)
  c.eval.autoattack_options = ml_collections.ConfigDict({
      "apgd_ce": {"steps": number(), "restarts": number(), "largereps": flag()},
      "apgd_dlr": {"steps": number(), "restarts": number()},
      "apgd_t": {"steps": number(), "restarts": number(), "n_target": number(),
                 "largereps": flag()},
      "fab_t": {"steps": number(), "restarts": number(), "n_target": number()},
      "square": {"queries": number(), "restarts": number(),
                 "p_init": ml_collections.config_dict.placeholder(float)},
  })

  # > 1 (one device only): each AutoAttack attack runs on the points still robust,
  # gathered, in batches of eval.batch_size / autoattack_chunks (as many as they need): the
  # same results, the work following the robust points (attacks.common.run_on_robust);
  # faster when few points stay robust (benchmarks/RESULTS.md, "chunks").
  c.eval.autoattack_chunks = 1

  c.audit = ml_collections.ConfigDict()  # --mode=audit (docs/audit.md), at eval's eps and norm.
  # The PGD attack of eval's suite whose runs the indicators of attack failure examine.
  c.audit.attack = "pgd100"
  # Of unavailable_gradients, unstable_predictions, silent_success, incomplete_optimization,
  # transfer_failure (needs surrogate_workdir), unconstrained_failure.
  c.audit.indicators = ("unavailable_gradients", "unstable_predictions", "silent_success",
                        "incomplete_optimization", "transfer_failure", "unconstrained_failure")
  c.audit.surrogate_workdir = ""      # A trained workdir, e.g. the same recipe undefended.
  c.audit.eps_factors = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # Accuracy vs eps, x eval.eps.
  c.audit.iterations = (1, 2, 5, 10, 20, 50, 100)  # Accuracy vs the audit attack's steps.
  c.audit.restarts = (1, 2, 4, 8)     # Accuracy vs random restarts (worst over the first r).
  c.audit.curve_steps = 20            # PGD steps of each eps and restart curve point.

  c.analysis = ml_collections.ConfigDict()  # --mode=analyze.
  c.analysis.class_index = 0          # The class whose images the activation frequency uses.
  return c


DATASETS = ("cifar10", "cifar100", "svhn")


def paper_recipe(arch: str, defense: str, dataset: str = "cifar10") -> ml_collections.ConfigDict:
  """The FSR paper's PGD-AT recipe for `arch` + `defense` on `dataset` (wkim97/FSR
  train.py; docs/method.md sections 3, 7): SGD 0.9, wd 5e-4, batch 128, 100 epochs, lr 0.1
  (SVHN 0.01) x0.1 from 1-based epoch 75 and 90 on, PGD-10 at eps 8/255 with step 2/255
  (SVHN 1/255), CIFAR pad-crop-flip augmentation."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown data set {dataset!r} for a paper recipe; allowed: "
                     f"{', '.join(DATASETS)}")
  c = get()
  c.name = f"{arch}_{defense}_{dataset}"
  c.data.name = dataset
  c.model.arch = arch
  c.defense.name = defense
  if dataset == "svhn":
    c.optim.lr = 0.01
    c.objective.attack.step_size = 1 / 255
  return c
