"""The evaluation suite and the activation analysis on checkpoints written by training."""
import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from jaxdefense import attacks, data, defenses
from jaxdefense.config import validation
from jaxdefense.evaluation import analysis, audit, curves, evaluate, indicators, protocols, setup
from jaxdefense.training import train
from tests.helpers import ROOT, TINY, run_main, tiny_config

FAST_AA = {"apgd_ce": {"steps": 10}, "apgd_t": {"steps": 10, "n_target": 2},
           "fab_t": {"steps": 10, "n_target": 2}, "square": {"queries": 100},
           "apgd_dlr": {"steps": 10}}


def _config(defense):
  c = tiny_config(defense, "natural")
  c.data.num_train, c.data.num_test = None, 96
  c.train.epochs, c.train.eval_every_epochs, c.train.ema_decay = 4, 4, 0.0
  c.train.log_every_steps, c.train.checkpoint_every_steps = 44, 1000  # Saved at the end.
  c.optim.lr, c.optim.milestones = 0.05, (3,)
  c.eval.eps, c.eval.batch_size, c.eval.eot_samples, c.eval.adaptive_steps = 0.1, 48, 2, 20
  c.eval_pgd.eps, c.eval_pgd.step_size = 0.1, 0.025
  c.eval.attacks = ("fgsm", "pgd20", "cw", "autoattack", "adaptive", "eot")
  for name, options in FAST_AA.items():
    c.eval.autoattack_options[name].update(options)
  c.eval.autoattack_chunks = 2  # Gathered robust points (equal to whole: test_autoattack).
  return c


@pytest.fixture(scope="module")
def trained_fsr(tmp_path_factory, rolled_attack_loops):
  """A naturally trained tiny ResNet + FSR on digits (its training log and workdir)."""
  workdir = str(tmp_path_factory.mktemp("fsr"))
  config = _config("fsr")
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_eval_suite_on_a_trained_checkpoint(trained_fsr):
  """Every attack drives a naturally trained model far below its natural accuracy; no
  robust accuracy exceeds natural; the worst case is at most every attack; evaluating the
  final checkpoint reproduces the natural accuracy training logged; eval.json/eval.md, and
  robustbench.json with AutoAttack's and the natural accuracy."""
  config, workdir, logged = trained_fsr
  report = evaluate.run(config, workdir, which="latest")
  r = report["results"]
  natural = r["natural"]["accuracy"]
  assert natural == pytest.approx(logged["natural_accuracy"])
  assert natural > 0.6
  attacked = {k: v["accuracy"] for k, v in r.items() if k not in ("natural", "worst_case")}
  assert set(attacked) == set(config.eval.attacks)
  for name, accuracy in attacked.items():
    assert accuracy <= natural, name
    assert accuracy < 0.5 * natural, (name, accuracy, natural)
    assert r["worst_case"]["accuracy"] <= accuracy
  assert r["pgd20"]["num_points"] == 96 and r["pgd20"]["eps"] == 0.1
  # Passes, as adv-lib counts them (examples x model calls): PGD-k makes k forward and k
  # backward passes per point, FGSM one, C&W 30; AutoAttack's are within its budget.
  for name, steps in (("pgd20", 20), ("fgsm", 1), ("cw", 30)):
    assert (r[name]["forward_passes"], r[name]["backward_passes"]) == (96 * steps,) * 2, name
  assert 0 < r["autoattack"]["backward_passes"] < r["autoattack"]["forward_passes"]
  assert r["eot"]["forward_passes"] == 96 * 20 * config.eval.eot_samples
  saved = json.load(open(os.path.join(workdir, "eval.json")))
  assert saved["results"]["worst_case"]["accuracy"] == r["worst_case"]["accuracy"]
  # Per-point outcomes: each attack's flags average to its accuracy, the worst case is their
  # AND, and the fingerprint is that of the first 96 test points.
  robust = evaluate.robust_points(saved)
  assert set(robust) == {"natural", "worst_case", *attacked}
  for name, flags in robust.items():
    assert flags.shape == (96,) and flags.mean() == pytest.approx(r[name]["accuracy"]), name
  assert np.array_equal(robust["worst_case"], np.logical_and.reduce(list(robust.values())))
  dataset = data.from_config(config)
  assert saved["outcomes"]["fingerprint"] == evaluate.points_fingerprint(
      dataset.test_images[:96], dataset.test_labels[:96])
  assert evaluate.robust_points({"results": r}) is None  # Written before outcomes were.
  table = open(os.path.join(workdir, "eval.md")).read()
  for title in ("Natural", "FGSM", "PGD-20", "C&W", "AA", "Worst case"):
    assert f"| {title}" in table or f" {title} |" in table
  assert f"| PGD-20 | {r['pgd20']['time_s']:.1f} | 1920 | 1920 |" in table
  listing = json.load(open(os.path.join(workdir, "robustbench.json")))
  assert listing["autoattack_acc"] == f"{100 * r['autoattack']['accuracy']:.2f}"
  assert listing["clean_acc"] == f"{100 * natural:.2f}" and listing["dataset"] == "digits"


