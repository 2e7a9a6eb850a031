r"""From runs to the paper's table (docs/report.md).

    python -m jaxdefense.report workdirs/seeds/*_s* --output=workdirs/seeds/report \
        --baseline=defense=none
    python -m jaxdefense.report 'gs://BUCKET/runs/*' --output=gs://BUCKET/reports/runs

Reads each WORKDIR's config.json, results.json, eval.json, audit.json and metrics.jsonl;
groups the runs by the config fields that differ between them, the seed the replicate;
writes DIR/report.md, report.csv, report.tex, robust_accuracy.png and training_curves.png.
A WORKDIR with `*`, `?` or `[` is a pattern (for buckets, which no shell expands). A
workdir that cannot be reported, a run evaluated unlike its section's others, a baseline
matching no run: one line each on stderr, and the report is written for the rest, saying
what it left out. Exit codes: 0 a report was written; 2 bad flags or nothing to report.
"""
from __future__ import annotations

import sys

from absl import app, flags

from jaxdefense import cli, errors
from jaxdefense.report import files, grouping, runs, summary, tables
from jaxdefense.workdir import paths

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Directory (local or gs://) the report is written to.")
flags.DEFINE_string("baseline", None,
                    "FIELD=VALUE[,FIELD=VALUE...]: the groups each other group is compared "
                    "with point by point, e.g. defense=none; FIELD a dotted config field, "
                    "`checkpoint`, or defense, objective, arch, data.")
flags.DEFINE_float("confidence", 0.95, "Level of the differences' intervals, in (0, 1).")
flags.mark_flags_as_required(["output"])
USAGE = "python -m jaxdefense.report WORKDIR... --output=DIR [--baseline=FIELD=VALUE]"


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    print(f"error: no WORKDIR given; usage: {USAGE}", file=sys.stderr, flush=True)
    sys.exit(errors.ConfigError.exit_code)
  cli.quiet_logging()
  with cli.faults_as_one_line(FLAGS.output):
    if not 0 < FLAGS.confidence < 1:
      raise errors.ConfigError(f"--confidence={FLAGS.confidence}: must be in (0, 1), e.g. "
                               "0.95")
    if FLAGS.baseline:
      grouping.parse_baseline(FLAGS.baseline)  # A malformed one stops here.
    paths.check_writable(FLAGS.output, what="--output")
    found, left_out = runs.read_all(argv[1:])
    report = summary.build(found, left_out, FLAGS.baseline, FLAGS.confidence)
    for item in report.left_out:
      print(f"left out: {item.line()}", file=sys.stderr, flush=True)
    if report.baseline_problem:
      print(f"no comparison: {report.baseline_problem}", file=sys.stderr, flush=True)
    for line in report.not_compared:
      print(f"not compared: {line}", file=sys.stderr, flush=True)
    if not found:
      raise errors.DataError("no workdir could be reported (each is listed above)")
    written = files.write(report, FLAGS.output)
    print(tables.markdown(report), flush=True)
    print(f"wrote {', '.join(str(p) for p in written)}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
