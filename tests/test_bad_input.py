"""Every bad value a user can give, in every mode and in the converter, is refused in one
`error:` line naming it, with its exit code, before any data is loaded: a table of bad
command lines, driven through each program's own parsing and main function (one process
per program: tests/cli_driver.py), and two of them through real subprocesses."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, run_main

QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")

# (flags after --config=quickstart --workdir=<fresh dir>, expected words of the line, exit).
TRAIN = [
    (["--config.data.name=imagenet"], "unknown data set 'imagenet'; allowed: cifar10", 2),
    (["--config.model.arch=resnet9"], "unknown model.arch 'resnet9'; allowed:", 2),
    (["--config.model.dtype=float16"], "unknown model.dtype 'float16'; allowed: float32", 2),
    (["--config.model.kwargs.widthh=8"], "the config has no field 'widthh'", 2),
    (["--config.model.kwargs.width=0"], "model.kwargs", 2),
    (["--config.defense.name=dropout"], "unknown defense 'dropout'; allowed: none, cas", 2),
    (["--config.defense.name=cas", "--config.defense.sites=('nowhere',)"],
     "'nowhere' is not an insertion point of ResNet", 2),
    (["--config.defense.name=fsr", "--config.defense.tau=0"], "defense.tau must be > 0", 2),
    (["--config.objective.name=awp"], "unknown objective 'awp'; allowed: pgd_at", 2),
    (["--config.defense.name=cifs", "--config.objective.name=trades"],
     "objective 'trades' is not defined for CIFS", 2),
    (["--config.objective.attack.eps=-0.1"], "objective.attack.eps must be >= 0, got -0.1", 2),
    (["--config.eval.eps=2.0"], "eval.eps is an L-inf radius on images in [0, 1] and must be "
     "<= 1 (eps 1 already allows any image; for 2/255 give 0.00784314), got 2.0", 2),
    (["--config.eval_pgd.eps=8"], "eval_pgd.eps is an L-inf radius", 2),
    (["--config.objective.attack.eps=4.0"], "objective.attack.eps is an L-inf radius", 2),
    (["--config.objective.attack.steps=-1"], "objective.attack.steps must be an integer >= 0", 2),
    (["--config.objective.beta=-1"], "objective.beta must be a finite number >= 0", 2),
    (["--config.optim.lr=-0.1"], "optim.lr must be a finite number >= 0, got -0.1", 2),
    (["--config.optim.lr=nan"], "optim.lr must be finite, got nan", 2),
    (["--config.optim.momentum=1.5"], "optim.momentum must be a finite number >= 0 and < 1", 2),
    (["--config.optim.schedule=step"], "unknown optim.schedule 'step'; allowed: piecewise", 2),
    (["--config.optim.milestones=(13,10)"], "optim.milestones must be non-negative epoch", 2),
    (["--config.train.epochs=0"], "train.epochs must be an integer >= 1, got 0", 2),
    (["--config.train.epochs=abc"], "--config.train.epochs=abc: invalid literal for int()", 2),
    (["--config.train.ema_decay=1.0"], "train.ema_decay must be a finite number >= 0 and < 1", 2),
    (["--config.data.extra=('x.npz',)", "--config.data.extra_fraction=1.0"],
     "data.extra_fraction must be a finite number >= 0 and < 1, got 1.0", 2),
    (["--config.data.extra=('x.npz',)", "--config.data.extra_fraction=0.995"],
     "extra_fraction=0.995 leaves no real image in a batch of 64", 2),
    (["--config.data.extra=('x.npz',)", "--config.data.extra_fraction=0.0001"],
     "data.extra_fraction=0.0001 gives no extra image in a batch of 64 (round(0.0001 x 64) = 0);"
     " allowed: a fraction giving at least one extra image per batch, > 0.0078125", 2),
    (["--config.data.extra_fraction=0.5"], "a fraction > 0 needs data.extra", 2),
    (["--config.data.extra=('/nonexistent/g.npz',)", "--config.data.extra_fraction=0.5"],
     "extra data file /nonexistent/g.npz does not exist", 2),
    (["--config.data.extra=('/nonexistent/*.npz',)", "--config.data.extra_fraction=0.5"],
     "extra data pattern /nonexistent/*.npz matches no file", 2),
    (["--config.data.epoch_steps=pass"], "unknown data.epoch_steps 'pass'", 2),
    (["--config.data.read_concurrency=0"], "data.read_concurrency must be an integer >= 1", 2),
    (["--config.data.extra_cache_dir=gs://b/cache"], "data.extra_cache_dir must be a local "
     "directory, got 'gs://b/cache'", 2),
    (["--config.objective.label_smoothing=0.1", "--config.objective.label_smoothing_on=extra"],
     "smooths the extra images' labels only, but data.extra is empty", 2),
    (["--config.objective.name=mart", "--config.objective.label_smoothing=0.1"],
     "is not defined for MART", 2),
    (["--config.objective.awp_gamma=-0.01"], "objective.awp_gamma must be a finite number >= 0",
     2),
    (["--config.optim.schedule=onecycle", "--config.optim.warmup_epochs=0"],
     "must be a whole number of epochs >= 1 with optim.schedule='onecycle'", 2),
    (["--config.train.ema_schedule=linear"], "unknown train.ema_schedule 'linear'", 2),
    (["--config.train.ema_batch_stats=mean"], "unknown train.ema_batch_stats 'mean'", 2),
    (["--config.train.log_every_steps=0"], "train.log_every_steps must be an integer >= 1", 2),
    (["--config.train.keep_checkpoints=0"], "train.keep_checkpoints must be an integer >= 1", 2),
    (["--config.train.lease_timeout_s=0.5"], "train.lease_timeout_s must be a finite number >= 1",
     2),
    (["--config.data.num_train=5000"], "num_train must lie in [1, 1437]", 2),
    (["--config.data.image_size=12"], "image_size must be a positive multiple of 8", 2),
    (["--config.eval_pgd.loss=margin"], "unknown eval_pgd.loss 'margin'; allowed: auto", 2),
    (["--config.eval_pgd.step_size=0"], "eval_pgd.step_size must be a finite number > 0", 2),
    (["--config.seed=-1"], "seed must be an integer >= 0, got -1", 2),
    (["--mode=fit"], "--mode=fit: value should be one of <train|eval|audit|analyze>", 2),
    (["--config.init_from=/nonexistent/run"],
     "no checkpoint in /nonexistent/run/checkpoints (config.init_from=", 6),
    # Training checks the evaluation's fields too.
    (["--config.eval.norm=l0"], "unknown eval.norm 'l0'; allowed: linf, l2, l1", 2),
]
# The same with --mode=eval on an empty workdir (no checkpoint: checked after the config).
EVAL = [
    (["--config.eval.norm=l0"], "unknown eval.norm 'l0'; allowed: linf, l2, l1", 2),
    (["--config.eval.num_examples=-5"], "eval.num_examples must be an integer in [0, 360]", 2),
    (["--config.eval.num_examples=400"], "eval.num_examples must be an integer in [0, 360]", 2),
    (["--config.eval.eps=nan"], "eval.eps must be finite, got nan", 2),
    (["--config.eval.eps=-1"], "eval.eps must be a finite number >= 0, got -1.0", 2),
    (["--config.eval.protocol=robustbench"], "unknown eval.protocol 'robustbench'; allowed:", 2),
    (["--config.eval.attacks=('pgd7',)"], "unknown eval attack(s) ['pgd7']; allowed: fgsm", 2),
    (["--config.eval.norm=l2", "--config.eval.protocol=fsr"],
     "attack(s) ['fgsm', 'cw'] of protocol 'fsr' are L-inf only", 2),
    (["--config.eval.dtype=float16"], "unknown eval.dtype 'float16'; allowed: '', float32", 2),
    (["--config.eval.batch_size=0"], "eval.batch_size=0 must be a positive multiple", 2),
    (["--config.eval.seed=-3"], "eval.seed must be an integer >= 0", 2),
    (["--config.eval.adaptive_steps=0"], "eval.adaptive_steps must be an integer >= 1", 2),
    (["--config.eval.eot_samples=0"], "eval.eot_samples must be an integer >= 1", 2),
    (["--config.eval.autoattack_chunks=0"], "eval.autoattack_chunks must be an integer >= 1", 2),
    (["--config.eval.autoattack_options.apgd_t.n_target=10"], "n_target=10", 2),
    (["--config.eval.autoattack_options.apgd_ce.steps=0"], "steps must be an integer >= 1", 2),
    (["--config.eval.autoattack_options.square.queries=0"], "queries must be an integer >= 1", 2),
    (["--config.eval.autoattack_options.square.p_init=1.5"], "p_init must lie in (0, 1]", 2),
    (["--config.eval.autoattack_options.apgd_ce.foo=1"], "the config has no field 'foo'", 2),
    (["--mode=analyze", "--config.analysis.class_index=10"],
     "analysis.class_index must be an integer in [0, 9], got 10", 2),
    (["--checkpoint=first"], "--checkpoint=first: value should be one of", 2),
    ([], "no checkpoint in", 6),
    # --mode=audit: the indicators, the surrogate, the curves' grids.
    (["--mode=audit", "--config.audit.indicators=('silent',)"],
     "unknown audit.indicators ['silent']; allowed: unavailable_gradients", 2),
    (["--mode=audit", "--config.audit.attack=fgsm"], "unknown audit.attack 'fgsm'; allowed:", 2),
    (["--mode=audit", "--config.audit.eps_factors=(0.5,-1.0)"],
     "audit.eps_factors must be a finite number > 0 (each a multiple of eval.eps), got -1.0", 2),
    (["--mode=audit", "--config.audit.eps_factors=(2.0,1.0)"],
     "audit.eps_factors must be increasing, without repeats", 2),
    (["--mode=audit", "--config.audit.iterations=(0,5)"],
     "audit.iterations must be an integer in [1, 100] (the steps of audit.attack 'pgd100')", 2),
    (["--mode=audit", "--config.audit.restarts=(0,)"], "audit.restarts must be an integer >= 1",
     2),
    (["--mode=audit", "--config.audit.curve_steps=0"], "audit.curve_steps must be an integer",
     2),
    (["--mode=audit", "--config.audit.surrogate_workdir=/nonexistent/s"],
     "--config.audit.surrogate_workdir=/nonexistent/s: no checkpoint", 6),
    (["--mode=audit"], "no checkpoint in", 6),
]


def _drive(program, cases, tmp_path, env=None):
  path = tmp_path / f"{program}_cases.json"
  path.write_text(json.dumps(cases))
  out = tmp_path / f"{program}_results.json"
  subprocess.run([sys.executable, "-m", "tests.cli_driver", program, str(path), str(out)],
                 cwd=ROOT, check=True, timeout=600, env=dict(os.environ, **(env or {})))
  return json.loads(out.read_text())


def _check(result, words, code):
  lines = [line for line in result["stderr"].splitlines() if line.strip()]
  where = f"{result['argv']}: {result['stderr'][-2000:]}{result['traceback'] or ''}"
  assert result["traceback"] is None and "Traceback" not in result["stderr"], where
  assert len(lines) == 1 and lines[0].startswith("error: "), where
  assert words in lines[0], where
  assert result["code"] == code, where


def test_bad_values_of_training_and_evaluation_are_one_line_each(tmp_path):
  """Each bad value of the table: one `error:` line containing its words, the exit code,
  no traceback, and nothing written to the run's workdir (no checkpoints, no data read)."""
  cases, expected = [], []
  for i, (flags, words, code) in enumerate(TRAIN):
    cases.append([f"--config={QUICKSTART}", f"--workdir={tmp_path / f'train{i}'}", *flags])
    expected.append((words, code, tmp_path / f"train{i}"))
  (tmp_path / "empty").mkdir()
  for flags, words, code in EVAL:
    mode = [] if any(f.startswith("--mode") for f in flags) else ["--mode=eval"]
    cases.append([f"--config={QUICKSTART}", f"--workdir={tmp_path / 'empty'}", *mode, *flags])
    expected.append((words, code, tmp_path / "empty"))
  results = _drive("main", cases, tmp_path)
  for result, (words, code, workdir) in zip(results, expected):
    _check(result, words, code)
    assert not (workdir / "checkpoints").exists(), result["argv"]


