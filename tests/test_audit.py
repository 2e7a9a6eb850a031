"""The audit's parts against independent references: the indicators of attack failure on
a closed-form model whose PGD path NumPy re-derives, the authors' incomplete-optimisation
and unstable-prediction formulas, AutoAttack's checks on their own definitions and on a
model whose gradients are masked, and the curves' verdicts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import attacks
from jaxdefense.evaluation import autoattack_checks, curves, indicators, plotting
from jaxdefense.attacks import losses
from jaxdefense.models.common import ModelOutput

A, B, C = 1.0, 9.0, 0.93  # g(x) = A sin(B x) - C: narrow positive peaks PGD steps across.
EPS, STEP, STEPS = 0.25, 0.1, 10


def peaks(x):
  """Two classes on one pixel: logits (0, g(x)); class 1 (the attack's goal) where g > 0."""
  g = A * jnp.sin(B * x.reshape(x.shape[0])) - C
  return ModelOutput(logits=jnp.stack([jnp.zeros_like(g), g], -1), aux={})


def numpy_path(x0: np.ndarray, eps: float) -> np.ndarray:
  """PGD without random start on the CE of class 0, by hand: the gradient's sign is
  sign(g'(x)) = sign(cos(B x)); x_{t+1} = clip(clip(x_t + step sign, x - eps, x + eps), 0, 1).
  Returns the iterates (T + 1, N) in float32."""
  path = [x0.astype(np.float32)]
  lo, hi = np.float32(x0 - np.float32(eps)), np.float32(x0 + np.float32(eps))
  for _ in range(STEPS):
    x = path[-1]
    step = np.float32(STEP) * np.sign(np.cos(np.float32(B) * x))
    path.append(np.clip(np.clip(x + step, lo, hi), 0, 1).astype(np.float32))
  return np.stack(path)


def numpy_still_rising(trace: np.ndarray) -> np.ndarray:
  """The authors' incomplete optimisation per column, for a maximised loss: min-max scaled,
  running maximum, its rise over the last 10 values > 0.05."""
  out = []
  for loss in trace.T:
    span = loss.max() - loss.min()
    scaled = (loss - loss.min()) / span if span > 0 else loss - loss.min()
    best = np.maximum.accumulate(scaled)[-10:]
    out.append(best.max() - best.min() > 0.05)
  return np.asarray(out)


def test_indicators_on_a_closed_form_model_match_numpy():
  """Every per-point flag of `indicators.batch` equals the one re-derived from the PGD path
  computed by hand; the model is built so that several points show each failure."""
  x0 = np.random.default_rng(0).uniform(0, 1, 64).astype(np.float32)
  x, y = jnp.asarray(x0.reshape(-1, 1, 1, 1)), jnp.zeros(64, jnp.int32)
  values = jax.jit(lambda x: indicators.batch(
      peaks, peaks, losses.cross_entropy, x, y, jax.random.key(0), eps=EPS, step_size=STEP,
      steps=STEPS, norm="linf", random_start=False, iterations=(1, 5, 10)))(x)
  values = {k: np.asarray(v) for k, v in values.items()}
  g = lambda v: A * np.sin(B * v) - C
  path = numpy_path(x0, EPS)
  wrong = g(path) > 0
  clean = ~wrong[0]
  np.testing.assert_array_equal(values["clean"], clean)
  np.testing.assert_array_equal(values["correct"], clean & ~wrong[-1])
  silent = wrong[:-1].any(0) & ~wrong[-1]
  np.testing.assert_array_equal(values["silent_success"], silent)
  loss = np.logaddexp(0, g(path))  # CE of class 0 with logits (0, g).
  np.testing.assert_array_equal(values["incomplete_optimization"], numpy_still_rising(loss))
  for t in (1, 5, 10):
    np.testing.assert_array_equal(values[f"correct_at.{t}"], clean & ~wrong[t])
  unbounded = numpy_path(x0, 1.0)  # eps 1: the ball holds the box.
  np.testing.assert_array_equal(values["unconstrained_failure"], g(unbounded[-1]) <= 0)
  assert not values["unavailable_gradients"].any()
  assert (silent & clean).sum() >= 5 and (~clean).sum() >= 5
  assert values["unconstrained_failure"][clean].sum() >= 5


def test_unstable_predictions_is_the_authors_relative_variation():
  """min(mean_s |L(x) - L(x + u_s)| / |L(x)|, 1), u_s ~ U[-4/255, 4/255], re-derived from
  the same draws; the loss 0 case divides by 1."""
  loss = lambda v: jnp.sum(v, axis=(1, 2, 3)) ** 2
  x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (5, 2, 2, 1)).astype(np.float32))
  x = x.at[0].set(0.0)
  key = jax.random.key(3)
  ours = np.asarray(indicators.relative_variation(loss, x, key))
  base = np.asarray(loss(x), np.float64)
  total = np.zeros(5)
  for s in range(indicators.UNSTABLE_SAMPLES):
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, s), x.shape)) - 0.5
    total += np.abs(base - np.asarray(loss(x + u * indicators.UNSTABLE_RADIUS), np.float64))
  scale = np.where(base == 0, 1.0, np.abs(base))
  np.testing.assert_allclose(ours, np.minimum(total / indicators.UNSTABLE_SAMPLES / scale, 1),
                             rtol=1e-4, atol=1e-7)


