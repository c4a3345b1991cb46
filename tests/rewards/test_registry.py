"""The reward registry: built-in rewards by name, weighted sums, user callables by import path,
and clear errors for unknown names and bad outputs."""

import sys
import types

import numpy as np
import pytest
from PIL import Image, ImageDraw

from unipic_jax import rewards
from unipic_jax.data import shapes as W


@pytest.fixture(scope="module")
def batch():
    ex = [W.t2i_example(i, "validation", category="single_object") for i in range(6)]
    return [e["prompt"] for e in ex], ex


def test_builtin_rewards_score_ground_truth_high(batch):
    prompts, ex = batch
    images = [e["image"] for e in ex]
    meta = [e["metadata"] for e in ex]
    for name in ("shapes", "shapes_checks", "shapes_fit"):
        scores = rewards.check_scores(name, rewards.get(name)(prompts, images, meta), len(ex))
        assert scores.min() >= (0.8 if name == "shapes_fit" else 1.0), (name, scores)
        wrong = rewards.get(name)(prompts, [np.full_like(images[0], 255)] * len(ex), meta)
        assert np.max(wrong) == 0.0, (name, wrong)


def test_shape_fit_is_dense():
    """A square asked for as a circle: not correct, but a partial shape fit; a circle scores
    higher; a circle of another colour scores 0."""
    def canvas(draw):
        img = Image.new("RGB", (48, 48), W.BACKGROUND)
        draw(ImageDraw.Draw(img))
        return np.asarray(img)

    red = W.COLORS["red"]
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "exclude": []}
    square = canvas(lambda d: d.rectangle([14, 14, 34, 34], fill=red))
    circle = canvas(lambda d: d.ellipse([12, 12, 36, 36], fill=red))
    blue = canvas(lambda d: d.ellipse([12, 12, 36, 36], fill=W.COLORS["blue"]))
    fit = rewards.get("shapes_fit")([""] * 3, [square, circle, blue], [meta] * 3)
    correct = rewards.get("shapes")([""] * 3, [square, circle, blue], [meta] * 3)
    assert correct.tolist() == [0.0, 1.0, 0.0]
    assert 0.3 < fit[0] < fit[1] and fit[1] > 0.9 and fit[2] == 0.0, fit


def test_combined_weights_and_parts(batch):
    prompts, ex = batch
    images = np.stack([np.asarray(Image.fromarray(e["image"]).resize((32, 32))) for e in ex])
    meta = [e["metadata"] for e in ex]
    total, parts = rewards.combine({"shapes_checks": 1.0, "redness": 2.0})(prompts, images, meta)
    assert set(parts) == {"shapes_checks", "redness"} and total.dtype == np.float32
    np.testing.assert_allclose(total, parts["shapes_checks"] + 2 * parts["redness"], rtol=1e-6)


def test_user_callable_by_import_path(monkeypatch):
    mod = types.ModuleType("my_rewards")
    mod.brightness = lambda prompts, images, metadata: np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[1] = 255
    total, _ = rewards.combine({"my_rewards:brightness": 1.0})(["a", "b"], images, [{}, {}])
    assert total.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="cannot import 'nothing' from 'my_rewards'"):
        rewards.get("my_rewards:nothing")


def test_bad_rewards_are_named():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"unknown reward 'clip'; choose from \[.*'shapes'"):
        rewards.combine({"clip": 1.0})
    with pytest.raises(ValueError, match="no reward selected"):
        rewards.combine({})
    rewards.REGISTRY["_test_shape"] = lambda p, i, m: np.zeros((3, 1))
    rewards.REGISTRY["_test_nan"] = lambda p, i, m: np.array([0.0, np.nan, 1.0])
    try:
        with pytest.raises(ValueError, match=r"reward '_test_shape' returned shape \(3, 1\).*\(3,\)"):
            rewards.combine({"_test_shape": 1.0})(["a"] * 3, images, [{}] * 3)
        with pytest.raises(ValueError, match=r"reward '_test_nan' returned non-finite scores for images \[1\]"):
            rewards.combine({"_test_nan": 1.0})(["a"] * 3, images, [{}] * 3)
    finally:
        del rewards.REGISTRY["_test_shape"], rewards.REGISTRY["_test_nan"]
    with pytest.raises(ValueError, match="registered already"):
        rewards.register("shapes", lambda p, i, m: 0)
