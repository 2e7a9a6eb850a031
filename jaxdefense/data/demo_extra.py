"""A demonstration extra source: augmented copies of the digits training set as an .npz.

    python -m jaxdefense.data.demo_extra --output=workdirs/digits_extra.npz

It stands in for generated images (DeepMind's `cifar10_ddpm.npz`, DM-Improves-AT's
`1m.npz`) where none can be downloaded, so that the pipeline that mixes extra data into
every batch runs end to end in minutes (`configs/quickstart.py:extra`). It is a
demonstration of the pipeline, not a result: the copies add no information a generative
model would, and no number trained on them says anything about generated data.

Each of `--copies` copies of the 1437 training digits (the quick start's split, 16x16) is
shifted by up to `--shift` pixels in each direction (zero fill) and its contrast scaled by a
factor in [0.8, 1.2], drawn from `--seed`; labels are the originals'. The file is written
uncompressed (`np.savez`), in the released sets' format: `image` uint8 (N, H, W, C),
`label` int (N,).
"""
from __future__ import annotations


import numpy as np

from jaxdefense import cli
from jaxdefense.data import datasets
from jaxdefense.workdir import paths

COPIES = 10
SHIFT = 2


def augmented_copies(images: np.ndarray, *, copies: int, shift: int,
                     seed: int) -> np.ndarray:
  """uint8 (copies x N, H, W, C): each copy of every image shifted by (dy, dx) uniform in
  [-shift, shift]^2 with zero fill and its pixels scaled by a uniform factor in [0.8, 1.2]
  (then rounded and clipped to 0..255)."""
  if copies < 1 or shift < 0:
    raise ValueError(f"copies must be >= 1 and shift >= 0; got {copies}, {shift}")
  rng = np.random.default_rng(seed)
  num, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
  out = np.empty((copies * num, *images.shape[1:]), np.uint8)
  for copy in range(copies):
    offsets = rng.integers(0, 2 * shift + 1, (num, 2))
    scale = rng.uniform(0.8, 1.2, (num, 1, 1, 1))
    for i, (dy, dx) in enumerate(offsets):
      out[copy * num + i] = padded[i, dy:dy + height, dx:dx + width]
    part = out[copy * num:(copy + 1) * num]
    part[...] = np.clip(np.rint(part * scale), 0, 255).astype(np.uint8)
  return out


def main(argv: list[str]) -> None:
  from absl import flags  # noqa: PLC0415
  flag_values = flags.FLAGS
  cli.refuse_arguments(argv, "python -m jaxdefense.data.demo_extra --output=X.npz")
  with cli.faults_as_one_line():
    digits = datasets.load("digits")
    images = augmented_copies(digits.train_images, copies=flag_values.copies,
                              shift=flag_values.shift, seed=flag_values.seed)
    labels = np.tile(digits.train_labels, flag_values.copies)
    output = paths.resolve(flag_values.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as file:
      np.savez(file, image=images, label=labels)
  print(f"wrote {len(labels)} augmented digits {images.shape[1:]} to {output} (a "
        f"demonstration source, not generated data)")


def define_flags() -> None:
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_string("output", None, "The .npz to write (local or gs://).")
  flags.DEFINE_integer("copies", COPIES, "Augmented copies of the training digits.",
                       lower_bound=1)
  flags.DEFINE_integer("shift", SHIFT, "The largest shift, in pixels, in each direction.",
                       lower_bound=0)
  flags.DEFINE_integer("seed", 0, "The seed of the shifts and contrast factors.")
  flags.mark_flags_as_required(["output"])
  flags.register_validator("output", lambda output: output is None or output.endswith(".npz"),
                           "--output must end in .npz")


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