def test_transfer_failure_counts_points_fooling_the_surrogate_only():
  """A surrogate whose classes are the target's swapped: the surrogate's adversarial points
  move towards the target's true class, so every one that fools the surrogate is a transfer
  failure; a surrogate equal to the target has none."""
  x = jnp.asarray(np.random.default_rng(2).uniform(0.3, 0.7, (32, 1, 1, 1)).astype(np.float32))
  target = lambda v: ModelOutput(logits=jnp.concatenate([v.reshape(-1, 1) - 0.5,
                                                         0.5 - v.reshape(-1, 1)], -1), aux={})
  swapped = lambda v: ModelOutput(logits=target(v).logits[:, ::-1], aux={})
  y = jnp.asarray(np.asarray(jnp.argmax(target(x).logits, -1)), jnp.int32)
  run = lambda surrogate: {k: np.asarray(v) for k, v in indicators.batch(
      target, target, losses.cross_entropy, x, y, jax.random.key(0), eps=0.1,
      step_size=0.05, steps=4, norm="linf", random_start=False, iterations=(4,),
      surrogate_fn=surrogate).items()}
  swapped_values = run(swapped)
  assert swapped_values["surrogate_fooled"].sum() >= 16
  np.testing.assert_array_equal(swapped_values["transfer_failure"],
                                swapped_values["surrogate_fooled"])
  same = run(target)
  assert not same["transfer_failure"].any()
  report = indicators.summarise(swapped_values, ("transfer_failure",))["transfer_failure"]
  assert report["value"] == 1.0 and report["triggered"] and "surrogate" in report["remedy"]


def test_summaries_and_a_missing_surrogate_are_reported():
  values = {"clean": np.array([True, True, False, True]),
            "correct": np.array([True, False, False, True]),
            "silent_success": np.array([False, True, True, False]),
            "incomplete_optimization": np.array([True, True, True, False]),
            "unstable_predictions": np.array([0.05, 0.1, 0.9, 0.12])}
  report = indicators.summarise(values, ("silent_success", "incomplete_optimization",
                                         "unstable_predictions", "transfer_failure"))
  assert report["silent_success"]["value"] == pytest.approx(1 / 3)  # Of the clean points.
  assert report["silent_success"]["triggered"] and report["silent_success"]["flagged"] == 1
  # Incomplete optimisation counts only the points the attack did not fool.
  assert report["incomplete_optimization"]["points"] == 2
  assert report["incomplete_optimization"]["value"] == 0.5
  assert report["unstable_predictions"]["value"] == pytest.approx(0.09)
  assert not report["unstable_predictions"]["triggered"]
  assert "surrogate_workdir" in report["transfer_failure"]["skipped"]


def quantised(x):
  """A linear classifier on inputs rounded to quarters: zero input gradient everywhere."""
  w = jnp.asarray(np.random.default_rng(4).normal(size=(16, 4)).astype(np.float32))
  flat = jnp.round(x.reshape(x.shape[0], -1) * 4) / 4
  return ModelOutput(logits=flat @ w, aux={})


def test_autoattack_checks_see_masked_gradients():
  """On a model with zero input gradients, the zero-gradient check counts every point and
  the gradient-free Square lowers the accuracy the gradient attacks left: both warn; the
  model is deterministic and outputs logits, so those checks pass."""
  x = jnp.asarray(np.random.default_rng(5).uniform(0, 1, (24, 4, 4, 1)).astype(np.float32))
  y = jnp.argmax(quantised(x).logits, -1)
  options = {"apgd_ce": {"steps": 5}, "apgd_t": {"steps": 5, "n_target": 2},
             "fab_t": {"steps": 5, "n_target": 2}, "square": {"queries": 200}}
  result = jax.jit(lambda x, y: attacks.autoattack(quantised, x, y, jax.random.key(0), eps=0.3,
                                                   options=options))(x, y)
  robust_after = {"clean": 1.0, **{k: float(np.mean(v)) for k, v in result.robust_after.items()}}
  assert robust_after["fab_t"] - 0.1 > robust_after["square"]  # Square finds far more.
  square = autoattack_checks.square_lowered(robust_after)
  assert not square.passed and "Square" in square.warning
  gradient = attacks.input_gradient(quantised, losses.dlr, x, y)
  zero = np.asarray(jnp.all(gradient == 0, axis=(1, 2, 3)))
  check = autoattack_checks.zero_gradients(zero, np.ones(24, bool))
  assert not check.passed and check.value == 24
  logits = np.asarray(quantised(x).logits)
  assert autoattack_checks.randomized([logits, logits.copy()], np.asarray(y)).passed
  assert autoattack_checks.probabilities(logits).passed