def test_malformed_extra_files_are_one_line_each_before_training(tmp_path):
  """Extra .npz files with float images, 8x8 images for the quick start's 16x16, labels
  outside 0..9, no 'label', or not a zip: one line naming the file and the fault, exit 2,
  nothing written to the workdir."""
  import numpy as np  # noqa: PLC0415
  images = np.zeros((4, 16, 16, 1), np.uint8)
  files = {"float": dict(image=images.astype(np.float32), label=np.zeros(4, int)),
           "shape": dict(image=np.zeros((4, 8, 8, 1), np.uint8), label=np.zeros(4, int)),
           "labels": dict(image=images, label=np.array([0, 3, 10, 2])),
           "nolabel": dict(image=images)}
  for name, arrays in files.items():
    np.savez(tmp_path / f"{name}.npz", **arrays)
  (tmp_path / "text.npz").write_text("not a zip")
  says = {"float": "'image' must be uint8", "shape": "'image' must have shape (N, 16, 16, 1)",
          "labels": "labels must lie in [0, 10)", "nolabel": "no 'label' array",
          "text": "not a readable .npz file"}
  cases = [[f"--config={QUICKSTART}", f"--workdir={tmp_path / name}",
            f"--config.data.extra=('{tmp_path / name}.npz',)", "--config.data.extra_fraction=0.5"]
           for name in says]
  for (name, words), result in zip(says.items(), _drive("main", cases, tmp_path)):
    _check(result, words, 2)
    assert f"{name}.npz" in result["stderr"] and not (tmp_path / name).exists(), name


