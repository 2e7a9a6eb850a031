"""The prepare command: an extra-data .npz (local or gs://) as a prepared directory of .npy
shards, read by index (`writer.prepare`).

    python -m jaxdefense.data.prepare --source=X.npz --output=DIR [--shard_images=N]

A bad flag or a fault of the files is one `error:` line, exit 2 (jaxdefense/cli.py).
"""
from __future__ import annotations

import json

from etils import epath

from jaxdefense import cli
from jaxdefense.data import sources, writer


def main(argv: list[str]) -> None:
  from absl import flags  # noqa: PLC0415
  flag_values = flags.FLAGS
  cli.refuse_arguments(argv, f"{sources.PREPARE_COMMAND} --source=X.npz --output=DIR")
  with cli.faults_as_one_line():
    writer.prepare(flag_values.source, flag_values.output, shard_images=flag_values.shard_images)
    meta = json.loads((epath.Path(flag_values.output) / sources.META).read_text())
  print(f"prepared {meta['num_examples']} images of {flag_values.source} in "
        f"{flag_values.output} ({len(meta['shards'])} shards)")


def define_flags() -> None:
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_string("source", None, "The .npz with 'image' uint8 (N, H, W, C) and 'label' "
                                      "integers (local or gs://).")
  flags.DEFINE_string("output", None, "The new directory (local or gs://).")
  flags.DEFINE_integer("shard_images", writer.SHARD_IMAGES, "Images per shard.", lower_bound=1)
  flags.mark_flags_as_required(["source", "output"])


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
