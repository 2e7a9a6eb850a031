"""FAB-T, Square and AutoAttack (docs/method.md section 6): FAB's hyperplane projection against
a linear program, Square's p schedule, each attack and the standard and rand versions on a
naturally trained digits MLP (pointwise worst case, never above any component or natural
accuracy, inside the ball), a gradient-masked model that Square still breaks, masked
execution equal to the reference's run-on-the-subset loop, and the input errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from tests.attack_models import accuracy, linf_distance, train_mlp
from jaxdefense import attacks
from jaxdefense.attacks import apgd, apgd_targeted, autoattack, fab_targeted, square
from jaxdefense.attacks import square_attack
from jaxdefense.attacks.auto_attack import check_options, version_attacks, version_options
from jaxdefense.attacks.fab import project_l2_hyperplane, project_linf_hyperplane
from jaxdefense.attacks.square_attack import p_selection, square_sizes
from jaxdefense.models.common import ModelOutput

EPS = 0.1
SQUARE_EPS = 0.2   # Square's 300 queries need a larger ball than the gradient attacks here.
SMALL = {"apgd_ce": {"steps": 15, "unroll": 1}, "apgd_dlr": {"steps": 15, "unroll": 1},
         "apgd_t": {"steps": 10, "n_target": 2, "unroll": 1},
         "fab_t": {"steps": 10, "n_target": 2, "unroll": 1}, "square": {"queries": 300}}


@pytest.fixture(scope="module")
def trained():
  model_fn, x, y = train_mlp()
  return model_fn, x[:48], y[:48]


def _inside(x_adv, x, eps=EPS):
  return linf_distance(x_adv, x) <= np.float32(eps) and float(x_adv.min()) >= 0 and \
      float(x_adv.max()) <= 1


def test_fab_projection_is_the_least_linf_step():
  rng = np.random.RandomState(0)
  dim = 6
  for _ in range(20):
    t = rng.rand(1, dim).astype(np.float32)
    w = rng.randn(1, dim).astype(np.float32)
    b = (w @ t[0] + rng.randn() * 0.5).astype(np.float32)
    d = np.asarray(project_linf_hyperplane(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))[0]
    # min s  s.t. |d_i| <= s, w.d = b - w.t, 0 <= t + d <= 1; variables (d, s).
    c = np.r_[np.zeros(dim), 1.0]
    a_ub = np.r_[np.c_[np.eye(dim), -np.ones(dim)], np.c_[-np.eye(dim), -np.ones(dim)]]
    bounds = [(-ti, 1 - ti) for ti in t[0]] + [(0, None)]
    lp = linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * dim), A_eq=np.r_[w[0], 0.0][None],
                 b_eq=[float(b[0] - w[0] @ t[0])], bounds=bounds)
    if lp.status == 0:
      assert np.max(np.abs(d)) == pytest.approx(lp.fun, abs=1e-5)
      assert float(w[0] @ (t[0] + d)) == pytest.approx(float(b[0]), abs=1e-4)
    else:   # the box cannot reach the hyperplane: the corner closest to it
      corner = np.where(w[0] * np.sign(w[0] @ t[0] - b[0]) < 0, 1.0, 0.0)
      np.testing.assert_allclose(t[0] + d, corner, atol=1e-6)
    assert np.all(t[0] + d >= -1e-6) and np.all(t[0] + d <= 1 + 1e-6)


def _sorted_linf_projection(t, w, b):
  """NumPy, one row: the reference's `projection_linf` (fab_projections.py), a binary
  search over the coordinates sorted by their distance p to the face."""
  side = 1.0 if w @ t - b >= 0 else -1.0
  w, b = w * side, b * side
  toward_one = (w < 0).astype(np.float64)
  d = (toward_one - t) * (w != 0)
  p = toward_one - t * (2 * toward_one - 1)
  order = np.argsort(p)[::-1]
  b = b - w @ t
  b0 = w @ d
  s = np.cumsum(np.abs(w[order]))
  sb = np.cumsum(-w[order] * d[order]) + b0
  if b - (sb[-1] - s[-1] * p.min()) > 0:
    return (2 * toward_one - 1) * max((b - sb[-1]) / -s[-1], 0.0) * (w != 0)
  if not b - b0 > 0:
    return d
  lb, ub = 0, len(w) - 1
  while ub - lb > 1:
    mid = (lb + ub) // 2
    if b - (sb[mid] - s[mid] * p[order[mid]]) > 0:
      lb = mid
    else:
      ub = mid
  lam = max((b - sb[lb]) / -s[lb], 0.0)
  return np.where(toward_one > 0, np.minimum(lam, d), np.maximum(-lam, d)) * (w != 0)


def test_fab_linf_projection_equals_the_references_sorted_search():
  """The sort-free bisection finds the reference's segment: equal d on random rows of
  784 coordinates (a fifth of w zero, some t on the box faces), reachable or not."""
  rng = np.random.default_rng(1)
  rows, dim = 64, 784
  t = rng.uniform(size=(rows, dim))
  t[16:, :20] = np.round(t[16:, :20])  # p = 0 somewhere: lambda = min p cannot overshoot.
  t[:16] = 0.3 + 0.4 * t[:16]  # Far from the faces: small offsets move all coordinates.
  w = rng.normal(size=(rows, dim)) * (rng.uniform(size=(rows, dim)) > 0.2)
  offset = np.r_[np.logspace(-3, 0, 16), np.logspace(-3, 2, 40), np.full(8, 1e4)]
  b = np.sum(w * t, 1) + rng.choice([-1, 1], rows) * offset  # Last 8: out of the box's reach.
  t, w, b = (v.astype(np.float32) for v in (t, w, b))
  d = np.asarray(project_linf_hyperplane(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  for i in range(rows):
    expected = _sorted_linf_projection(*(v[i].astype(np.float64) for v in (t, w, b)))
    np.testing.assert_allclose(d[i], expected, atol=2e-6, err_msg=f"row {i}")


def test_fab_l2_projection_by_hand():
  """From t = (0.5, 0.5), the least-L2 step onto <w, t + d> = b inside [0, 1]^2, solved
  by hand in each case below."""
  t = jnp.array([[0.5, 0.5]])
  d = np.asarray(project_l2_hyperplane(t, jnp.array([[1.0, 1.0]]), jnp.array([2.0])))[0]
  # w = (1, 1), b = 2: the plane touches the box at the corner (1, 1): d = (0.5, 0.5).
  np.testing.assert_allclose(d, [0.5, 0.5], atol=1e-6)
  # w = (1, 3), b = 2.4 (<w, t> = 2): d = lambda w with 10 lambda = 0.4, inside the box.
  d = np.asarray(project_l2_hyperplane(t, jnp.array([[1.0, 3.0]]), jnp.array([2.4])))[0]
  np.testing.assert_allclose(d, [0.04, 0.12], atol=1e-6)
  # b = 3.8: the unconstrained d = 1.8 w / 10 = (0.18, 0.54) leaves the box in coordinate
  # 2; it stops at 0.5 (contributing 1.5), coordinate 1 supplies the remaining 0.3.
  d = np.asarray(project_l2_hyperplane(t, jnp.array([[1.0, 3.0]]), jnp.array([3.8])))[0]
  np.testing.assert_allclose(d, [0.3, 0.5], atol=1e-6)
  # b = 5: even the corner (1, 1) gives only 4: the corner.
  d = np.asarray(project_l2_hyperplane(t, jnp.array([[1.0, 3.0]]), jnp.array([5.0])))[0]
  np.testing.assert_allclose(d, [0.5, 0.5], atol=1e-6)


def test_fab_l2_projection_is_the_least_l2_step():
  """Against the KKT conditions on random rows: on the plane (where reachable), inside the
  box, and d = clip(-lambda w, box) for one lambda (read off an unclipped coordinate)."""
  rng = np.random.default_rng(0)
  t = rng.uniform(size=(50, 9)).astype(np.float32)
  w = (rng.normal(size=(50, 9)) * (rng.uniform(size=(50, 9)) > 0.2)).astype(np.float32)
  b = (np.sum(w * t, 1) + rng.normal(size=50)).astype(np.float32)
  d = np.asarray(project_l2_hyperplane(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
  for ti, wi, bi, di in zip(t, w, b, d):
    free = (np.abs(di) > 1e-4) & (ti + di > 1e-4) & (ti + di < 1 - 1e-4) & (wi != 0)
    if free.any():  # The hyperplane is reached, d follows one ray -lambda w.
      assert float(wi @ (ti + di)) == pytest.approx(float(bi), abs=1e-4)
      lam = (-di[free] / wi[free])[0]
      np.testing.assert_allclose(di, np.clip(-lam * wi, -ti, 1 - ti), atol=1e-5)


def test_square_schedule():
  assert [p_selection(0.8, i, 5000) for i in (0, 10, 11, 50, 51, 200, 201, 500, 501)] == \
      [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.05]
  assert p_selection(0.8, 8001, 10000) == 0.8 / 512
  assert p_selection(0.8, 6, 1000, rescale_schedule=True) == 0.2    # it -> 60
  sizes = square_sizes(32, 32, 5000)
  assert sizes[0] == 29 and sizes[11] == 20 and sizes[4999] == 3    # round(sqrt(p 1024))
  assert square_sizes(8, 8, 5000).min() == 1


def test_each_attack_breaks_trained_model(trained):
  model_fn, x, y = trained
  natural = accuracy(model_fn, x, y)
  assert natural > 0.9
  key = jax.random.key(0)
  for attack, eps in ((functools.partial(fab_targeted, steps=10, n_target=2, unroll=1), EPS),
                      (functools.partial(square, queries=300), SQUARE_EPS)):
    x_adv = attack(model_fn, x, y, key, eps=eps)
    assert _inside(x_adv, x, eps)
    assert accuracy(model_fn, x_adv, y) < natural - 0.4


def test_fab_l2_breaks_the_trained_model_inside_the_l2_ball(trained):
  model_fn, x, y = trained
  natural = accuracy(model_fn, x, y)
  x_adv = fab_targeted(model_fn, x, y, jax.random.key(0), eps=1.0, norm="l2", steps=10,
                       n_target=2, unroll=1)
  norms = np.sqrt(np.sum(np.square(np.asarray(x_adv, np.float64) - np.asarray(x)), axis=1))
  assert norms.max() <= 1.0 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
  assert accuracy(model_fn, x_adv, y) < natural - 0.4


def _l2_inside(x_adv, x, eps):
  norms = np.sqrt(np.sum(np.square(np.asarray(x_adv, np.float64) - np.asarray(x)),
                         axis=tuple(range(1, x.ndim))))
  return norms.max() <= eps and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_square_l2_and_the_standard_version_under_l2(trained):
  """Square L2 breaks the model inside the L2 ball; the standard version under L2 (APGD-CE,
  APGD-T, FAB-T, Square) runs, inside the ball, at most Square alone (the worst-case
  property over components is tested under L-inf above)."""
  model_fn, x, y = trained
  natural = accuracy(model_fn, x, y)
  key = jax.random.key(3)
  x_adv = square(model_fn, x, y, key, eps=1.5, norm="l2", queries=300)
  assert _l2_inside(x_adv, x, 1.5)
  assert accuracy(model_fn, x_adv, y) < natural - 0.3
  result = autoattack(model_fn, x, y, key, eps=1.0, norm="l2", options=SMALL)
  assert _l2_inside(result.x_adv, x, 1.0)
  robust = float(result.robust_accuracy())
  assert robust < natural - 0.4
  alone = autoattack(model_fn, x, y, key, eps=1.0, norm="l2", attacks=("square",),
                     options=SMALL)
  assert robust <= float(alone.robust_accuracy()) <= natural


def test_square_l2_eta_is_the_references_pseudo_gaussian():
  """eta(3) by hand: the upper half (1 x 3, centre column 1) holds ring 0 (weight 1) at the
  centre and ring 1 (1/4) over all three columns; the lower half (2 x 3, centre (1, 1))
  ring 0 at (1, 1) and ring 1 over both rows; each half unit norm, the lower negated, the
  whole unit norm. The L2 window sides are odd, at least 3."""
  top = np.array([[0.25, 1.25, 0.25]])
  bottom = np.array([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]])
  expected = np.vstack([top / np.linalg.norm(top), -bottom / np.linalg.norm(bottom)])
  np.testing.assert_allclose(square_attack.eta(3), expected / np.linalg.norm(expected),
                             atol=1e-12)
  sizes = square_attack.square_sizes_l2(32, 32, 5000)
  assert sizes[0] == 29 and sizes.min() == 3 and np.all(sizes % 2 == 1)


def test_standard_version_is_the_pointwise_worst_case(trained):
  model_fn, x, y = trained
  key = jax.random.key(1)
  run = jax.jit(lambda x, y, key, eps: autoattack(model_fn, x, y, key, eps=eps,
                                                  options=SMALL))
  result = run(x, y, key, EPS)
  natural = accuracy(model_fn, x, y)
  robust = float(result.robust_accuracy())
  assert float(result.accuracy()) == pytest.approx(natural)
  assert robust < natural - 0.4
  assert list(result.robust_after) == list(version_attacks("standard"))
  previous = result.clean
  for name, mask in result.robust_after.items():
    assert not np.any(mask & ~previous), name   # fooled stays fooled
    previous = mask
  np.testing.assert_array_equal(result.robust, previous)
  assert _inside(result.x_adv, x)
  # Robust points keep x; every fooled point's x_adv is misclassified.
  np.testing.assert_array_equal(result.x_adv[result.robust], x[result.robust])
  predicted = jnp.argmax(model_fn(result.x_adv).logits, -1)
  fooled = result.clean & ~result.robust
  assert bool(jnp.all(predicted[fooled] != y[fooled]))
  np.testing.assert_array_equal(result.robust, result.clean & (predicted == y))
  for name in version_attacks("standard"):
    alone = autoattack(model_fn, x, y, key, eps=EPS, attacks=(name,), options=SMALL)
    assert robust <= float(alone.robust_accuracy()) <= natural, name


def test_gradient_masked_model_is_not_reported_robust(trained):
  model_fn, x, y = trained
  # Rounding the input to 1/8 steps: the input gradient is zero everywhere.
  masked = lambda v: model_fn(jnp.round(v * 8) / 8)
  natural = accuracy(masked, x, y)
  assert not np.any(jax.grad(lambda v: masked(v).logits.sum())(x))
  key = jax.random.key(2)
  result = autoattack(masked, x, y, key, eps=SQUARE_EPS, options=SMALL)
  # The gradient attacks (run first) fail; Square, after them, breaks the model.
  assert float(jnp.mean(result.robust_after["fab_t"])) > natural - 0.2
  assert float(result.robust_accuracy()) < natural - 0.4


def test_masked_and_gathered_execution_equal_running_on_the_subset(trained):
  """Each attack on the points still robust, as the reference's loop gathers them: masked
  in the whole batch (chunks=1) and gathered into batches of 8 (chunks=3) give its robust
  points after every attack and its adversarial points; gathering takes fewer model
  passes (the masked batch computes the fooled points too). Bad chunk counts are refused."""
  model_fn, x, y = trained
  x, y = x[:24], y[:24]
  keys = jax.random.split(jax.random.key(3), x.shape[0])
  results, passes = {}, {}
  for chunks in (1, 3):
    counter = attacks.PassCounter()
    results[chunks] = autoattack(counter.wrap(model_fn), x, y, keys, eps=EPS, options=SMALL,
                                 chunks=chunks)
    jax.effects_barrier()
    passes[chunks] = counter.forward + counter.backward
  assert passes[3] < passes[1], passes
  with pytest.raises(ValueError, match="chunks must be"):
    autoattack(model_fn, x, y, keys, eps=EPS, options=SMALL, chunks=0)
  # The reference's loop: each attack on the points still robust, gathered.
  robust = np.array(jnp.argmax(model_fn(x).logits, -1) == y)
  x_adv = np.array(x)
  by_name = {"apgd_ce": apgd, "apgd_t": apgd_targeted, "fab_t": fab_targeted, "square": square}
  for j, name in enumerate(version_attacks("standard")):
    subset = np.flatnonzero(robust)
    options = {**version_options("standard")[name], **SMALL[name]}
    sub_keys = jax.vmap(lambda k: jax.random.fold_in(k, j))(keys[subset])
    adv = by_name[name](model_fn, x[subset], y[subset], sub_keys, eps=EPS, **options)
    fooled = np.asarray(jnp.argmax(model_fn(adv).logits, -1) != y[subset])
    x_adv[subset[fooled]] = np.asarray(adv)[fooled]
    robust[subset[fooled]] = False
    for chunks, result in results.items():
      np.testing.assert_array_equal(result.robust_after[name], robust,
                                    err_msg=f"{name}, chunks={chunks}")
  assert 0 < robust.mean() < float(results[1].accuracy())
  for result in results.values():
    np.testing.assert_allclose(result.x_adv, x_adv, atol=1e-5)


def test_rand_version_with_eot(trained):
  model_fn, x, y = trained

  def randomised(v, key):
    return model_fn(jnp.clip(v + 0.02 * jax.random.normal(key, v.shape), 0, 1))
  assert version_attacks("rand") == ("apgd_ce", "apgd_dlr")
  assert version_options("rand")["apgd_ce"]["eot_samples"] == 20
  options = {"apgd_ce": {"steps": 10, "eot_samples": 3, "unroll": 1},
             "apgd_dlr": {"steps": 10, "eot_samples": 3, "unroll": 1}}
  result = jax.jit(lambda x, y, k: autoattack(randomised, x, y, k, eps=EPS, version="rand",
                                              options=options))(x, y, jax.random.key(4))
  assert float(result.robust_accuracy()) < float(result.accuracy()) - 0.4
  assert _inside(result.x_adv, x)


def test_bad_input_raises(trained):
  model_fn, x, y = trained
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="'plus'.*standard, rand"):
    autoattack(model_fn, x, y, key, eps=EPS, version="plus")
  with pytest.raises(ValueError, match="'fab'.*apgd_ce"):
    autoattack(model_fn, x, y, key, eps=EPS, attacks=("fab",))
  with pytest.raises(ValueError, match="'iterations' for apgd_t.*steps"):
    autoattack(model_fn, x, y, key, eps=EPS, options={"apgd_t": {"iterations": 5}})
  with pytest.raises(ValueError, match="'l0'"):
    autoattack(model_fn, x, y, key, eps=EPS, norm="l0")
  with pytest.raises(ValueError, match="eps must be >= 0"):
    autoattack(model_fn, x, y, key, eps=-1.0)
  with pytest.raises(ValueError, match="square needs a deterministic model"):
    autoattack(model_fn, x, y, key, eps=EPS, version="rand", attacks=("square",))
  with pytest.raises(ValueError, match="n_target=10.*1..9"):
    fab_targeted(model_fn, x, y, key, eps=EPS, n_target=10)
  with pytest.raises(ValueError, match="rank 4"):
    square(lambda v: ModelOutput(v @ jnp.ones((64, 10)), {}), x.reshape(48, 64), y, key,
           eps=EPS)


def test_check_options_refuses_what_the_attacks_would_before_running():
  """The config's checks (names in the config's spelling, budgets, targets against the
  number of classes) without a model; the rand version does not run APGD-T."""
  assert check_options("standard", "l2", SMALL, 10) == (version_attacks("standard"), {
      name: {**version_options("standard")[name], **SMALL[name]} for name in SMALL})
  assert check_options("rand", "linf", None, 3)[0] == ("apgd_ce", "apgd_dlr")
  for options, classes, message in (
      ({"apgd_ce": {"steps": 0}}, None, r"apgd_ce\.steps must be an integer >= 1, got 0"),
      ({"square": {"queries": 0}}, None, r"square\.queries must be an integer >= 1"),
      ({"square": {"p_init": 1.5}}, None, r"square\.p_init must lie in \(0, 1\], got 1.5"),
      ({"fab_t": {"restarts": -1}}, None, r"fab_t\.restarts must be an integer >= 0"),
      ({"apgd_t": {"n_target": 10}}, 10, r"apgd_t: n_target=10 .* allowed: 1..9"),
      (None, 3, r"apgd_t: the targeted DLR loss needs >= 4 classes, got 3"),
      ({"apgd-ce": {"steps": 5}}, None, r"'apgd-ce'; allowed: apgd_ce, apgd_dlr")):
    with pytest.raises(ValueError, match=message):
      check_options("standard", "linf", options, classes)