def test_bad_batch_size_for_the_device_count(tmp_path):
  """On 2 devices, a batch that does not split evenly is one line naming both numbers."""
  results = _drive("main", [[f"--config={QUICKSTART}", f"--workdir={tmp_path / 'run'}",
                             "--config.train.batch_size=33"]], tmp_path,
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                        "JAX_PLATFORMS": "cpu"})
  _check(results[0], "train.batch_size=33 must be a positive multiple of the device count 2", 2)


def test_damaged_and_unusable_workdirs_are_one_line_each(tmp_path):
  """A damaged config.json (exit 6) or lock.json (exit 4), a workdir that is a file (exit
  2): each one line naming the path and what to do."""
  damaged_config = tmp_path / "config_json"
  damaged_config.mkdir()
  (damaged_config / "config.json").write_text('{"parameter_fields": {')
  damaged_lock = tmp_path / "lock_json"
  damaged_lock.mkdir()
  (damaged_lock / "lock.json").write_text("\x00\x01 not json")
  as_file = tmp_path / "a_file"
  as_file.write_text("")
  base = [f"--config={QUICKSTART}", *TINY]
  cases = [[*base, f"--workdir={damaged_config}"], [*base, f"--workdir={damaged_lock}"],
           [*base, f"--workdir={as_file}"],
           [*base, f"--workdir={damaged_config}", "--mode=eval"]]
  results = _drive("main", cases, tmp_path)
  _check(results[0], f"{damaged_config / 'config.json'} is damaged", 6)
  _check(results[1], f"{damaged_lock / 'lock.json'} is damaged", 4)
  assert "delete" in results[1]["stderr"]
  _check(results[2], f"workdir {as_file} is not a writable directory", 2)
  _check(results[3], "no checkpoint in", 6)