def test_bfloat16_evaluation_is_close_to_float32(trained_fsr):
  """eval.dtype=bfloat16 (perturbation and loss in float32) on 96 points: natural and
  PGD-20 accuracies within 2 points (2.1%) of float32; the report says which it was."""
  config, workdir, _ = trained_fsr
  config = config.copy_and_resolve_references()
  config.eval.attacks = ("pgd20",)
  f32 = evaluate.run(config, workdir, which="latest")
  config.eval.dtype = "bfloat16"
  bf16 = evaluate.run(config, workdir, which="latest")
  assert (f32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
  for name in ("natural", "pgd20"):
    a, b = f32["results"][name]["accuracy"], bf16["results"][name]["accuracy"]
    assert abs(a - b) <= 2 / 96 + 1e-9, (name, a, b)
  assert "bfloat16 compute" in open(os.path.join(workdir, "eval.md")).read()


def test_undefended_model_skips_adaptive_attacks(tmp_path, rolled_attack_loops):
  config = _config("none")
  config.train.epochs = 1
  config.eval.attacks = ("pgd20", "adaptive", "eot")
  train.train_and_evaluate(config, str(tmp_path))
  report = evaluate.run(config, str(tmp_path), which="best")
  assert report["results"]["adaptive"]["skipped"] == "not applicable to defense 'none'"
  assert report["results"]["worst_case"]["attacks"] == ["pgd20"]
  with pytest.raises(ValueError, match="unknown eval attack.*'pgd7'.*allowed: fgsm, pgd20"):
    config.eval.attacks = ("pgd7",)
    evaluate.run(config, str(tmp_path))
  config.eval.attacks = ("autoattack",)
  config.eval.autoattack_chunks = 0
  with pytest.raises(ValueError, match="eval.autoattack_chunks must be an integer >= 1, got 0"):
    evaluate.run(config, str(tmp_path))


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
    evaluate.run(_config("none"), str(tmp_path))


def test_analysis(trained_fsr):
  """Channel magnitudes at the FSR site for natural vs PGD inputs, their uniformity in
  (0, 1], FSR's non-robust mask fractions, analysis.json (and plots with matplotlib)."""
  config, workdir, _ = trained_fsr
  report = analysis.run(config, workdir, which="latest")
  assert report["num_examples"] == 96
  site = report["sites"]["layer2.0"]
  for kind in ("natural", "adversarial"):
    magnitudes = np.asarray(site[kind]["channel_magnitude"])
    assert magnitudes.shape == (16,) and (magnitudes >= 0).all()
    assert 0 < site[kind]["uniformity"] <= 1
  (fractions,) = report["fsr_masks"].values()
  assert 0 <= fractions["natural_non_robust_fraction"] <= 1
  assert json.load(open(os.path.join(workdir, "analysis.json")))["sites"].keys() == {"layer2.0"}
  assert os.path.exists(os.path.join(workdir, "analysis_layer2.0.png"))
  frequency = report["activation_frequency"]
  images = int(np.sum(data.from_config(config).test_labels == 0))  # Class 0 of the 96.
  assert frequency["class_index"] == 0 and frequency["num_images"] == images > 0
  for kind in ("natural", "adversarial"):
    counts = np.asarray(frequency["sites"]["layer2.0"][kind])
    assert counts.shape == (16,) and counts.min() >= 0 and counts.max() <= images
  assert os.path.exists(os.path.join(workdir, "analysis_frequency_layer2.0.png"))


def test_cifs_protocol_and_mask_analysis(tmp_path, rolled_attack_loops):
  """A naturally trained tiny CIFS model: the cifs protocol runs its eight attacks (none
  above natural accuracy), the attack through the mask's input dependence runs, and the
  analysis reports each CIFS module's mean channel importance (a softmax: sums to 1)."""
  config = _config("cifs")
  config.train.epochs = 1
  config.eval.attacks = ()
  config.eval.protocol = "cifs"
  protocol = protocols.attack_names(config.eval)
  assert protocol == protocols.PROTOCOLS["cifs"]
  train.train_and_evaluate(config, str(tmp_path))
  config.eval.attacks = (*protocol, "cifs_mask_pgd100")  # One evaluation runs both.
  r = evaluate.run(config, str(tmp_path), which="latest")["results"]
  assert [k for k in r if k not in ("natural", "worst_case")] == list(config.eval.attacks)
  for name in protocol:
    assert r[name]["accuracy"] <= r["natural"]["accuracy"], name
  assert r["cifs_mask_pgd100"]["accuracy"] < r["natural"]["accuracy"]
  report = analysis.run(config, str(tmp_path), which="latest")
  assert set(report["cifs_masks"]) == {"cifs_layer1_0", "cifs_layer2_0"}
  for entry in report["cifs_masks"].values():
    for kind in ("natural", "adversarial"):
      assert sum(entry[kind]["channel_importance"]) == pytest.approx(1, rel=1e-5)
      assert 0 < entry[kind]["uniformity"] <= 1
    assert 0 <= entry["top10_shared"] <= 10
  assert (tmp_path / "analysis_cifs_layer2_0.png").exists()


def test_active_channels_against_numpy():
  """Bai et al.'s activation frequency: channel active iff its spatial mean > 1% of the
  sample's largest channel mean (negative means, from pre-ReLU sites, are never active)."""
  rng = np.random.default_rng(0)
  f = rng.normal(size=(5, 3, 3, 8)).astype(np.float32) * rng.uniform(0, 2, (1, 1, 1, 8))
  means = f.mean(axis=(1, 2))
  np.testing.assert_array_equal(analysis.active_channels(f),
                                means > 0.01 * means.max(-1, keepdims=True))


def test_normalised_entropy():
  assert analysis.normalised_entropy(np.ones(8)) == pytest.approx(1.0)
  assert analysis.normalised_entropy(np.eye(8)[0]) == pytest.approx(0.0)
  p = np.array([1.0, 3.0])
  q = p / p.sum()
  assert analysis.normalised_entropy(p) == pytest.approx(-(q * np.log(q)).sum() / np.log(2))


def test_cas_protocol_loss_is_main_plus_beta_mean_head_loss():
  """losses.with_aux_heads against a NumPy re-derivation: CE(main) + beta mean_k CE(head_k)
  over CAS heads and CIFS probes, and C&W kappa 0 the same way; a model without such heads
  gets the main term alone."""
  from jaxdefense.attacks import losses
  from jaxdefense.models import ModelOutput
  from tests.reference import np_ce
  rng = np.random.default_rng(0)
  main, h1, h2 = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3))
  labels = np.array([0, 1, 2, 3, 1])
  out = ModelOutput(main, {"cas/layer4.0": h1, "cifs/layer4.1": h2, "fsr/x/robust": main})
  got = losses.with_aux_heads(losses.cross_entropy, 2.0)(out, labels)
  np.testing.assert_allclose(got, np_ce(main, labels) + 2.0 * (np_ce(h1, labels)
                                                               + np_ce(h2, labels)) / 2,
                             rtol=1e-5)

  def np_cw0(z):
    true = z[np.arange(5), labels]
    other = np.where(np.eye(4, dtype=bool)[labels], -np.inf, z).max(-1)
    return -np.maximum(true - other, 0)
  got = losses.with_aux_heads(losses.cw(0.0), 2.0)(out, labels)
  np.testing.assert_allclose(got, np_cw0(main) + (np_cw0(h1) + np_cw0(h2)), rtol=1e-5)
  plain = losses.with_aux_heads(losses.cross_entropy, 2.0)(ModelOutput(main, {}), labels)
  np.testing.assert_allclose(plain, np_ce(main, labels), rtol=1e-5)


