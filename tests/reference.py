"""NumPy references shared by the tests (float64, written from the formulas)."""
import numpy as np


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(logits, labels):
  """Per-example cross-entropy -log softmax(logits)[label]."""
  return -np_log_softmax(logits)[np.arange(len(labels)), labels]
