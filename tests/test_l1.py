"""The L1 threat model (fra31/auto-attack's norm='L1'): the projection onto ball and box by
hand and against a NumPy transcription of the reference's sorted search, FAB's L1
hyperplane step against a linear program, APGD's sparse direction and decreasing-eps
schedule, the L1 version's budgets, and every attack's result inside the L1 ball and the
box exactly (a float64 sum) while breaking a trained model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxdefense.attacks import apgd, autoattack, common
from jaxdefense.attacks.auto_pgd import largereps_schedule
from jaxdefense.attacks.auto_attack import version_options
from jaxdefense.attacks.fab import project_l1_hyperplane
from tests.attack_models import accuracy, train_mlp

EPS = 3.0  # On 8 x 8 digits in [0, 1]: about a twentieth of a mean image's L1 norm.
SMALL = {"apgd_ce": {"steps": 12, "restarts": 1}, "apgd_t": {"steps": 12, "n_target": 2},
         "fab_t": {"steps": 10, "n_target": 2}, "square": {"queries": 200}}


@pytest.fixture(scope="module")
def trained():
  model_fn, x, y = train_mlp()
  return model_fn, x[:48], y[:48]


def numpy_l1_ball_step(x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
  """The reference's L1_projection for one row, as it computes it: the breakpoints
  {-u_i, |y_i|} sorted, the cumulative sums of the removed mass, the segment where it
  reaches ||y||_1 - eps, alpha on it; d = -sign(y) min(max(-u, alpha), |y|)."""
  u = np.minimum(0.0, np.minimum(1 - x - y, x + y))
  size = np.abs(y)
  excess = size.sum() - eps
  if -u.sum() >= excess:
    return -np.sign(y) * -u
  points = np.sort(np.concatenate([-u, size]))
  removed = lambda a: np.minimum(np.maximum(-u, a), size).sum()
  values = np.array([removed(p) for p in points])
  j = np.searchsorted(values, excess)  # values[j - 1] < excess <= values[j]
  lo, hi = points[j - 1] if j > 0 else 0.0, points[j]
  slope = (removed(hi) - removed(lo)) / (hi - lo) if hi > lo else 1.0
  alpha = lo + (excess - removed(lo)) / slope
  return -np.sign(y) * np.minimum(np.maximum(-u, alpha), size)


def test_l1_ball_step_by_hand():
  """x = (.5, .5, .9), y = (.3, -.2, .3), eps .4: the box takes .2 from the third
  coordinate, the threshold alpha = .1 the rest: y + d = (.2, -.1, .1), norm .4."""
  x = jnp.array([[0.5, 0.5, 0.9]])
  y = jnp.array([[0.3, -0.2, 0.3]])
  d = np.asarray(common.l1_ball_step(x, y, 0.4))
  np.testing.assert_allclose(d, [[-0.1, 0.1, -0.2]], atol=1e-6)
  inside = np.asarray(common.l1_ball_step(x, 0.1 * y, 0.4))  # Already inside: unchanged.
  np.testing.assert_allclose(inside, 0.0, atol=0)


def test_l1_ball_step_equals_the_references_sorted_search():
  rng = np.random.default_rng(0)
  rows, dim = 32, 200
  x = rng.uniform(size=(rows, dim))
  x[:, :30] = np.round(x[:, :30])  # On the box's faces.
  y = rng.normal(size=(rows, dim)) * rng.uniform(0.01, 0.5, (rows, 1))
  eps = rng.uniform(0.5, 20, rows)
  d = np.asarray(jax.vmap(lambda a, b, e: common.l1_ball_step(a[None], b[None], e)[0])(
      jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(eps, jnp.float32)))
  for i in range(rows):
    expected = numpy_l1_ball_step(x[i].astype(np.float32).astype(np.float64),
                                  y[i].astype(np.float32).astype(np.float64), eps[i])
    np.testing.assert_allclose(d[i], expected, atol=3e-6, err_msg=f"row {i}")


def test_projection_is_inside_the_l1_ball_and_the_box_exactly():
  """`project` under L1 on points far outside: a float64 sum of |x' - x| <= eps, x' in
  [0, 1], and points already inside unchanged."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(64, 8, 8, 3)), jnp.float32)
  far = x + jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  for eps in (0.5, 7.0, 100.0):
    p = np.asarray(common.project(far, x, eps, "l1"), np.float64)
    assert np.abs(p - np.asarray(x, np.float64)).sum(axis=(1, 2, 3)).max() <= eps
    assert p.min() >= 0 and p.max() <= 1
  near = x + 1e-4 * jnp.sign(jnp.asarray(rng.normal(size=x.shape), jnp.float32))
  near = jnp.clip(near, 0, 1)
  np.testing.assert_array_equal(np.asarray(common.project(near, x, 100.0, "l1")), near)