def test_protocols_resolve_to_their_attacks():
  """Each protocol's list (the autoattack one is run by the suite test above); a non-empty
  eval.attacks replaces it."""
  config = _config("cas")
  config.eval.attacks = ()
  expected = {"fsr": ("fgsm", "pgd20", "pgd100", "cw"),
              "cas": ("cas_fgsm", "cas_pgd20", "cas_cw"), "autoattack": ("autoattack",),
              "cifs": ("fgsm", "pgd20", "pgd100", "cw", "cifs_fgsm", "cifs_pgd20",
                       "cifs_pgd100", "cifs_cw")}
  for protocol, names in expected.items():
    config.eval.protocol = protocol
    assert protocols.attack_names(config.eval) == names
  config.eval.protocol = "full"
  # Everything but the variants (random-start PGD, AutoAttack rand) and, of CIFS's joint
  # attacks, FGSM and PGD-100 (the adaptive PGD-100 on the training loss is that attack).
  assert set(protocols.attack_names(config.eval)) == set(protocols.suite(config.eval)) - {
      "pgd20_rs", "autoattack_rand", "cifs_fgsm", "cifs_pgd100"}
  config.eval.attacks = ("pgd20",)
  assert protocols.attack_names(config.eval) == ("pgd20",)


@pytest.mark.parametrize("protocol,attacks,title", [
    ("fsr", ["fgsm", "pgd20", "pgd100", "cw"], "Ensemble (FSR)"),
    ("cas", ["cas_fgsm", "cas_pgd20", "cas_cw"], "Worst case"),
])
def test_each_protocol_runs_its_attacks_on_a_cas_model(trained_cas, protocol, attacks, title):
  """Each protocol's attacks, from its script, on a naturally trained tiny CAS model: every
  attack below natural, the worst case at most each and far below natural, named as the
  protocol names it."""
  config, workdir = trained_cas
  config = config.copy_and_resolve_references()  # The fixture's stays as trained.
  config.eval.protocol, config.eval.attacks = protocol, ()
  r = evaluate.run(config, workdir, which="latest")["results"]
  assert [k for k in r if k not in ("natural", "worst_case")] == attacks
  natural = r["natural"]["accuracy"]
  assert natural > 0.6
  for name in attacks:
    assert r[name]["accuracy"] < natural, (name, r[name]["accuracy"])
    assert r["worst_case"]["accuracy"] <= r[name]["accuracy"]
  assert r["worst_case"]["accuracy"] < 0.5 * natural
  assert r["worst_case"]["title"] == title
  assert f"| {title} |" in open(os.path.join(workdir, "eval.md")).read()


