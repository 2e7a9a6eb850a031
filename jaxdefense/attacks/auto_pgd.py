"""Auto-PGD (APGD) with CE, DLR and targeted-DLR losses (Croce & Hein, ICML 2020).

Follows the reference implementation (github fra31/auto-attack, `autopgd_base.py`):
per-point step size eta = 2 eps halved at checkpoints, momentum 0.75, restart of the step
from the best point, best-loss and misclassified-point tracking, restarts on the points not
yet fooled, APGD-T over the 2nd..(n_target+1)th most likely clean classes, and EOT for
randomised models (AutoAttack's "rand" version).

Every attack here is a pure function, traceable under `jax.jit` with static budgets. The
points to attack are a boolean mask `active` (fixed shapes): inactive points keep their
input and are never reported fooled. All randomness is drawn per example from one key per
example (`key` may be one key, split over the batch, or those N keys), so a point's result
does not depend on which other points share its batch: running on a masked batch equals
running on the subset.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.attacks import losses
from jaxdefense.attacks.common import (
    Forward, ModelFn, StochasticModelFn, ascent_direction, check_eps, check_n_target,
    check_norm, check_positive, check_restarts, check_unit_interval, example_keys, fold_model,
    loop_unroll, make_forward, num_classes, per_point, predicts, project, random_start,
    run_on_robust, sparse_l1_direction, target_classes)

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75
L1_START_TOPK = 0.2  # The fraction of coordinates the first L1 steps move.


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
  """0-based iterations at which APGD checks its step size (Croce & Hein 2020, Sec. 3):
  the first window is k = max(int(0.22 N), 1) iterations, each next one
  k = max(k - max(int(0.03 N), 1), max(int(0.06 N), 1)). N = 100: 21, 40, 56, ..., 98."""
  k = max(int(0.22 * steps), 1)
  decrease = max(int(0.03 * steps), 1)
  minimum = max(int(0.06 * steps), 1)
  points = []
  i = k - 1
  while i < steps:
    points.append(i)
    k = max(k - decrease, minimum)
    i += k
  return tuple(points)


def _schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per iteration: whether it is a checkpoint, and the window k that ends there."""
  is_check = np.zeros(steps, bool)
  window = np.ones(steps, np.int32)
  previous = -1
  for i in apgd_checkpoints(steps):
    is_check[i] = True
    window[i] = i - previous
    previous = i
  return is_check, window


def step_size_halving(loss_steps: jax.Array, i: int | jax.Array, k: int | jax.Array,
                      loss_best: jax.Array,
                      best_at_last_check: jax.Array, reduced_at_last_check: jax.Array,
                      rho: float = 0.75) -> jax.Array:
  """Which points halve eta at checkpoint i (window of k iterations), (N,) bool:
  Condition 1: sum_{j=i-k+1}^{i} 1[f(x_{j+1}) > f(x_j)] <= rho k (the loss rose in at most
  rho k of the last k steps), or
  Condition 2: eta was not halved at the previous checkpoint and the best loss has not
  improved since it.
  `loss_steps` (N_iter, N) holds the loss after each step, zeros where not yet reached; as
  in the reference the step before iteration 0 is compared with the last row (a zero)."""
  rows = jnp.arange(loss_steps.shape[0])[:, None]
  rose = loss_steps > jnp.roll(loss_steps, 1, axis=0)
  in_window = (rows <= i) & (rows > i - k)
  count = jnp.sum(rose & in_window, axis=0)
  oscillating = count <= k * rho
  stalled = ~reduced_at_last_check & (best_at_last_check >= loss_best)
  return oscillating | stalled