def test_fab_l1_projection_is_the_least_l1_step():
  """Against a linear program: min ||d||_1 s.t. <w, t + d> = b, 0 <= t + d <= 1 (its
  optimum; the minimiser can be one of several), and the hyperplane reached."""
  rng = np.random.default_rng(2)
  rows, dim = 12, 40
  t = rng.uniform(size=(rows, dim))
  w = rng.normal(size=(rows, dim))
  b = np.sum(w * t, 1) + rng.choice([-1, 1], rows) * np.logspace(-2, 0.5, rows)
  d = np.asarray(project_l1_hyperplane(*(jnp.asarray(v, jnp.float32) for v in (t, w, b))),
                 np.float64)
  for i in range(rows):
    lp = linprog(np.ones(2 * dim), A_eq=np.concatenate([w[i], -w[i]])[None],
                 b_eq=[b[i] - w[i] @ t[i]], bounds=[(0, 1 - v) for v in t[i]]
                 + [(0, v) for v in t[i]])
    assert lp.status == 0
    assert np.abs(d[i]).sum() == pytest.approx(lp.fun, rel=1e-4, abs=1e-5), i
    assert w[i] @ (t[i] + d[i]) == pytest.approx(b[i], abs=1e-4), i
    assert (t[i] + d[i]).min() >= -1e-6 and (t[i] + d[i]).max() <= 1 + 1e-6


def test_sparse_direction_and_schedule():
  """The step moves sign(g) on the top fraction of |g| with unit L1 norm; the schedule
  splits 100 iterations 30 / 30 / 40 over 3, 2 and 1 eps; the L1 version's budgets."""
  g = jnp.array([[0.5, -3.0, 0.1, 2.0, -0.2]])
  d = np.asarray(common.sparse_l1_direction(g, jnp.array([0.4])))
  np.testing.assert_allclose(d, [[0, -0.5, 0, 0.5, 0]], atol=1e-9)
  assert largereps_schedule(100) == ((3.0, 30), (2.0, 30), (1.0, 40))
  assert largereps_schedule(12) == ((3.0, 4), (2.0, 4), (1.0, 4))
  l1 = version_options("standard", "l1")
  assert l1["apgd_ce"] == {"steps": 100, "restarts": 5, "largereps": True}
  assert l1["apgd_t"]["n_target"] == 5 and l1["apgd_t"]["largereps"]
  assert l1["fab_t"]["n_target"] == 9 and l1["square"]["queries"] == 5000


def _l1_inside(x_adv, x, eps=EPS) -> bool:
  distance = np.abs(np.asarray(x_adv, np.float64) - np.asarray(x, np.float64))
  return bool(distance.sum(axis=tuple(range(1, x.ndim))).max() <= eps
              and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1)


def test_each_l1_attack_breaks_the_model_inside_the_ball(trained):
  """APGD without the schedule, and the standard version under L1 (APGD-CE and APGD-T over
  decreasing eps, FAB-T, Square): inside the ball and the box, far below natural accuracy,
  APGD-CE alone already well below it; the robust points are those x_adv leaves correct."""
  model_fn, x, y = trained
  natural = accuracy(model_fn, x, y)
  key = jax.random.key(0)
  x_adv = jax.jit(lambda: apgd(model_fn, x, y, key, eps=EPS, norm="l1", steps=12))()
  assert _l1_inside(x_adv, x) and accuracy(model_fn, x_adv, y) < natural - 0.3
  result = jax.jit(lambda: autoattack(model_fn, x, y, key, eps=EPS, norm="l1",
                                      options=SMALL))()
  assert _l1_inside(result.x_adv, x)
  after = [float(np.mean(result.robust_after[name]))
           for name in ("apgd_ce", "apgd_t", "fab_t", "square")]
  assert after[0] < natural - 0.3  # APGD-CE over decreasing eps breaks points by itself.
  assert float(result.robust_accuracy()) == after[-1] < natural - 0.4
  assert accuracy(model_fn, result.x_adv, y) == pytest.approx(after[-1])