def test_unknown_protocol_is_named(trained_cas):
  config, workdir = trained_cas
  config = config.copy_and_resolve_references()  # The fixture's stays as trained.
  config.eval.protocol = "robustbench"
  with pytest.raises(ValueError, match="unknown eval.protocol 'robustbench'; allowed: fsr, cas"):
    evaluate.run(config, workdir)


@pytest.fixture(scope="module")
def trained_cas(tmp_path_factory, rolled_attack_loops):
  workdir = str(tmp_path_factory.mktemp("cas"))
  config = _config("cas")
  config.data.num_test, config.eval.batch_size = 48, 48
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.parametrize("norm,eps,title", [("l2", 0.5, "L2"), ("l1", 4.0, "L1")])
def test_l2_and_l1_evaluation(trained_fsr, norm, eps, title):
  """eval.norm=l2 / l1: PGD under that norm (AutoAttack under L2 and L1: test_autoattack.py,
  test_l1.py), below natural; the report and table say the norm; an L-inf-only protocol is
  refused, naming its L-inf-only attacks."""
  config, workdir, _ = trained_fsr
  config = config.copy_and_resolve_references()
  config.eval.norm, config.eval.eps = norm, eps
  config.eval.attacks = ("pgd20",)
  report = evaluate.run(config, workdir, which="latest")
  r = report["results"]
  assert report["norm"] == norm and r["pgd20"]["norm"] == norm
  assert r["pgd20"]["accuracy"] < r["natural"]["accuracy"]
  assert f"eps {eps:g} {title}" in open(os.path.join(workdir, "eval.md")).read()
  config.eval.attacks = ()
  config.eval.protocol = "fsr"
  with pytest.raises(ValueError, match=rf"eval.norm='{norm}': attack\(s\) \['fgsm', 'cw'\] of "
                                       r"protocol 'fsr' are L-inf only"):
    evaluate.run(config, workdir, which="latest")
  config.eval.protocol = "autoattack"
  assert protocols.attack_names(config.eval) == ("autoattack",)
  assert norm in protocols.suite(config.eval)["autoattack"].norms
  options = protocols.suite(config.eval)["autoattack"].options
  assert options["apgd_ce"]["restarts"] == (5 if norm == "l1" else 1)