def test_bad_converter_inputs_are_one_line_each(tmp_path):
  pytest.importorskip("torch")
  (tmp_path / "text.pt").write_text("not a checkpoint")
  base = [f"--config={QUICKSTART}", "--layout=resnet18"]
  cases = [
      (["import", *base, f"--workdir={tmp_path / 'a'}", f"--torch={tmp_path / 'nope.pt'}"],
       "no such file", 5),
      (["import", *base, f"--workdir={tmp_path / 'b'}", f"--torch={tmp_path / 'text.pt'}"],
       "is not a PyTorch state_dict", 5),
      (["import", f"--config={QUICKSTART}", "--layout=foo", f"--workdir={tmp_path / 'c'}",
        "--torch=x.pt"], "--layout=foo: value should be one of", 2),
      (["import", *base, f"--workdir={tmp_path / 'd'}", "--torch=x.pt",
        "--config.eval.eps=nan"], "eval.eps must be finite, got nan", 2),
      (["export", *base, f"--workdir={tmp_path / 'e'}", f"--torch={tmp_path / 'out.pt'}"],
       "no checkpoint in", 6),
      (["convert", *base, f"--workdir={tmp_path / 'f'}", "--torch=x.pt"],
       "usage: python -m jaxdefense.interop.convert import|export", 2),
  ]
  results = _drive("convert", [c for c, _, _ in cases], tmp_path)
  for result, (_, words, code) in zip(results, cases):
    _check(result, words, code)


def test_a_surrogate_of_other_data_is_one_line(tmp_path):
  """A surrogate workdir whose config.json trains on CIFAR-10, for a digits audit."""
  surrogate = tmp_path / "cifar_run"
  (surrogate / "checkpoints").mkdir(parents=True)
  (surrogate / "config.json").write_text(json.dumps(
      {"config": {"data": {"name": "cifar10", "image_size": 32}}}))
  (tmp_path / "empty").mkdir()
  results = _drive("main", [[f"--config={QUICKSTART}", f"--workdir={tmp_path / 'empty'}",
                             "--mode=audit", f"--config.audit.surrogate_workdir={surrogate}"]],
                   tmp_path)
  _check(results[0], "holds a model of data set 'cifar10' (10 classes, image size 32); this "
                     "audit's is 'digits'", 2)


@pytest.mark.parametrize("flags,words", [
    (["--config.eval.norm=l0"], "unknown eval.norm 'l0'; allowed: linf, l2, l1"),
    (["--config.model.kwargs.widthh=8"], "the config has no field 'widthh'"),
])
def test_the_real_command_line_prints_one_line(tmp_path, flags, words):
  """The same through `python main.py` itself (absl's app.run, our flags parser)."""
  run = run_main(tmp_path / "run", *flags, timeout=120)
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert run.returncode == 2 and len(lines) == 1 and words in lines[0], run.stderr[-2000:]
