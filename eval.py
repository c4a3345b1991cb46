"""Evaluate unipic-jax checkpoints (shapes benchmark, editing, understanding; sweeps).

    python eval.py --checkpoint DIR [--out results.json]
"""

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model checkpoint folder to evaluate.")
_OUT = flags.DEFINE_string("out", "eval_results.json", "Where the JSON results go.")


def main(argv):
    del argv
    raise app.UsageError("eval.py: evaluation is not implemented yet; see --help for the planned flags.")


if __name__ == "__main__":
    app.run(main)