def test_audit_of_a_checkpoint_reports_everything_and_resumes(trained_fsr, tmp_path,
                                                             monkeypatch):
  """--mode=audit on the trained checkpoint, the workdir itself as the surrogate: every
  indicator, check and curve reported; no transfer failure from a model onto itself; the
  iterations curve ends at the audit attack's own accuracy and AutoAttack's robust
  accuracy after Square is its reported accuracy; audit.md/json and the plot written; the
  config's checks run once each; run again on its records, it recomputes nothing and
  reports the same."""
  config, workdir, _ = trained_fsr
  c = copy.deepcopy(config)
  c.eval.num_examples = 48
  c.audit.attack, c.audit.iterations, c.audit.restarts = "pgd20", (1, 5, 20), (1, 2)
  c.audit.eps_factors, c.audit.curve_steps = (0.5, 1.0, 8.0), 3
  c.audit.surrogate_workdir = workdir
  calls = {"check_eval": 0, "check_audit": 0}
  for name in calls:
    def counted(*args, name=name, check=getattr(validation, name)):
      calls[name] += 1
      return check(*args)
    monkeypatch.setattr(validation, name, counted)
  report = audit.run(c, workdir, which="latest")
  assert calls == {"check_eval": 1, "check_audit": 1}  # Each check once.
  for name in ("audit.json", "audit.md", "audit_curves.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert set(report["indicators"]) == set(indicators.NAMES)
  assert report["indicators"]["transfer_failure"]["value"] == 0.0
  assert report["indicators"]["unavailable_gradients"]["value"] == 0.0
  aa = report["autoattack"]
  assert [check["check"] for check in aa["checks"]] == [
      "randomized", "probabilities", "zero_gradients", "square", "classes"]
  assert aa["robust_after"]["square"] == pytest.approx(aa["accuracy"])
  assert aa["robust_after"]["clean"] == pytest.approx(report["natural"]["accuracy"])
  curves = report["curves"]
  assert curves["iterations"]["accuracy"][-1] == pytest.approx(report["attack"]["accuracy"])
  # The eps curve falls: how far PGD-3 gets at 8 x eps on a natural model is an optimisation's
  # outcome, which moves by a point of 48 between CPUs (XLA's kernels differ by instruction
  # set), so at most 4 points of 48 may stay; the verdict's threshold is test_audit's.
  assert curves["eps"]["accuracy"][-1] <= min(4 / 48, curves["eps"]["accuracy"][0])
  assert report["cost"]["ratio_to_autoattack"] < 2
  text = open(os.path.join(workdir, "audit.md")).read()
  assert "Transfer failure" in text and "## Cost" in text
  record = evaluate.Record(epath.Path(tmp_path))
  s = setup.load(c, workdir, "latest")
  first = audit.audit(c, s.model, s.variables, s.images, s.labels, s.mesh, record=record,
                      progress=False)
  again = audit.audit(c, s.model, s.variables, s.images, s.labels, s.mesh, record=record,
                      progress=False)
  assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)


