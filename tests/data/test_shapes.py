"""The shapes world: deterministic scenes, every category, edit and question kind, any canvas."""

import numpy as np
import pytest

from unipic_jax.data import shapes as W


def test_examples_are_deterministic_and_splits_differ():
    a, b = W.t2i_example(7, "train", seed=3), W.t2i_example(7, "train", seed=3)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["prompt"] == b["prompt"] and a["metadata"] == b["metadata"]
    c = W.t2i_example(7, "validation", seed=3)
    assert c["scene"] != a["scene"]
    e1, e2 = W.edit_example(5, "test"), W.edit_example(5, "test")
    np.testing.assert_array_equal(e1["target"], e2["target"])
    q1, q2 = W.qa_example(4), W.qa_example(4)
    assert (q1["question"], q1["answer"], q1["scene"]) == (q2["question"], q2["answer"], q2["scene"])
    with pytest.raises(ValueError, match="Unknown split"):
        W.t2i_example(0, "dev")


@pytest.mark.parametrize("category", W.CATEGORIES)
def test_each_category_uses_genevals_wording(category):
    for i in range(6):
        ex = W.t2i_example(i, category=category)
        p, meta, objs = ex["prompt"], ex["metadata"], ex["scene"].objects
        assert p.startswith("a photo of ") and meta["tag"] == category and meta["prompt"] == p
        assert ex["image"].dtype == np.uint8 and ex["image"].shape[:2] in W.SIZES
        if category == "counting":
            n = meta["include"][0]["count"]
            assert len(objs) == n and meta["exclude"] == [{"class": meta["include"][0]["class"], "count": n + 1}]
            assert W.NUMBERS[n] in p
        if category == "position":
            rel, ref = meta["include"][1]["position"]
            assert ref == 0 and rel in p and rel in W.relation(objs[1], objs[0])
        if category in ("colors", "color_attr"):
            assert all(r["color"] in p for r in meta["include"])


def test_objects_do_not_overlap_and_fit_any_canvas():
    for i in range(40):
        ex = W.t2i_example(i, sizes=((40, 72), (72, 40), (32, 32)))
        sc = ex["scene"]
        assert ex["image"].shape == (sc.height, sc.width, 3)
        for k, o in enumerate(sc.objects):
            assert o.r <= o.cx <= sc.width - o.r and o.r <= o.cy <= sc.height - o.r
            for p in sc.objects[k + 1:]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) > (o.r + p.r) * np.sqrt(2)
    # white background, flat colours from the palette
    img = W.render(W.Scene(20, 30, (W.Obj("square", "red", 15, 10, 6),)))
    assert tuple(img[0, 0]) == W.BACKGROUND and tuple(img[10, 15]) == W.COLORS["red"]


@pytest.mark.parametrize("kind", W.EDITS)
def test_edits_change_what_they_say(kind):
    for i in range(5):
        ex = W.edit_example(i, kind=kind)
        src, tgt = ex["source_scene"].objects, ex["target_scene"].objects
        assert ex["kind"] == kind and ex["source"].shape == ex["target"].shape
        assert not np.array_equal(ex["source"], ex["target"])
        if kind == "add":
            assert len(tgt) == len(src) + 1
        elif kind == "remove":
            assert len(tgt) == len(src) - 1
            assert any(e == {"class": o.shape, "count": 1, "color": o.color} for e in ex["metadata"]["exclude"]
                       for o in src if o not in tgt)
        else:
            assert len(tgt) == len(src)
        if kind == "move":
            assert any("region" in r for r in ex["metadata"]["include"])


def test_questions_have_one_word_answers_that_match_the_scene():
    kinds = set()
    for i in range(60):
        ex = W.qa_example(i)
        q, a, objs = ex["question"], ex["answer"], ex["scene"].objects
        assert a and " " not in a and a == a.lower()
        if q.startswith("What color is the"):
            kinds.add("color")
            assert a == next(o.color for o in objs if o.shape in q)
        elif q.startswith("How many"):
            kinds.add("count")
            shape = next(s for s in W.SHAPES if W.plural(s) in q)
            assert a == W.NUMBERS[sum(o.shape == shape for o in objs)]
        elif q.startswith("What shape"):
            kinds.add("shape")
            assert a in W.SHAPES
        else:
            kinds.add("where")
            assert a in ("left", "right", "above", "below")
    assert kinds == {"color", "count", "shape", "where"}


def test_genevals_position_rule():
    box = (10, 10, 20, 20)
    assert W.relation_from_boxes((40, 10, 50, 20), box) == {"right of"}
    assert W.relation_from_boxes((10, 40, 20, 50), box) == {"below"}
    assert W.relation_from_boxes((0, 0, 8, 8), (30, 30, 38, 38)) == {"left of", "above"}
    assert W.relation_from_boxes((11, 10, 21, 20), box) == set()  # within the threshold


def test_shapes_tokenizer_covers_the_world(tmp_path):
    from unipic_jax import tokenizer as tok_lib
    from unipic_jax.data import shapes_tokenizer

    shapes_tokenizer.build(tmp_path)
    tok = tok_lib.load_tokenizer(tmp_path)
    unk = tok.convert_tokens_to_ids(shapes_tokenizer.UNK)
    texts = [tok_lib.generation_prompt(W.t2i_example(i, "test")["prompt"]) for i in range(40)]
    texts += [tok_lib.edit_prompt(W.edit_example(i, "test")["instruction"]) for i in range(40)]
    texts += [tok_lib.understanding_prompt(W.qa_example(i, "test")["question"]) for i in range(40)]
    for t in texts:
        ids = tok(t, add_special_tokens=False).input_ids
        assert unk not in ids, t
    ids = tok(tok_lib.edit_prompt("Remove the red circle."), add_special_tokens=False).input_ids
    assert ids.count(tok_lib.image_token_id(tok)) == 1 and len(tok) < 100
    assert tok.decode(tok("red circle", add_special_tokens=False).input_ids) == "red circle"
