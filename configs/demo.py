"""The demo: a tiny UniPic trained on the built-in shapes world on a CPU.

    python train.py --config configs/demo.py --config.train.steps=100

The training loop itself arrives with the training issue; for now this config holds the
pieces that exist (model preset, mesh) so the command line and overrides work.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.llm = ml_collections.ConfigDict(dict(preset="tiny", dtype="float32", param_dtype="float32", remat="none"))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.train = ml_collections.ConfigDict(dict(steps=1000, batch_size=32, log_every=10))
    return c
