r"""jaxdefense: adversarial training and evaluation of the CAS, FSR and CIFS defenses.

    python main.py --config=configs/quickstart.py --workdir=workdirs/quickstart
    python main.py --config=configs/wrn_fsr.py --workdir=DIR [--config.optim.lr=0.05]
    python main.py --mode=eval --config=configs/wrn_fsr.py --workdir=DIR
    python main.py --mode=audit --config=configs/wrn_fsr.py --workdir=DIR

Exit codes: 0 finished; 75 preempted (SIGTERM; state saved, rerun to resume); 2-6 a fault
of the inputs or the workdir (I/O failures included), reported in one line
(jaxdefense/errors.py); 1 anything else.
"""
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxdefense import cli, errors, parallel, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A Python config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where the run writes everything (and resumes from).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "audit", "analyze"],
                  "train (resumes if the workdir has a checkpoint), eval, audit (is the "
                  "evaluation fooled? docs/audit.md), or analyze.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last", "latest"],
                  "Which checkpoint --mode=eval/audit/analyze loads: the best by the in-training "
                  "PGD (config.eval_pgd; for CAS and CIFS on their own loss), or the last "
                  "(= latest).")
flags.DEFINE_string("coordinator", None,
                    "host:port of process 0 for multi-host runs (else single process, or "
                    "JAXDEFENSE_DISTRIBUTED=1 on clusters JAX detects by itself).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
flags.mark_flags_as_required(["config", "workdir"])


def _which(checkpoint: str) -> str:
  return "latest" if checkpoint == "last" else checkpoint


def main(argv):
  cli.refuse_arguments(argv, "python main.py --config=CONFIG --workdir=DIR [--mode=...]")
  cli.quiet_logging()
  xla_flags.set_cpu_defaults()  # Before JAX's first computation, which reads XLA_FLAGS.
  parallel.maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  unused = parallel.unused_accelerator(jax.default_backend())
  if unused and jax.process_index() == 0:
    print(unused, file=sys.stderr, flush=True)
  with cli.faults_as_one_line(FLAGS.workdir):
    if FLAGS.mode == "train":
      from jaxdefense.training import train
      result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
      if result.get("preempted"):
        sys.exit(errors.PREEMPTED_EXIT_CODE)
    elif FLAGS.mode == "eval":
      from jaxdefense.evaluation import evaluate
      evaluate.run(FLAGS.config, FLAGS.workdir, which=_which(FLAGS.checkpoint))
    elif FLAGS.mode == "audit":
      from jaxdefense.evaluation import audit
      audit.run(FLAGS.config, FLAGS.workdir, which=_which(FLAGS.checkpoint))
    else:
      from jaxdefense.evaluation import analysis
      analysis.run(FLAGS.config, FLAGS.workdir, which=_which(FLAGS.checkpoint))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
