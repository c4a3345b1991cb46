"""Train unipic-jax models.

    python train.py [--config configs/demo.py] [--workdir runs/demo] [--config.stages.gen32.steps=100]

Config files are ml_collections ``get_config()`` modules; any field can be overridden on the
command line as ``--config.a.b=value``. Running the same command again resumes from the
newest checkpoint in ``--workdir`` (exactly: the result equals an uninterrupted run). On
several processes every process runs the same command, with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (or a TPU pod, SLURM or Open MPI detected):
see docs/multihost.md. See unipic_jax/train/run.py for the config fields.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where checkpoints, logs, samples and the model go.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop (with a checkpoint) after this many updates in this call.")


def main(argv):
    del argv
    logging.getLogger("unipic_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every checkpoint step at INFO
    import unipic_jax

    unipic_jax.tune_cpu_malloc()  # before anything starts JAX's backend
    unipic_jax.enable_compilation_cache()
    from unipic_jax import distributed
    from unipic_jax.eval import shapes as shapes_eval
    from unipic_jax.train import run

    try:
        summary = run.run(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value)
    except distributed.DistributedError as e:
        raise SystemExit(f"train.py: {e}") from None
    if distributed.is_main():
        print(shapes_eval.format_summary(summary) if not summary.get("stopped") else
              f"stopped at step {summary['steps']}; run the same command to resume")


if __name__ == "__main__":
    app.run(main)