def test_the_eps_curve_compiles_one_program_for_its_grid(trained_fsr):
  """The audit's eps curve passes eps and the step to one compiled program: traced once for
  the whole grid, each eps's per-point verdicts equal to PGD compiled with that eps a
  constant (under L-inf the iterates are bit-identical), its passes counted per eps."""
  config, workdir, _ = trained_fsr
  c = copy.deepcopy(config)
  c.eval.num_examples, c.audit.curve_steps = 48, 3
  s = setup.load(c, workdir, "latest")
  attack = protocols.suite(c.eval)[c.audit.attack]
  at_eps, _ = audit._curve_fns(c, attack, s.model)
  traces = []

  def traced(*args, **kwargs):
    traces.append(1)
    return at_eps(*args, **kwargs)
  program = evaluate.program(traced)
  loss_fn = attack.loss.fn(defenses.from_config(c))
  accuracies = []
  for eps in (0.25 * c.eval.eps, c.eval.eps, 4 * c.eval.eps):
    args = {"variables": s.variables, "eps": np.float32(eps),
            "step_size": np.float32(attack.step_size * eps)}
    correct, totals, _ = evaluate.attack_points(
        "eps", program, args, s.images, s.labels, s.mesh, batch_size=48, seed=c.eval.seed,
        record=evaluate.Record(None), progress=False)
    constant = jax.jit(lambda x, y, k, eps=eps: curves.eps_point(
        attacks.deployed(s.model, s.variables), attack, loss_fn, x, y, k, eps=eps,
        step_size=attack.step_size * eps, steps=3, norm="linf"))
    key = jax.random.fold_in(jax.random.key(c.eval.seed), 0)
    np.testing.assert_array_equal(correct, constant(data.to_float(s.images), s.labels, key))
    assert (totals["forward_passes"], totals["backward_passes"]) == (48 * 4, 48 * 3)
    accuracies.append(correct.mean())
  assert len(traces) == 1
  assert accuracies[0] > accuracies[-1]  # The grid's points differ: eps reached the program.


def test_the_set_up_honours_eval_dtype_in_every_mode(trained_fsr):
  """setup.load, which --mode=eval, audit and analyze share: the model (and the audit's
  surrogate) computes in eval.dtype, else in the model's dtype."""
  config, workdir, _ = trained_fsr
  c = copy.deepcopy(config)
  c.audit.surrogate_workdir = workdir
  default = setup.load(c, workdir, "latest", surrogate=True)
  assert default.dtype == c.model.dtype == "float32"
  c.eval.dtype = "bfloat16"
  s = setup.load(c, workdir, "latest", surrogate=True)
  assert s.dtype == "bfloat16" and s.step == default.step
  for model in (s.model, s.surrogate[0]):
    assert np.dtype(model.dtype) == np.dtype(jnp.bfloat16)
  assert len(s.labels) == 96 and s.images.dtype == np.uint8