def test_autoattack_checks_definitions():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(8, 10)).astype(np.float32)
  labels = np.argmax(logits, -1)
  noisy = [logits + rng.normal(scale=1e-2, size=logits.shape) for _ in range(5)]
  check = autoattack_checks.randomized(noisy, labels)
  assert not check.passed and "autoattack_rand" in check.warning
  assert autoattack_checks.randomized([logits] * 5, labels).passed
  probabilities = np.asarray(jax.nn.softmax(logits))
  assert not autoattack_checks.probabilities(probabilities).passed
  assert autoattack_checks.probabilities(logits).passed
  assert autoattack_checks.square_lowered({"clean": 0.9, "apgd_ce": 0.5, "apgd_t": 0.45,
                                           "fab_t": 0.45, "square": 0.449}).passed
  lowered = autoattack_checks.square_lowered({"clean": 0.9, "apgd_ce": 0.5, "square": 0.4})
  assert not lowered.passed and "10.00 points" in lowered.warning
  assert autoattack_checks.zero_gradients(np.array([True, False]), np.array([False, True])).passed
  options = {"apgd_t": {"n_target": 9}, "fab_t": {"n_target": 9}}
  assert autoattack_checks.classes(10, ("apgd_ce", "apgd_t", "fab_t"), options).passed
  assert "9 target classes of the 8" in autoattack_checks.classes(
      9, ("apgd_t", "fab_t"), options).warning
  assert "DLR loss is undefined" in autoattack_checks.classes(2, ("apgd_dlr",), options).warning


def test_curve_verdicts():
  summary = curves.summarise([0.01, 0.03, 0.1], [0.8, 0.4, 0.01], [1, 10, 100], [0.6, 0.45, 0.445],
                             [1, 2, 4], [0.45, 0.40, 0.35])
  assert summary["eps"]["passed"] and summary["iterations"]["passed"]
  assert not summary["restarts"]["passed"] and "more restarts" in summary["restarts"]["verdict"]
  plateau = curves.summarise([0.1, 1.0], [0.5, 0.3], [1], [0.5], [1], [0.5])
  assert not plateau["eps"]["passed"] and "30.00%" in plateau["eps"]["verdict"]


def test_curves_figure_ticks_the_counts_run_and_draws_autoattack(tmp_path):
  """audit_curves.png's figure, inspected before it is written: the iterations and restarts
  axes are ticked at the counts run, as plain numbers (no minor ticks), each with
  AutoAttack's robust accuracy as a labelled horizontal line; the eps panel has none; the
  figure is on its own Agg canvas and is written as a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  iterations, restarts = [1, 2, 5, 10, 20, 50, 100], [1, 2, 4, 8]
  summary = curves.summarise([0.01, 0.03, 0.1], [0.8, 0.4, 0.01], iterations,
                             [0.6, 0.5, 0.46, 0.45, 0.45, 0.45, 0.45], restarts,
                             [0.45, 0.44, 0.44, 0.44])
  figure = plotting.audit_curves(summary, "title", autoattack=0.375)
  assert isinstance(figure.canvas, FigureCanvasAgg)
  eps_axes, *count_axes = figure.axes
  for axes, counts in zip(count_axes, (iterations, restarts)):
    assert list(axes.get_xticks()) == counts and list(axes.get_xticks(minor=True)) == []
    assert [t.get_text() for t in axes.get_xticklabels()] == [str(n) for n in counts]
    (line,) = [line for line in axes.get_lines() if line.get_label() == "AutoAttack 37.50%"]
    assert list(line.get_ydata()) == [37.5, 37.5]
    assert "AutoAttack 37.50%" in [t.get_text() for t in axes.get_legend().get_texts()]
  assert not [line for line in eps_axes.get_lines() if "AutoAttack" in line.get_label()]
  path = plotting.write_png(figure, tmp_path / "curves.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
