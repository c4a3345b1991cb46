"""The Grain pipeline: deterministic, resolution buckets with static shapes, hosts agreeing on
buckets with disjoint rows, exact resume (iterator state and Orbax), worker processes,
TFDS and JSONL sources, bad rows counted and skipped."""

import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from unipic_jax import sharding
from unipic_jax import tokenizer as tok_lib
from unipic_jax.data import pipeline as P
from unipic_jax.data import shapes as W
from unipic_jax.data import sources as S

BUCKETS = ((32, 32), (32, 48), (48, 32))


def config(**kw):
    base = dict(buckets=BUCKETS, batch_size={"t2i": 4, "edit": 2, "understanding": 2},
                max_text_len={"t2i": 32, "edit": 160, "understanding": 96}, understanding_size=(32, 32),
                latent_stride=4, buffer_size=4, seed=0)
    return P.PipelineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    return tok_lib.load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def srcs():
    return {t: S.ShapesSource(t, length=60) for t in S.TASKS}


def make(srcs, tok, **kw):
    host = {k: kw.pop(k) for k in ("process_index", "process_count") if k in kw}
    return P.Pipeline(srcs, config(**kw), tok, **{"process_index": 0, "process_count": 1, **host})


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_are_deterministic_and_shaped_by_their_bucket(srcs, tok):
    p, q = make(srcs, tok), make(srcs, tok)
    seen = set()
    for step in range(12):
        a = p[step]
        assert same(a, q[step])
        H, W = BUCKETS[int(a["bucket"])]
        seen.add(int(a["bucket"]))
        assert a["t2i/pixels"].shape == (4, H, W, 3) and a["edit/source"].shape == (2, H, W, 3)
        assert a["understanding/pixels"].shape == (2, 32, 32, 3)
        assert a["t2i/input_ids"].shape == (4, 32) and a["edit/input_ids"].shape == (2, 160)
        assert a["t2i/pixels"].dtype == np.float32 and -1 <= a["t2i/pixels"].min() and a["t2i/pixels"].max() <= 1
        # the edit prompt holds one <image> per slot of this bucket's image
        slots = (H // 4) * (W // 4) + 4
        assert ((a["edit/input_ids"] == tok_lib.image_token_id(tok)).sum(1) == slots).all()
    assert seen == {0, 1, 2}
    assert not same(make(srcs, tok, seed=1)[0], p[0])


def test_bucket_assignment():
    assert P.nearest_bucket(64, 64, BUCKETS) == 0
    assert P.nearest_bucket(480, 640, BUCKETS) == 1 and P.nearest_bucket(640, 480, BUCKETS) == 2
    assert P.nearest_bucket(100, 1000, BUCKETS) == 1
    assert P.nearest_bucket(10, 10, ((256, 256), (512, 512))) == 1  # tie: the larger area


def test_hosts_agree_on_buckets_and_take_disjoint_rows(srcs, tok):
    one = make(srcs, tok)
    h0, h1 = make(srcs, tok, process_index=0, process_count=2), make(srcs, tok, process_index=1, process_count=2)
    for step in range(10):
        assert h0.bucket(step) == h1.bucket(step) == one.bucket(step)
        for t in S.TASKS:
            i0, i1 = h0.indices(t, step), h1.indices(t, step)
            assert len(i0) == len(i1) == one.cfg.batch_size[t] // 2
            assert not set(i0) & set(i1)
            np.testing.assert_array_equal(np.concatenate([i0, i1]), one.indices(t, step))
    a, b = h0[3], h1[3]
    assert a["t2i/pixels"].shape == b["t2i/pixels"].shape == (2, *BUCKETS[h0.bucket(3)], 3)
    with pytest.raises(ValueError, match="divisible"):
        make(srcs, tok, process_count=3)


def test_each_epoch_visits_every_example_of_a_bucket_once(srcs, tok):
    p = make(srcs, tok, batch_size={"t2i": 4})
    pool = p.pool["t2i"][0]
    per_epoch = len(pool) // 4
    steps = [s for s in range(600) if p.bucket(s) == 0][: 2 * per_epoch]
    for epoch in (steps[:per_epoch], steps[per_epoch:]):
        seen = np.concatenate([p.indices("t2i", s) for s in epoch])
        assert len(set(seen)) == len(seen) == 4 * per_epoch and set(seen) <= set(pool)
    for i in pool:  # every example sits in the bucket nearest its aspect
        assert P.nearest_bucket(*srcs["t2i"].size(int(i)), BUCKETS) == 0


def test_exact_resume_from_iterator_state_and_orbax(srcs, tok, tmp_path):
    p = make(srcs, tok)
    it = p.iterator()
    for _ in range(5):
        next(it)
    state = it.get_state()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    want = [next(it) for _ in range(3)]
    fresh = make(srcs, tok).iterator()
    fresh.set_state(state)
    assert all(same(a, next(fresh)) for a in want)
    restored = make(srcs, tok).iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert all(same(a, next(restored)) for a in want)
    assert int(want[0]["step"]) == 5


def test_worker_processes_give_the_same_batches(srcs, tok):
    p = make(srcs, tok, batch_size={"t2i": 2})
    it = p.iterator(num_workers=2)
    got = [next(it) for _ in range(4)]
    assert all(same(g, p[s]) for s, g in enumerate(got))


def test_caption_dropout_and_understanding_labels(srcs, tok):
    p = make(srcs, tok, caption_dropout=0.5, batch_size={"t2i": 4, "understanding": 2})
    uncond = tok(tok_lib.generation_prompt(None), add_special_tokens=False).input_ids
    dropped = 0
    for s in range(20):
        b = p[s]
        for ids, m in zip(b["t2i/input_ids"], b["t2i/attention_mask"], strict=True):
            dropped += list(ids[m]) == uncond
        lab = b["understanding/labels"]
        ans = [tok.decode([x for x in row if x >= 0]) for row in lab]
        assert all(a.endswith("<|im_end|>") and len(a.split()) == 1 for a in ans)
    assert 20 < dropped < 60  # about half of 80


def test_global_batch_is_sharded_over_the_batch_axes(srcs, tok):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b = P.global_batch(make(srcs, tok)[0], mesh)
    x = b["t2i/pixels"]
    assert isinstance(x, jax.Array) and x.shape[0] == 4
    assert x.sharding.spec[0] == ("data", "fsdp") and b["step"].shape == ()


def test_tfds_builder_round_trip(tmp_path, tok):
    n = {"train": 12, "validation": 4, "test": 4}
    folder = S.build_shapes_tfds(tmp_path, "edit", n)
    src = S.TfdsSource("edit", folder, split="train")
    ref = S.ShapesSource("edit", length=12)
    assert len(src) == 12
    for i in range(12):
        ex = src[i]
        k = int(src.ds[i]["index"])
        want = ref[k]
        np.testing.assert_array_equal(ex["image"], want["image"])
        np.testing.assert_array_equal(ex["source"], want["source"])
        assert ex["text"] == want["text"] and json.loads(ex["metadata"]) == json.loads(want["metadata"])
        assert src.size(i) == want["image"].shape[:2]
    with pytest.raises(ValueError, match="no features"):
        S.TfdsSource("understanding", folder)
    # it feeds the pipeline like any source
    p = P.Pipeline({"edit": src}, config(batch_size={"edit": 2}), tok, process_index=0, process_count=1)
    assert p[0]["edit/pixels"].shape[0] == 2


def test_jsonl_bad_rows_are_counted_and_skipped(tmp_path, tok, caplog):
    for i in range(3):
        Image.fromarray(W.t2i_example(i)["image"]).save(tmp_path / f"{i}.png")
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[:60])  # a valid header, truncated data
    rows = [json.dumps({"image": "0.png", "caption": "a"}), "{not json", json.dumps({"image": "1.png"}),
            json.dumps({"image": "missing.png", "caption": "c"}), json.dumps(["a list"]),
            json.dumps({"image": "broken.png", "caption": "b"}), json.dumps({"image": "2.png", "caption": "d"})]
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    src = S.JsonlSource("t2i", tmp_path / "m.jsonl")
    assert len(src) == 3 and src.skipped == 4
    assert "skipped 4 malformed row(s)" in caplog.text
    guarded = S.Guarded(src)
    ex = guarded[1]  # broken.png cannot be decoded: replaced by the next example, counted
    assert guarded.failures == 1 and ex["text"] == "d"
    p = P.Pipeline({"t2i": guarded}, config(batch_size={"t2i": 2}), tok, process_index=0, process_count=1)
    for s in range(6):
        assert p[s]["t2i/pixels"].shape[0] == 2
    assert guarded.failures >= 1
    (tmp_path / "empty.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="no usable"):
        S.JsonlSource("t2i", tmp_path / "empty.jsonl")
