"""The main job end to end at toy length: configs/demo.py through train.run, resumed, evaluated."""

import json
from pathlib import Path

import pytest

from unipic_jax.train import run


def demo_config():
    c = run.load_config(Path(__file__).parents[2] / "configs" / "demo.py")
    c.stages.vae.steps, c.stages.gen32.steps, c.stages.gen48.steps = 2, 2, 2
    for s in c.stage_order:
        c.stages[s].batch_size.t2i = 2
    c.train.checkpoint_every, c.train.progress, c.train.sample_every = 2, False, 2
    c.eval.per_category, c.eval.num_iter = 1, 2
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
    stopped = run.run(c, str(tmp_path), max_steps=3)
    assert stopped["stopped"] and stopped["steps"] == 3
    summary = run.run(c, str(tmp_path))
    assert summary["steps"] == 6 and set(summary["t2i"]["categories"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert (tmp_path / "samples.png").exists() and (tmp_path / "model" / "config.json").exists()
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    # the periodic grid of the generation stages (none for the VAE stage), at their buckets
    from PIL import Image

    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["0000004_gen32.png", "0000006_gen48.png"], grids
    assert Image.open(tmp_path / "samples" / grids[1]).size[1] > Image.open(tmp_path / "samples" / grids[0]).size[1]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    text = run.format_summary(summary)
    assert "shapes benchmark" in text and "sample grid" in text and "objects per image" in text
