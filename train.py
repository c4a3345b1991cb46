"""Train unipic-jax models.

    python train.py --config configs/demo.py [--config.train.steps=100] [--workdir DIR]

Config files are ml_collections ``get_config()`` modules; any field can be overridden
on the command line as ``--config.a.b=value``.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Where checkpoints, logs and samples go.")


def main(argv):
    del argv
    cfg = _CONFIG.value
    print(cfg)
    print(
        "train.py: the training loop (stages, checkpoints, the shapes-world demo) is not implemented yet; "
        f"this run only parsed the config above (workdir {_WORKDIR.value})."
    )


if __name__ == "__main__":
    app.run(main)
