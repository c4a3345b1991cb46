"""The shapes scorer: ground truth scores >= 0.99, it degrades with blur / downscaling, it
rejects wrong images and shapes that are none of the world's, and gives partial credit as a
reward."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from unipic_jax.data import shapes as W
from unipic_jax.rewards import shapes as R

N = 90  # 15 per category


@pytest.fixture(scope="module")
def examples():
    return [W.t2i_example(i, "validation", category=W.CATEGORIES[i % 6]) for i in range(N)]


def accuracy(examples, perturb=lambda x: x):
    return R.evaluate([perturb(e["image"]) for e in examples], [e["metadata"] for e in examples])


def test_ground_truth_scores_at_least_099(examples):
    res = accuracy(examples)
    assert res["overall"] >= 0.99 and res["n"] == N and set(res["categories"]) == set(W.CATEGORIES), res
    assert abs(res["objects"] - res["prompted_objects"]) < 0.05 and res["prompted_objects"] > 1.2, res
    edits = [W.edit_example(i, "validation") for i in range(40)]
    assert np.mean([R.score(e["target"], e["metadata"])["correct"] for e in edits]) >= 0.95
    # the source is not the edited image
    assert np.mean([R.score(e["source"], e["metadata"])["correct"] for e in edits]) <= 0.1


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (48, 64), (64, 48)])
def test_ground_truth_is_read_back_at_every_demo_bucket(size):
    """Clean renders drawn natively at each of the demo's bucket sizes: text-to-image scenes
    of every category and edit targets are graded correct (the accuracies are printed)."""
    t2i = [W.t2i_example(i, "validation", category=W.CATEGORIES[i % 6], sizes=(size,)) for i in range(120)]
    res = accuracy(t2i)
    edits = [W.edit_example(i, "validation", sizes=(size,)) for i in range(48)]
    edit_acc = float(np.mean([R.score(e["target"], e["metadata"])["correct"] for e in edits]))
    print(f"scorer on clean {size[0]}x{size[1]} renders: t2i {res['overall']:.3f} {res['categories']}, "
          f"edit targets {edit_acc:.3f}")
    assert res["overall"] >= 0.97 and min(res["categories"].values()) >= 0.9, (size, res)
    assert edit_acc >= 0.9, (size, edit_acc)


def test_detections_recover_the_scene():
    for i in range(20):
        ex = W.t2i_example(i, "test")
        dets = R.detect(ex["image"])
        want = sorted((o.shape, o.color) for o in ex["scene"].objects)
        assert sorted((d.shape, d.color) for d in dets) == want
        for o in ex["scene"].objects:
            d = min(dets, key=lambda d: np.hypot(d.cx - o.cx, d.cy - o.cy))
            assert abs(d.cx - o.cx) < 1.5 and abs(d.cy - o.cy) < 1.5 + o.r / 3  # triangles: centroid is lower


def blur(s):
    return lambda x: np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(s)))


def test_degrades_sensibly(examples):
    rs = np.random.RandomState(0)
    noisy = accuracy(examples, lambda x: np.clip(x + rs.randn(*x.shape) * 25, 0, 255).astype(np.uint8))
    b1, b2 = accuracy(examples, blur(1))["overall"], accuracy(examples, blur(2))["overall"]
    half = accuracy(examples, lambda x: np.asarray(Image.fromarray(x).resize((x.shape[1] // 2, x.shape[0] // 2),
                                                                             Image.BILINEAR)))["overall"]
    assert noisy["overall"] >= 0.95 and b1 >= 0.85 and half >= 0.7, (noisy, b1, half)
    assert b2 < b1  # heavier blur, lower score
    blank = np.full((64, 64, 3), 255, np.uint8)
    res = accuracy([{"image": blank, "metadata": e["metadata"]} for e in examples])
    assert res["overall"] == 0.0 and res["objects"] == 0.0


def test_wrong_images_fail_and_rewards_give_partial_credit(examples):
    wrong = [{"image": examples[(i + 1) % N]["image"], "metadata": e["metadata"]} for i, e in enumerate(examples)]
    assert accuracy(wrong)["overall"] < 0.4
    two = next(e for e in examples if e["metadata"]["tag"] == "two_object")
    s = two["scene"]
    one = W.render(W.Scene(s.height, s.width, s.objects[:1]))
    r = R.reward([two["prompt"]] * 2, [two["image"], one], [two["metadata"]] * 2)
    assert r.dtype == np.float32 and r[0] == 1.0 and r[1] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        R.evaluate([two["image"]], [])


def test_shapes_outside_the_world_are_unrecognised():
    """An object of a palette colour that no world shape fits (IoU < MIN_IOU) is detected, with
    its colour, but as no shape, so it cannot pass for the prompted one."""
    red = W.COLORS["red"]

    def canvas(draw):
        img = Image.new("RGB", (48, 48), W.BACKGROUND)
        draw(ImageDraw.Draw(img))
        return np.asarray(img)

    radii = [14 if k % 2 == 0 else 6 for k in range(10)]
    star = [(24 + r * np.cos(k * np.pi / 5), 24 + r * np.sin(k * np.pi / 5)) for k, r in enumerate(radii)]
    odd = {
        "L": canvas(lambda d: d.polygon([(12, 12), (20, 12), (20, 28), (36, 28), (36, 36), (12, 36)], fill=red)),
        "crescent": canvas(lambda d: (d.ellipse([12, 12, 36, 36], fill=red),
                                      d.ellipse([20, 8, 44, 32], fill=W.BACKGROUND))),
        "star": canvas(lambda d: d.polygon(star, fill=red)),
    }
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "exclude": []}
    for name, image in odd.items():
        (det,) = R.detect(image)
        assert (det.shape, det.color) == (R.UNRECOGNISED, "red") and det.iou < R.MIN_IOU, (name, det)
        assert not R.score(image, meta)["correct"], name
    circle = canvas(lambda d: d.ellipse([12, 12, 36, 36], fill=red))
    (det,) = R.detect(circle)
    assert det.shape == "circle" and det.iou > 0.9 and R.score(circle, meta)["correct"], det
