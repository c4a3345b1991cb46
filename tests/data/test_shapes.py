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
            for p in sc.objects[k + 1:]:  # boxes apart (circumcircles apart unless the scene is crowded)
                assert max(abs(o.cx - p.cx), abs(o.cy - p.cy)) > o.r + p.r
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


DEMO_BUCKETS = ((32, 32), (48, 48), (48, 64), (64, 48))


def _scenes(size, n):
    """The scenes that the three tasks draw on a ``size`` canvas (sources and targets)."""
    for i in range(n):
        yield W.t2i_example(i, "train", sizes=(size,))["scene"]
        if i % 4 == 0:
            ex = W.edit_example(i, "train", sizes=(size,))
            yield ex["source_scene"]
            yield ex["target_scene"]
            yield W.qa_example(i, "train", sizes=(size,))["scene"]


@pytest.mark.parametrize("size", DEMO_BUCKETS)
def test_native_scenes_keep_every_object_whole_and_legible(size):
    """Over a thousand scenes per bucket: every object's box lies inside the canvas (a native
    canvas is never cropped) and its half-size is at least the legibility floor; on a subset,
    the rendered object covers about the floor's area (or more) in pixels of its own colour."""
    H, Wd = size
    floor = W.min_radius(H, Wd)
    assert floor == min(W.MIN_RADIUS, min(size) / 6)
    n_obj = 0
    for k, scene in enumerate(_scenes(size, 800)):
        assert (scene.height, scene.width) == size
        for o in scene.objects:
            n_obj += 1
            assert o.r >= floor - 1e-9, (size, o)
            assert 0 <= o.cx - o.r and o.cx + o.r <= Wd and 0 <= o.cy - o.r and o.cy + o.r <= H, (size, o)
        if k % 20 == 0:  # pixels: an object's box holds no other object (the placement keeps boxes apart)
            img = W.render(scene).astype(np.float32)
            for o in scene.objects:
                x0, x1 = int(np.floor(o.cx - o.r)), int(np.ceil(o.cx + o.r))
                y0, y1 = int(np.floor(o.cy - o.r)), int(np.ceil(o.cy + o.r))
                box = img[y0:y1, x0:x1]
                col, bg = np.asarray(W.COLORS[o.color], np.float32), np.asarray(W.BACKGROUND, np.float32)
                inside = np.linalg.norm(box - col, axis=-1) < np.linalg.norm(box - bg, axis=-1)
                # the least shape area is 2r² (triangle, diamond); antialiased rims of light colours count less
                assert inside.sum() >= 0.8 * 2 * floor**2, (size, o, int(inside.sum()))
    assert n_obj > 1500


def test_native_sources_draw_at_the_pipelines_own_sizes(qwen_tokenizer_dir):
    """A native shapes source is drawn at each stage's buckets (one per aspect ratio) and at
    the understanding size, so the pipeline's pixels are the rendered scene unchanged."""
    from unipic_jax import tokenizer as tok_lib
    from unipic_jax.data import pipeline as P
    from unipic_jax.data import sources as S

    tok = tok_lib.load_tokenizer(qwen_tokenizer_dir)
    srcs = {t: S.ShapesSource(t, length=64, native=True) for t in S.TASKS}
    buckets = ((32, 32), (32, 48), (48, 32), (48, 48))  # 32² has 48²'s aspect: ties go to the larger area
    cfg = P.PipelineConfig(buckets=buckets, batch_size={"t2i": 4, "edit": 2, "understanding": 2},
                           max_text_len={"t2i": 32, "edit": 256, "understanding": 96}, understanding_size=(32, 32),
                           latent_stride=4, buffer_size=4, seed=0)
    pipe = P.Pipeline(srcs, cfg, tok, process_index=0, process_count=1)
    assert pipe.sources["t2i"].source.sizes == ((32, 48), (48, 32), (48, 48))
    assert pipe.sources["understanding"].source.sizes == ((32, 32),)
    assert srcs["t2i"].sizes == W.SIZES  # the caller's source is unchanged
    for step in range(4):
        batch = pipe[step]
        H, Wd = buckets[int(batch["bucket"])]
        for task, key, field in (("t2i", "t2i/pixels", "image"), ("edit", "edit/source", "source"),
                                 ("understanding", "understanding/pixels", "image")):
            rows = [pipe.sources[task][int(i)][field] for i in pipe.indices(task, step)]
            assert all(r.shape[:2] == batch[key].shape[1:3] for r in rows)
            np.testing.assert_allclose(batch[key], np.stack(rows) / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        S.ShapesSource("t2i", sizes=((32,),))


def test_a_sources_size_is_the_size_it_draws():
    """``ShapesSource.size(i)`` (read without drawing, to assign buckets) is the size of
    example ``i``'s images, for every task, over canvases of three aspect ratios."""
    from unipic_jax.data import sources as S

    for task in S.TASKS:
        src = S.ShapesSource(task, length=60, sizes=((32, 32), (32, 48), (48, 32)))
        for i in range(60):
            ex = src[i]
            assert ex["image"].shape[:2] == src.size(i), (task, i)
            if task == "edit":
                assert ex["source"].shape == ex["image"].shape
