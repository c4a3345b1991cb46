"""The Grain pipeline: deterministic, resolution buckets with static shapes, hosts agreeing on
buckets with disjoint rows that make up the one-host batch, sizes read lazily, exact resume
(iterator state and Orbax), worker processes, per-step truncation counts, TFDS and JSONL
sources, bad rows counted and skipped."""

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
    pool = p.bucket_examples("t2i", 0)
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


def test_worker_processes_give_the_same_batches_and_counts(srcs, tok):
    p = make(srcs, tok, batch_size={"t2i": 2}, max_text_len={"t2i": 18})
    it = p.iterator(num_workers=2)
    got = [next(it) for _ in range(4)]
    made_here = p.truncated_before(4)  # recorded as the workers' batches arrive
    ref = make(srcs, tok, batch_size={"t2i": 2}, max_text_len={"t2i": 18})
    assert all(same(g, ref[s]) for s, g in enumerate(got))
    assert made_here == ref.truncated_before(4) > 0


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


# -- multi-host, lazy sizes, truncation counts -------------------------------------------------

ASPECTS = ((8, 8), (8, 12), (12, 8))  # nearest buckets 0, 1, 2 of BUCKETS


class Fake:
    """``n`` examples; example ``i`` is ``ASPECTS[i % 3]`` (its bucket is ``i % 3``), filled with
    ``i % 256``, its text 20 words long when ``long(i)`` (else two words); counts ``size`` calls."""

    def __init__(self, n, task="t2i", long=lambda i: False):
        self.n, self.task, self.long, self.calls = n, task, long, 0

    def __len__(self):
        return self.n

    def size(self, i):
        self.calls += 1
        return ASPECTS[i % 3]

    def __getitem__(self, i):
        img = np.full((*ASPECTS[i % 3], 3), i % 256, np.uint8)
        text = " ".join(["word"] * 20) if self.long(i) else "a cat"
        ex = {"image": img, "text": text, "metadata": ""}
        if self.task == "edit":
            ex["source"] = img
        if self.task == "understanding":
            ex["answer"] = "red"
        return ex


class FakeWithMetadata(Fake):
    def all_sizes(self):
        return np.asarray(ASPECTS)[np.arange(self.n) % 3]


