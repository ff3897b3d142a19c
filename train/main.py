"""Entry point: `python -m train.main --config=train/configs/quickstart.py --workdir=runs/quick`.

Flags: --config (an ml_collections config file, `path.py:arg` passes `arg` to get_config; override any field
with --config.section.field=value), --workdir (outputs; rerunning with the same workdir resumes), --summary_only
(print parameter counts, optimizer-state size, a memory estimate and whether it fits as a table, then exit;
--json prints it as one JSON line, --device=h100|v5e|... plans against that accelerator's memory).
"""

from __future__ import annotations

import json
import sys

from train import cpu_malloc

cpu_malloc.tune()  # before JAX starts its threads: no fresh mmap of the step's temporaries on CPU

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, loss.png, config.json.")
flags.DEFINE_bool("summary_only", False, "Print parameter counts, optimizer state, a memory estimate and whether it "
                  "fits the device (a table; --json for one JSON line), then exit.")
flags.DEFINE_bool("json", False, "With --summary_only: print the summary as one JSON line (for scripts).")
flags.DEFINE_string("device", None, "With --summary_only: plan against this accelerator's memory per device "
                    "(v4, v5e, v5p, v6e, a100-40, a100-80, h100, h100-nvl, h200, b200, l4, t4, mi300x; "
                    "train/flops.py DEVICES) instead of the local device's.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host TPU/GPU; run the "
                  "same command on every host). Implied by --coordinator_address/--num_processes/--process_id; "
                  "without them the cluster is auto-detected (TPU pods, SLURM, Open MPI, Kubernetes).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the run (jax.distributed).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (jax.distributed).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  cfg = FLAGS.config
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=train/configs/quickstart.py")
  explicit = {k: v for k, v in (("coordinator_address", FLAGS.coordinator_address),
                                 ("num_processes", FLAGS.num_processes), ("process_id", FLAGS.process_id))
              if v is not None}
  import jax

  if FLAGS.distributed or explicit:
    # Collectives between CPU processes (multi-process runs and tests on CPU); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)
  from train import observe
  observe.enable_compile_cache(cfg.get("system", {}).get("compile_cache_dir", ""))
  from train import trainer  # after flag parsing, so --help is fast
  try:
    if FLAGS.summary_only:
      from train import summary
      info = summary.summarize(cfg, device=FLAGS.device)
      print(json.dumps(info) if FLAGS.json else summary.format_summary(info))
      return 0
    if FLAGS.json or FLAGS.device:
      raise ValueError("--json and --device apply to --summary_only")
    if not FLAGS.workdir:
      raise ValueError("--workdir is required for training")
    out = trainer.train(cfg, FLAGS.workdir)
    out.pop("state", None)
    if jax.process_index() == 0:
      print(json.dumps({k: v for k, v in out.items() if isinstance(v, (int, float, str))}))
  except (ValueError, trainer.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from train.cli import absl_flags_parser
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=absl_flags_parser)