NORM_EPS = {"linf": 0.125, "l2": 1.0, "l1": 4.0}


@pytest.fixture(scope="module")
def trained_by_main(tmp_path_factory):
  """A workdir trained by `python main.py` (TINY, one epoch), to copy."""
  trained = tmp_path_factory.mktemp("main") / "trained"
  run = run_main(trained, *TINY, "--config.train.epochs=1", timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return trained


def test_eval_prints_no_orbax_read_only_warnings(trained_by_main, tmp_path):
  """`python main.py --mode=eval` restores read-only without orbax's lines about the
  read-only options (save interval, directory creation, the directory being read only),
  which a user can do nothing about."""
  shutil.copytree(trained_by_main, tmp_path / "run")
  run = run_main(tmp_path / "run", *TINY, "--mode=eval", "--checkpoint=last",
                 "--config.eval.num_examples=8", "--config.eval.batch_size=8",
                 "--config.eval.attacks=('fgsm',)", timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| FGSM |" in run.stdout
  noise = [line for line in (run.stdout + run.stderr).splitlines()
           if "checkpoint_manager.py" in line or "read_only=True" in line
           or "read only=" in line]
  assert not noise, noise


def test_every_norm_through_main_py_autoattack_and_audit(trained_by_main, tmp_path):
  """`python main.py --mode=eval --config.eval.protocol=autoattack` and `--mode=audit` under
  each norm, through main.py's own flags and main function (one process for all six):
  each exits 0 without a traceback and writes its eval.json / audit.json at that norm and
  eps, AutoAttack's robust accuracy at most the natural one."""
  trained = trained_by_main
  small = ["--checkpoint=last", "--config.eval.num_examples=8", "--config.eval.batch_size=8",
           *[f"--config.eval.autoattack_options.{a}.steps=3"
             for a in ("apgd_ce", "apgd_t", "fab_t")],
           "--config.eval.autoattack_options.square.queries=20",
           "--config.audit.attack=pgd20", "--config.audit.iterations=(1,2)",
           "--config.audit.restarts=(1,2)", "--config.audit.eps_factors=(1.0,2.0)",
           "--config.audit.curve_steps=2"]
  cases = []
  for norm, eps in NORM_EPS.items():
    workdir = tmp_path / norm
    shutil.copytree(trained, workdir)
    common = [f"--config={os.path.join(ROOT, 'configs/quickstart.py')}", f"--workdir={workdir}",
              *TINY, *small, f"--config.eval.norm={norm}", f"--config.eval.eps={eps}"]
    # The audit runs AutoAttack and audit.attack whatever eval.protocol says: the default
    # protocol's L-inf-only attacks do not stop an L2 or L1 audit.
    cases += [[*common, "--mode=eval", "--config.eval.protocol=autoattack"],
              [*common, "--mode=audit"]]
  cases_path, results_path = tmp_path / "cases.json", tmp_path / "results.json"
  cases_path.write_text(json.dumps(cases))
  subprocess.run([sys.executable, "-m", "tests.cli_driver", "main", str(cases_path),
                  str(results_path)], cwd=ROOT, check=True, timeout=900)
  for result in json.loads(results_path.read_text()):
    assert result["code"] == 0 and result["traceback"] is None, (
        result["argv"], result["stderr"][-3000:], result["traceback"])
  for norm, eps in NORM_EPS.items():
    report = json.loads((tmp_path / norm / "eval.json").read_text())
    aa = report["results"]["autoattack"]
    assert (report["norm"], aa["norm"], aa["eps"]) == (norm, norm, eps)
    assert aa["accuracy"] <= report["results"]["natural"]["accuracy"]
    assert "warnings" in aa and "robust_after" in aa
    audited = json.loads((tmp_path / norm / "audit.json").read_text())
    assert (audited["norm"], audited["eps"]) == (norm, eps)
    assert audited["autoattack"]["norm"] == norm