def test_construction_reads_a_bounded_number_of_sizes(tok):
    srcs = {"t2i": Fake(10**6), "edit": Fake(10**6, "edit"), "understanding": Fake(10**6, "understanding")}
    p = P.Pipeline(srcs, config(), tok, process_index=0, process_count=1)
    probe = p.cfg.bucket_probe
    assert srcs["t2i"].calls == srcs["edit"].calls == probe <= 4096 and srcs["understanding"].calls == 0
    np.testing.assert_allclose(p.bucket_probs, 1 / 3, atol=0.03)  # estimated from the probe
    for step in range(8):
        b = p[step]
        for t in ("t2i", "edit"):
            idx = p.indices(t, step)
            assert len(set(idx)) == len(idx) and (idx % 3 == int(b["bucket"])).all()
            np.testing.assert_allclose(b[f"{t}/pixels"][:, 0, 0, 0], (idx % 256) / 127.5 - 1, atol=1e-6)
    assert srcs["t2i"].calls == probe  # the first batches of each bucket lie in the probe
    meta = {"t2i": FakeWithMetadata(10**6)}
    q = P.Pipeline(meta, config(batch_size={"t2i": 4}), tok, process_index=0, process_count=1)
    assert meta["t2i"].calls == 0 and q.bucket(0) in (0, 1, 2)
    with pytest.raises(ValueError, match="shape"):
        bad = FakeWithMetadata(5)
        bad.all_sizes = lambda: np.ones((4, 2))
        P.Pipeline({"t2i": bad}, config(batch_size={"t2i": 1}), tok, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not positive"):
        P.assign_buckets([(8, 8), (0, 8)], BUCKETS)


def test_lazy_sizes_change_no_batch(tok):
    """A tiny probe (sizes read as steps need them), a whole probe and sizes from metadata give
    the same examples for every (bucket, k), in any order of requests (a resume)."""
    lazy = P.Pipeline({"t2i": Fake(61)}, config(batch_size={"t2i": 4}, bucket_probe=5), tok, process_index=0,
                      process_count=1)
    whole = P.Pipeline({"t2i": Fake(61)}, config(batch_size={"t2i": 4}), tok, process_index=0, process_count=1)
    meta = P.Pipeline({"t2i": FakeWithMetadata(61)}, config(batch_size={"t2i": 4}), tok, process_index=0,
                      process_count=1)
    assert lazy._scanned["t2i"] == 5 and whole._scanned["t2i"] == 61
    for k in [17, 0, 3, 9, 4, 30]:  # past an epoch (5 batches of a bucket) first
        for b in range(3):
            rows = lazy._bucket_rows("t2i", b, k)
            np.testing.assert_array_equal(rows, whole._bucket_rows("t2i", b, k))
            np.testing.assert_array_equal(rows, meta._bucket_rows("t2i", b, k))
    np.testing.assert_array_equal(whole.bucket_probs, meta.bucket_probs)
    fresh = P.Pipeline({"t2i": Fake(61)}, whole.cfg, tok, process_index=0, process_count=1)
    late = [fresh.indices("t2i", s) for s in range(40, 0, -1)]
    np.testing.assert_array_equal(np.stack(late), np.stack([whole.indices("t2i", s) for s in range(40, 0, -1)]))


def test_two_hosts_make_exactly_the_one_host_batch(srcs, tok):
    kw = dict(caption_dropout=0.5, bucket_probe=8)  # a small probe: sizes are read lazily too
    one = make(srcs, tok, **kw)
    hosts = [make(srcs, tok, process_index=i, process_count=2, **kw) for i in range(2)]
    uncond = tok(tok_lib.generation_prompt(None), add_special_tokens=False).input_ids
    dropped = 0
    for step in range(8):
        want, got = one[step], [h[step] for h in hosts]
        assert want.keys() == got[0].keys() == got[1].keys()
        for k, v in want.items():
            if v.ndim:
                np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), v, err_msg=f"{k} at step {step}")
            else:
                assert got[0][k] == got[1][k] == v
        np.testing.assert_array_equal(np.concatenate([h.caption_dropped(step) for h in hosts]),
                                      one.caption_dropped(step))
        dropped += sum(list(ids[m]) == uncond for ids, m in zip(want["t2i/input_ids"], want["t2i/attention_mask"],
                                                                 strict=True))
    assert 0 < dropped < 32  # rows of both kinds were compared


def test_two_hosts_read_each_example_of_a_bucket_once_per_epoch(tok):
    src = Fake(48)  # 16 examples per bucket: 4 whole batches of 4 per epoch
    hosts = [P.Pipeline({"t2i": src}, config(batch_size={"t2i": 4}), tok, process_index=i, process_count=2)
             for i in range(2)]
    for b in range(3):
        steps = [s for s in range(400) if hosts[0].bucket(s) == b][:8]
        assert len(steps) == 8 and all(hosts[1].bucket(s) == b for s in steps)
        for epoch in (steps[:4], steps[4:]):
            rows = [[h.indices("t2i", s) for s in epoch] for h in hosts]
            for r0, r1 in zip(*rows, strict=True):
                assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)
            seen = np.concatenate([np.concatenate(r) for r in rows])
            assert sorted(seen) == list(range(b, 48, 3))  # every example of the bucket, once


def test_truncation_is_counted_per_step_and_summed_over_hosts(tok):
    src = Fake(60, long=lambda i: i % 2 == 0)
    kw = dict(batch_size={"t2i": 4}, max_text_len={"t2i": 20}, caption_dropout=0.0)
    one = P.Pipeline({"t2i": src}, config(**kw), tok, process_index=0, process_count=1)
    hosts = [P.Pipeline({"t2i": src}, config(**kw), tok, process_index=i, process_count=2) for i in range(2)]
    want = [int((one.indices("t2i", s) % 2 == 0).sum()) for s in range(6)]
    assert sum(want) > 0
    one[0], one[0]  # made twice (prefetch, a retry): counted once
    assert one.truncated == want[0]
    it = one.iterator(read_threads=2)
    for _ in range(3):
        next(it)  # the iterator makes batches ahead
    assert one.truncated_before(3) == P.global_truncated(one, 3) == sum(want[:3])
    assert one.truncated >= sum(want[:3])
    for s in range(6):
        for h in hosts:
            h[s]
    assert [h.truncated_before(6) for h in hosts] == [
        sum(int((h.indices("t2i", s) % 2 == 0).sum()) for s in range(6)) for h in hosts]
    assert sum(h.truncated_before(6) for h in hosts) == sum(want)