def _loss_and_grad(forward: Forward, loss_fn: losses.LossFn, labels: jax.Array,
                   eot_samples: int):
  """(x, model_key) -> (loss (N,), logits, d loss / d x averaged over the EOT samples).

  As in the reference, loss and logits are those of the last EOT sample."""
  def one(x, k):
    def total(v):
      output = forward(v, k)
      loss = loss_fn(output, labels)
      return jnp.sum(loss), (loss, output.logits)
    (_, (loss, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return loss, logits, grad

  def evaluate(x, model_key):
    if model_key is None or eot_samples == 1:
      return one(x, model_key)

    def sample(s, carry):
      _, _, grad_sum = carry
      loss, logits, grad = one(x, jax.random.fold_in(model_key, s))
      return loss, logits, grad_sum + grad
    loss, logits, grad = one(x, jax.random.fold_in(model_key, 0))
    loss, logits, grad = jax.lax.fori_loop(1, eot_samples, sample, (loss, logits, grad))
    return loss, logits, grad / eot_samples
  return evaluate


def _l1_check_interval(steps: int) -> int:
  """Under L1 the step size and sparsity are revised every max(int(0.04 N), 1) iterations."""
  return max(int(0.04 * steps), 1)


def _single_run(evaluate, x: jax.Array, labels: jax.Array, x_start: jax.Array,
                model_key: jax.Array | None, *, eps, norm: str, steps: int, rho: float,
                unroll: int, from_init: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One APGD run from x_start: (last misclassified point or x_start, still correct, the
  highest-loss point).

  L-inf, L2 (momentum alpha = 0.75, 1 at the first step; eta from 2 eps):
  z = P(x_k + eta sign(g_k));  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})),
  eta halved at the checkpoints (`step_size_halving`).
  L1 (the reference's; no momentum; eta from eps): x_{k+1} = P(x_k + eta s_k), s_k the
  sparse sign of g_k on a fraction topk of the coordinates (`sparse_l1_direction`, topk
  from 0.2, or from the start's sparsity / 1.5 `from_init`); every
  `_l1_check_interval(steps)` iterations topk = ||x_best - x||_0 / (1.5 D), and a point
  whose best point became 5% sparser restarts from it with eta = eps, the others take
  eta / 1.5, eta kept in [eps / 10, eps]."""
  n = x.shape[0]
  size = x[0].size
  is_check, window = (jnp.asarray(a) for a in _schedule(steps))
  l1_interval = _l1_check_interval(steps)
  x_start = jnp.clip(x_start, 0.0, 1.0)
  loss, logits, grad = evaluate(x_start, fold_model(model_key, 0))
  acc = predicts(logits, labels)
  alpha_step = 1.0 if norm == "l1" else 2.0
  step = jnp.full((n,), alpha_step, jnp.float32) * eps
  sparsity = lambda v: jnp.sum((v - x) != 0, axis=tuple(range(1, x.ndim))).astype(jnp.float32)
  if from_init:
    sp_old = sparsity(x_start)
    topk = sp_old / size / 1.5
  else:
    sp_old, topk = jnp.full((n,), float(size)), jnp.full((n,), L1_START_TOPK)
  state = dict(x_adv=x_start, x_old=x_start, grad=grad, x_best=x_start, grad_best=grad,
               loss_best=loss, x_best_adv=x_start, acc=acc, step=step,
               loss_steps=jnp.zeros((steps, n), jnp.float32), best_last=loss,
               reduced_last=jnp.ones((n,), bool), topk=topk, sp_old=sp_old)

  def body(i, s):
    x_adv = s["x_adv"]
    eta = per_point(s["step"], x.ndim)
    if norm == "l1":
      x_new = project(x_adv + eta * sparse_l1_direction(s["grad"], s["topk"]), x, eps, norm)
    else:
      alpha = jnp.where(i > 0, MOMENTUM, 1.0)
      z = project(x_adv + eta * ascent_direction(s["grad"], norm, guard="add"), x,
                  eps, norm)
      x_new = project(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - s["x_old"]),
                      x, eps, norm)
    loss, logits, grad = evaluate(x_new, fold_model(model_key, i + 1))
    pred = predicts(logits, labels)
    wrong = per_point(~pred, x.ndim)
    x_best_adv = jnp.where(wrong, x_new, s["x_best_adv"])
    loss_steps = s["loss_steps"].at[i].set(loss)
    improved = loss > s["loss_best"]
    improved_x = per_point(improved, x.ndim)
    x_best = jnp.where(improved_x, x_new, s["x_best"])
    grad_best = jnp.where(improved_x, grad, s["grad_best"])
    loss_best = jnp.where(improved, loss, s["loss_best"])
    out = dict(s, x_old=x_adv, x_best=x_best, grad_best=grad_best, loss_best=loss_best,
               x_best_adv=x_best_adv, acc=s["acc"] & pred, loss_steps=loss_steps)

    if norm == "l1":
      check = (i + 1) % l1_interval == 0
      sp_curr = sparsity(x_best)
      sparser = check & (sp_curr / s["sp_old"] < 0.95)
      revised = jnp.clip(jnp.where(sparser, alpha_step * eps, s["step"] / 1.5),
                         alpha_step * eps / 10, alpha_step * eps)
      sparser_x = per_point(sparser, x.ndim)
      return dict(out, x_adv=jnp.where(sparser_x, x_best, x_new),
                  grad=jnp.where(sparser_x, grad_best, grad),
                  step=jnp.where(check, revised, s["step"]),
                  topk=jnp.where(check, sp_curr / size / 1.5, s["topk"]),
                  sp_old=jnp.where(check, sp_curr, s["sp_old"]))
    check = is_check[i]
    halve = step_size_halving(loss_steps, i, window[i], loss_best, s["best_last"],
                              s["reduced_last"], rho)
    restart = check & halve
    restart_x = per_point(restart, x.ndim)
    return dict(out, x_adv=jnp.where(restart_x, x_best, x_new),
                grad=jnp.where(restart_x, grad_best, grad),
                step=jnp.where(restart, s["step"] / 2, s["step"]),
                best_last=jnp.where(check, loss_best, s["best_last"]),
                reduced_last=jnp.where(check, halve, s["reduced_last"]))

  state = jax.lax.fori_loop(0, steps, body, state, unroll=unroll)
  return state["x_best_adv"], state["acc"], state["x_best"]


def largereps_schedule(steps: int) -> tuple[tuple[float, int], ...]:
  """The reference's L1 schedule (`decr_eps_pgd`): (eps multiple, iterations) stages
  3 eps, 2 eps, eps over ceil(0.3 N), ceil(0.3 N) and the rest of the N iterations."""
  first = math.ceil(0.3 * steps)
  return ((3.0, first), (2.0, first), (1.0, steps - 2 * first))


def _run(evaluate, x, labels, keys, model_key, *, eps, norm, steps, rho, unroll, largereps):
  """One APGD run from a random start; under L1 with `largereps` the reference's
  decreasing-eps run: from x + N(0, I) projected on the 3 eps ball, each stage starts at
  the previous stage's highest-loss point projected on its own ball, and the last stage's
  result (inside the eps-ball) is the run's."""
  if not largereps:
    adv, acc, _ = _single_run(evaluate, x, labels, random_start(keys, x, eps, norm), model_key,
                              eps=eps, norm=norm, steps=steps, rho=rho, unroll=unroll)
    return adv, acc
  x_init = random_start(keys, x, 3.0 * eps, "l1")
  for stage, (factor, stage_steps) in enumerate(largereps_schedule(steps)):
    stage_eps = factor * eps
    adv, acc, x_init = _single_run(
        evaluate, x, labels, project(x_init, x, stage_eps, "l1"),
        fold_model(model_key, 1000 * stage), eps=stage_eps, norm=norm, steps=stage_steps,
        rho=rho, unroll=min(unroll, stage_steps), from_init=True)
  return adv, acc


def _check_common(eps, norm: str, steps: int, restarts: int, rho: float, eot_samples: int,
                  attack: str, largereps: bool) -> None:
  check_eps(eps)
  check_norm(norm, attack=attack)
  if largereps and norm != "l1":
    raise ValueError(f"{attack}: largereps (the decreasing-eps schedule) is for norm 'l1' "
                     f"only, got norm {norm!r}")
  if largereps and steps < 3:
    raise ValueError(f"{attack}: largereps splits the steps over three stages; needs "
                     f"steps >= 3, got {steps}")
  check_positive("steps", steps)
  check_restarts(restarts)
  check_positive("eot_samples", eot_samples)
  check_unit_interval("rho", rho)


def _resolve_loss(loss: str | losses.LossFn) -> losses.LossFn:
  if callable(loss):
    return loss
  if loss == "ce":
    return losses.cross_entropy
  if loss == "dlr":
    return losses.dlr
  raise ValueError(f"unknown APGD loss {loss!r}; allowed: {', '.join(LOSSES)} or a "
                   f"per-example loss function (ModelOutput, labels) -> (N,)")


def apgd(model_fn: ModelFn | StochasticModelFn, x: jax.Array, labels: jax.Array,
         key: jax.Array, *, eps, norm: str = "linf", loss: str | losses.LossFn = "ce",
         steps: int = 100, restarts: int = 1, rho: float = 0.75, eot_samples: int = 1,
         stochastic: bool = False, model_key: jax.Array | None = None,
         active: jax.Array | None = None, unroll: int | None = None,
         chunks: int = 1, largereps: bool = False) -> jax.Array:
  """APGD maximising `loss` ("ce", "dlr" -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12),
  or any per-example loss) in the eps-ball: the adversarial points, x where not fooled.

  `stochastic`: `model_fn(x, key)` is a randomised model; gradients are averaged over
  `eot_samples` draws (EOT). `active` (N,) bool: the points to attack (default all);
  `chunks`: see `common.run_on_robust`; `largereps` (L1 only): each run over the
  decreasing eps of `largereps_schedule`, as AutoAttack's L1 version runs APGD."""
  _check_common(eps, norm, steps, restarts, rho, eot_samples, "apgd", largereps)
  loss_fn = _resolve_loss(loss)
  x = x.astype(jnp.float32)
  forward = make_forward(model_fn, stochastic)
  keys, model_key = example_keys(key, x.shape[0], model_key, stochastic)
  unroll = loop_unroll(steps, unroll)

  def run_fn(r, run_keys, run_model_key, x, labels, attacked):
    del r, attacked
    evaluate = _loss_and_grad(forward, loss_fn, labels, eot_samples)
    return _run(evaluate, x, labels, run_keys, run_model_key, eps=eps, norm=norm, steps=steps,
                rho=rho, unroll=unroll, largereps=largereps)
  return run_on_robust(forward, x, labels, keys, model_key, active, restarts, run_fn, chunks)


def apgd_targeted(model_fn: ModelFn | StochasticModelFn, x: jax.Array, labels: jax.Array,
                  key: jax.Array, *, eps, norm: str = "linf", steps: int = 100,
                  n_target: int = 9, restarts: int = 1, rho: float = 0.75,
                  eot_samples: int = 1, stochastic: bool = False,
                  model_key: jax.Array | None = None, active: jax.Array | None = None,
                  unroll: int | None = None, chunks: int = 1,
                  largereps: bool = False) -> jax.Array:
  """APGD-T: APGD on the targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12)
  for t = the 2nd, ..., (n_target+1)th most likely class of the clean logits, each target
  (times `restarts`) run on the points not yet fooled. Needs >= 4 classes. `largereps`:
  as in `apgd`."""
  _check_common(eps, norm, steps, restarts, rho, eot_samples, "apgd_targeted", largereps)
  x = x.astype(jnp.float32)
  forward = make_forward(model_fn, stochastic)
  keys, model_key = example_keys(key, x.shape[0], model_key, stochastic)
  classes = num_classes(forward, x, model_key)
  if classes < 4:
    raise ValueError(f"the targeted DLR loss needs >= 4 classes, got {classes}")
  check_n_target(n_target, classes, "apgd_targeted")
  unroll = loop_unroll(steps, unroll)

  def run_fn(r, run_keys, run_model_key, x, labels, attacked):
    del attacked
    target_key, iterate_key = (None, None) if run_model_key is None else \
        jax.random.split(run_model_key)
    targets = target_classes(forward(x, target_key).logits, 2 + r // restarts)
    evaluate = _loss_and_grad(forward, losses.dlr_targeted(targets), labels, eot_samples)
    return _run(evaluate, x, labels, run_keys, iterate_key, eps=eps, norm=norm, steps=steps,
                rho=rho, unroll=unroll, largereps=largereps)
  return run_on_robust(forward, x, labels, keys, model_key, active, n_target * restarts, run_fn,
                       chunks)
