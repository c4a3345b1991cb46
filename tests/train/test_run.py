"""The main job end to end at toy length: configs/demo.py through train.run, resumed, evaluated."""

import json
from pathlib import Path

import pytest

from unipic_jax.eval import shapes as shapes_eval
from unipic_jax.train import run


def demo_config():
    c = run.load_config(Path(__file__).parents[2] / "configs" / "demo.py")
    c.stages.vae.steps = c.stages.gen32.steps = c.stages.gen48.steps = c.stages.dec.steps = 2
    for s in c.stage_order:
        for task in c.stages[s].batch_size:
            c.stages[s].batch_size[task] = min(c.stages[s].batch_size[task], 2)
    c.train.checkpoint_every, c.train.progress, c.train.sample_every = 2, False, 2
    c.eval.per_category, c.eval.num_iter, c.eval.edit_per_kind, c.eval.qa = 1, 2, 1, 2
    c.train.sample_prompts = ("a photo of a red circle", "a photo of two squares")
    c.model.overrides.diffloss.sampling_steps = "10"  # toy length: sampling cost, not quality
    c.data.length = 64
    return c


def test_load_config_reads_a_config_file_and_names_a_missing_one(tmp_path):
    full = run.load_config(Path(__file__).parents[2] / "configs" / "unipic_1p5b.py", "sft")
    assert tuple(full.stage_order) == ("sft",)
    with pytest.raises(FileNotFoundError, match="No config file .*nope.py"):
        run.load_config(tmp_path / "nope.py")


def test_demo_config_trains_resumes_and_reports(tmp_path):
    c = demo_config()
    c.train.log_every = 1
    stopped = run.run(c, str(tmp_path), max_steps=3)
    assert stopped["stopped"] and stopped["steps"] == 3
    with open(tmp_path / "metrics.jsonl", "a") as f:  # as if step 4 was logged before a kill
        f.write(json.dumps({"stage": "gen32", "step": 4, "loss": -1.0}) + "\n")
    summary = run.run(c, str(tmp_path))
    assert summary["steps"] == 8 and set(summary["t2i"]["categories"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert (tmp_path / "eval" / "t2i.png").exists() and (tmp_path / "model" / "config.json").exists()
    # the model folder says its step and the sampling settings eval.py takes from it
    assert json.loads((tmp_path / "model" / "step.json").read_text()) == {"step": 8}
    saved = json.loads((tmp_path / "model" / "eval.json").read_text())
    assert saved["cfg"] == c.eval.cfg and saved["num_iter"] == 2 and saved["per_category"] == 1
    # metrics.jsonl: every update once, in order, though steps after the stop's checkpoint ran twice
    from unipic_jax.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert {r["stage"] for r in read_metrics(tmp_path)} == {"vae", "gen32", "gen48", "dec"}
    assert all(r["loss"] > 0 for r in read_metrics(tmp_path))
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    # the periodic grid of the generation stages (none for the VAE and decoder stages), at their buckets
    from PIL import Image

    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["0000004_gen32.png", "0000006_gen48.png"], grids
    # labelled tiles are the bucket upscaled by an integer factor: 32² -> 160, 48² -> 144 pixels wide
    assert Image.open(tmp_path / "samples" / grids[0]).size[0] != Image.open(tmp_path / "samples" / grids[1]).size[0]
    assert summary["edit"]["n"] == 4 and summary["understanding"]["n"] == 2  # all three tasks evaluated
    assert all({"t2i", "edit", "understanding"} <= set(r) for r in read_metrics(tmp_path) if r["stage"].startswith("gen"))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8
    text = shapes_eval.format_summary(summary)
    assert "shapes benchmark" in text and "sample grid" in text and "objects per image" in text


def test_the_model_folder_follows_a_run_that_is_extended(tmp_path):
    """A finished run extended by one more update replaces WORKDIR/model with the newer model."""
    c = demo_config()
    c.eval.per_category = 0
    c.stage_order = ("vae",)
    run.run(c, str(tmp_path))
    first = (tmp_path / "model" / "params").stat().st_mtime_ns
    assert json.loads((tmp_path / "model" / "step.json").read_text()) == {"step": 2}
    run.run(c, str(tmp_path))  # nothing to train: the model folder is left as it is
    assert (tmp_path / "model" / "params").stat().st_mtime_ns == first
    c.stages.vae.steps = 3
    run.run(c, str(tmp_path))
    assert json.loads((tmp_path / "model" / "step.json").read_text()) == {"step": 3}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")]  # no leftovers
