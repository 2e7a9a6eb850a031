"""Small naturally trained models for the attack tests: an MLP on sklearn's 8x8 digits
(NHWC in [0, 1]), trained with Adam for 300 steps (about 1 s)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from jaxdefense.models.common import ModelOutput


class MLP(nn.Module):
  hidden: int = 64
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    return ModelOutput(nn.Dense(self.classes)(x), {})


def digits():
  """(train x, train y, test x, test y), a fixed shuffle of the 1797 digits."""
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(x))
  x, y = x[order], y[order]
  return x[:1500], y[:1500], x[1500:], y[1500:]


def train_mlp(steps: int = 300):
  """A model function x -> ModelOutput and the test split."""
  x_train, y_train, x_test, y_test = digits()
  model = MLP()
  params = model.init(jax.random.key(0), x_train[:1])
  optimizer = optax.adam(1e-2)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      logits = model.apply(p, x).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, state = optimizer.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, updates), state

  rng = np.random.RandomState(1)
  for _ in range(steps):
    batch = rng.randint(0, len(x_train), 128)
    params, state = step(params, state, x_train[batch], y_train[batch])
  return (lambda x: model.apply(params, x)), jnp.asarray(x_test), jnp.asarray(y_test)


def accuracy(model_fn, x, y) -> float:
  return float(jnp.mean(jnp.argmax(model_fn(x).logits, axis=-1) == y))


def linf_distance(a, b) -> np.float32:
  """max |a - b| in float32, the arithmetic the eps-ball guarantee holds in."""
  return np.float32(jnp.max(jnp.abs(a - b)))
