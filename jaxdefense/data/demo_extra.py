"""A demonstration extra source: augmented copies of the digits training set as an .npz.

    python -m jaxdefense.data.demo_extra --output=workdirs/digits_extra.npz

It stands in for generated images (DeepMind's `cifar10_ddpm.npz`, DM-Improves-AT's
`1m.npz`) where none can be downloaded, so that the pipeline that mixes extra data into
every batch runs end to end in minutes (`configs/quickstart_extra.py`). It is a
demonstration of the pipeline, not a result: the copies add no information a generative
model would, and no number trained on them says anything about generated data.

Each of `--copies` copies of the 1437 training digits (the quick start's split, 16x16) is
shifted by up to `--shift` pixels in each direction (zero fill) and its contrast scaled by a
factor in [0.8, 1.2], drawn from `--seed`; labels are the originals'. The file is written
uncompressed (`np.savez`), in the released sets' format: `image` uint8 (N, H, W, C),
`label` int (N,).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from jaxdefense import data
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


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jaxdefense.data.demo_extra",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--output", required=True, help="the .npz to write (local or gs://)")
  parser.add_argument("--copies", type=int, default=COPIES)
  parser.add_argument("--shift", type=int, default=SHIFT)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.copies < 1 or args.shift < 0:
    parser.error(f"--copies must be >= 1 and --shift >= 0; got {args.copies}, {args.shift}")
  if not args.output.endswith(".npz"):
    parser.error(f"--output must end in .npz; got {args.output}")
  digits = data.load("digits")
  images = augmented_copies(digits.train_images, copies=args.copies, shift=args.shift,
                            seed=args.seed)
  labels = np.tile(digits.train_labels, args.copies)
  output = paths.resolve(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  with output.open("wb") as file:
    np.savez(file, image=images, label=labels)
  print(f"wrote {len(labels)} augmented digits {images.shape[1:]} to {output} (a "
        f"demonstration source, not generated data)")


if __name__ == "__main__":
  main()
