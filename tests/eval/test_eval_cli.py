"""eval.py on a checkpoint: text-to-image per category, editing, understanding, JSON + grids."""

import json
import os
import subprocess
import sys
from pathlib import Path

from flax import nnx

from unipic_jax import checkpoint
from unipic_jax.data import shapes_tokenizer
from unipic_jax.models import unipic
from unipic_jax.train import run

ROOT = Path(__file__).parents[2]


def _eval(*args):
    import jax

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),  # the suite's compilation cache
           "UNIPIC_JAX_XLA_CACHE": jax.config.jax_compilation_cache_dir}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_eval_writes_scores_and_grids(tmp_path):
    import ml_collections

    tok = shapes_tokenizer.build(tmp_path / "tokenizer")
    cfg = ml_collections.ConfigDict(dict(tokenizer="shapes",
                                         model=dict(preset="tiny", overrides=dict(mar=dict(grid=4)))))
    model = unipic.UniPic(run.model_config(cfg, tok), rngs=nnx.Rngs(0))
    checkpoint.save_model(tmp_path / "model", model)
    # the settings training ended with, saved beside the model: eval.py takes them unless a flag overrides
    (tmp_path / "model" / "eval.json").write_text(json.dumps(dict(size=[16, 16], per_category=1, edit_per_kind=1,
                                                                  qa=3, num_iter=2, cfg=1.5, cfg_schedule="linear")))
    p = _eval("--checkpoint", str(tmp_path / "model"), "--qa", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(res["t2i"]["categories"]) == {"single_object", "two_object", "counting", "colors", "position",
                                             "color_attr"} and res["t2i"]["n"] == 6
    assert res["edit"]["n"] == 4 and res["understanding"]["n"] == 2
    assert 0.0 <= res["understanding"]["accuracy"] <= 1.0
    assert res["settings"] == dict(split="validation", seed=0, size=[16, 16], per_category=1, edit_per_kind=1, qa=2,
                                   num_iter=2, cfg=1.5, cfg_schedule="linear", temperature=1.0, xt_temperature=1.0,
                                   ddim_after=None, ddim_xt_scale=1.0)
    for name in ("t2i.png", "edit.png", "qa.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "shapes benchmark" in p.stdout and "editing: overall" in p.stdout


def test_eval_names_a_missing_checkpoint(tmp_path):
    p = _eval("--checkpoint", str(tmp_path / "nothing"), "--qa", "0", "--edit_per_kind", "0")
    assert p.returncode != 0
    assert "eval.py:" in p.stderr and "not a unipic-jax model checkpoint" in p.stderr and "Traceback" not in p.stderr
