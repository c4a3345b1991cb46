"""Training: a few steps of each stage kind, frozen parts unchanged, loss decreasing on a fixed
batch, exact resume after an interruption, corrupt checkpoints skipped, non-finite loss named."""

import logging
import shutil

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from unipic_jax import sharding
from unipic_jax.data import shapes_tokenizer
from unipic_jax.data import sources as S
from unipic_jax.models import unipic as U
from unipic_jax.train import optim, run
from unipic_jax.train.stages import Stage
from unipic_jax.train.step import init_state, make_train_step
from unipic_jax.train.trainer import NonFiniteLoss, Trainer

SIZE = ((16, 16),)


def stage_cfg(kind, steps, trainable=("",), **kw):
    base = dict(kind=kind, steps=steps, lr=3e-3, buckets=SIZE, batch_size=dict(t2i=2, edit=2, understanding=2),
                trainable=trainable, max_text_len=dict(t2i=20, edit=40, understanding=40), understanding_size=(16, 16),
                loss_weights=dict(t2i=1.0, edit=0.5, understanding=0.1), caption_dropout=0.1)
    base.update(kw)
    return ml_collections.ConfigDict(base)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return shapes_tokenizer.build(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def mcfg(tok):
    cfg = ml_collections.ConfigDict(dict(tokenizer="shapes",
                                         model=dict(preset="tiny", overrides=dict(mar=dict(grid=4)))))
    return run.model_config(cfg, tok)


def sources():
    return {t: S.ShapesSource(t, length=64, sizes=SIZE) for t in S.TASKS}


def stages(mcfg, vae_steps=2, gen_steps=3, **kw):
    return [Stage.from_config("vae", stage_cfg("vae", vae_steps, ("vae",), batch_size=dict(t2i=2)), mcfg, 0),
            Stage.from_config("gen", stage_cfg("unipic", gen_steps, ("mar", "diffloss", "llm", "proj_in", "proj_out"),
                                               ema=0.9, **kw), mcfg, 0)]


def params_of(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def trainer(model, mcfg, tok, workdir, **kw):
    return Trainer(model, stages(mcfg, **kw.pop("stage_kw", {})), sources(), tok, workdir, log_every=1,
                   checkpoint_every=2, keep=3, progress=False, tensorboard=kw.pop("tensorboard", False), **kw)


@pytest.fixture(scope="module")
def full_run(mcfg, tok, tmp_path_factory):
    """The uninterrupted two-stage run on one device: (params before, result, model, workdir)."""
    workdir = tmp_path_factory.mktemp("full")
    model = U.UniPic(mcfg, rngs=nnx.Rngs(0))
    before = {name: [np.array(x) for x in params_of(getattr(model, name))]
              for name in ("vae", "mar", "llm", "diffloss")}
    res = trainer(model, mcfg, tok, workdir, tensorboard=True).run()
    return before, res, model, workdir


def test_stages_run_and_frozen_parts_do_not_move(full_run, mcfg, tok, tmp_path, caplog):
    before, res, model, workdir = full_run
    assert res.steps == 5 and not res.stopped
    assert {"loss", "t2i", "edit", "understanding", "grad_norm"} <= set(res.last_metrics)
    assert all(np.isfinite(v) for v in res.last_metrics.values())
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5]
    for name in ("vae", "mar", "llm", "diffloss"):
        a, b = before[name], params_of(getattr(model, name))
        moved = any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert moved, name  # the VAE moved in its stage, the rest in the generation stage
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    # a generation-only stage leaves the VAE bit-identical. As the demo starts (a new model on a
    # one-device mesh), its step compiles once: the state's scalars (the step, Adam's counts) start
    # on the mesh too, or the second step sees new input types and compiles again (20 s a stage)
    model2 = sharding.create_sharded(lambda: U.UniPic(mcfg, rngs=nnx.Rngs(0)),
                                     sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:1]))
    vae_before = [np.array(x) for x in params_of(model2.vae)]
    with caplog.at_level(logging.WARNING, logger="jax._src.interpreters.pxla"), jax.log_compiles():
        Trainer(model2, stages(mcfg)[1:], sources(), tok, tmp_path / "b", log_every=1, checkpoint_every=10,
                progress=False, tensorboard=False).run()
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1, [r.getMessage()[:300] for r in compiles]
    for x, y in zip(vae_before, params_of(model2.vae), strict=True):
        np.testing.assert_array_equal(x, y)


def test_exact_resume_after_an_interruption_skipping_a_corrupt_checkpoint(full_run, mcfg, tok, tmp_path, caplog,
                                                                          monkeypatch):
    full = full_run[2]
    part = U.UniPic(mcfg, rngs=nnx.Rngs(0))
    with monkeypatch.context() as m:  # checkpoints as older versions wrote them: the state as NNX Variables
        m.setattr(sharding, "pure", lambda s: s)
        r = trainer(part, mcfg, tok, tmp_path / "part").run(max_steps=4)  # "killed" inside the second stage
    assert r.stopped and r.steps == 4
    ckpts = tmp_path / "part" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())[-1] == 4
    shutil.rmtree(ckpts / "4" / "meta")  # damage the newest: the run resumes from step 2
    resumed = U.UniPic(mcfg, rngs=nnx.Rngs(0))  # a fresh process: fresh initial weights, same command
    r2 = trainer(resumed, mcfg, tok, tmp_path / "part").run()
    assert r2.steps == 5 and "unreadable" in caplog.text and "as NNX Variables" in caplog.text
    for x, y in zip(params_of(full), params_of(resumed), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_the_same_command_resumes_exactly(full_run, mcfg, tok, tmp_path):
    """SIGTERM (a pre-empted pod) mid-stage: the step in flight finishes, a checkpoint is written,
    the run reports itself stopped; restarting ends bit-identical to the uninterrupted run. The
    periodic sample hook sees the model being trained and its grids land under samples/."""
    import os
    import signal

    seen = []

    def sample_fn(model, stage, step):
        seen.append((stage.name, step, type(model).__name__))
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return np.full((4, 6, 3), step, np.uint8)

    handler = signal.getsignal(signal.SIGTERM)
    part = U.UniPic(mcfg, rngs=nnx.Rngs(0))
    r = trainer(part, mcfg, tok, tmp_path, sample_every=1, sample_fn=sample_fn).run()
    assert r.stopped and r.steps == 3 and seen == [("vae", 1, "UniPic"), ("vae", 2, "UniPic"), ("gen", 3, "UniPic")]
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    assert 3 in [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "0000001_vae.png", "0000002_vae.png", "0000003_gen.png"]
    resumed = U.UniPic(mcfg, rngs=nnx.Rngs(0))
    assert trainer(resumed, mcfg, tok, tmp_path).run().steps == 5
    for x, y in zip(params_of(full_run[2]), params_of(resumed), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_checkpoint_restores_onto_a_different_mesh(full_run, mcfg, tok, tmp_path, caplog):
    """The one-device run's step-2 checkpoint resumes on a data × fsdp × tensor mesh, and the three
    sharded steps share one compiled program: the new state keeps the old state's layout (once,
    XLA laid the outputs out its own way and every step compiled again, 30-50 s each)."""
    import logging

    from unipic_jax import sharding

    shutil.copytree(full_run[3] / "checkpoints", tmp_path / "checkpoints")
    for p in (tmp_path / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 2:
            shutil.rmtree(p)  # our copy: as if the run had stopped after the VAE stage
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b = sharding.create_sharded(lambda: U.UniPic(mcfg, rngs=nnx.Rngs(0)), mesh)
    with caplog.at_level(logging.WARNING, logger="jax._src.interpreters.pxla"), jax.log_compiles():
        assert trainer(b, mcfg, tok, tmp_path).run().steps == 5
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1, [r.getMessage()[:200] for r in compiles]
    assert sharding.mesh_of(b) is mesh
    # equal to the one-device run up to float reassociation (Adam turns ~1e-7 gradient noise
    # on near-zero gradients into steps of up to lr; a lost optimizer state would differ by far more)
    for x, y in zip(params_of(full_run[2]), params_of(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)


def test_loss_decreases_on_a_fixed_batch(mcfg, tok):
    model = U.UniPic(mcfg, rngs=nnx.Rngs(1))
    st = stages(mcfg)[1]
    from unipic_jax.data import pipeline as P

    batch = {k: v for k, v in P.Pipeline(sources(), st.data, tok, process_index=0, process_count=1)[0].items()
             if k not in ("step", "bucket")}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optim.make_optimizer(params, lr=3e-3, steps=40, trainable=st.trainable)
    step = make_train_step(graphdef, rest, st, tx, seed=0)
    state = init_state(params, tx, st, 0)
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_non_finite_loss_is_named(mcfg, tok, tmp_path):
    model = U.UniPic(mcfg, rngs=nnx.Rngs(0))
    t = trainer(model, mcfg, tok, tmp_path, stage_kw=dict(lr=1e30, clip=0.0))
    t.stages = t.stages[1:]
    with pytest.raises(NonFiniteLoss, match=r"global step \d+: non-finite"):
        t.run()
    assert not (tmp_path / "checkpoints" / "3").exists()


def test_optimizer_masks():
    params = {"diffloss": {"w": np.ones((2, 2)), "b": np.ones(2)}, "mar": {"w": np.ones((2, 2)), "b": np.ones(2)}}
    dm = optim.decay_mask(params)
    assert dm["mar"]["w"] and not dm["mar"]["b"] and not dm["diffloss"]["w"]
    labels = optim.trainable_labels(params, ("mar",))
    assert labels["mar"]["w"] == "train" and labels["diffloss"]["w"] == "freeze"
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.make_optimizer(params, lr=1.0, steps=1, trainable=("vae",))
    s = optim.schedule(1.0, 100, warmup=0.1, kind="cosine")
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0) and float(s(100)) == pytest.approx(0.0, abs=1e-6)
    acc = optim.make_optimizer(params, lr=0.1, steps=10, accumulate=2)
    assert isinstance(acc, optax.GradientTransformation)
    grads = jax.tree.map(np.ones_like, params)
    st = acc.init(params)
    u1, st = acc.update(grads, st, params)
    u2, st = acc.update(grads, st, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u1))  # accumulating
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(u2))  # applied on the second micro-step



def test_accumulation_counts_updates_and_ema_moves_only_when_one_is_applied(mcfg, tok):
    """``steps`` counts updates: with ``accumulate=2`` the schedule advances once per two
    micro-batches, and parameters and EMA change only on the second."""
    from unipic_jax.data import pipeline as P

    st = stages(mcfg, gen_steps=3, accumulate=2, schedule="cosine")[1]
    model = U.UniPic(mcfg, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = sharding.pure(params)
    tx = st.optimizer(params)
    step = make_train_step(graphdef, rest, st, tx, seed=0)
    state = init_state(params, tx, st, 0)
    pipe = P.Pipeline(sources(), st.data, tok, process_index=0, process_count=1)
    trained = lambda s, k: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s[k]["mar"])])  # noqa: E731
    seen = []
    for k in range(2 * st.steps):
        before = {key: trained(state, key) for key in ("params", "ema")}
        state, _ = step(state, {key: v for key, v in pipe[k].items() if key not in ("step", "bucket")})
        seen.append(tuple(not np.array_equal(before[key], trained(state, key)) for key in ("params", "ema")))
    assert seen == [(False, False), (True, True)] * st.steps
    inner = state["opt"].inner_opt_state
    counts = {int(x) for x in jax.tree.leaves(inner) if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype,
                                                                                         np.integer)}
    assert counts == {st.steps}  # Adam's count and the schedule's: one per applied update


def test_non_finite_is_caught_between_logs_and_never_checkpointed(mcfg, tok, tmp_path):
    """With no log before the stage's end, the step's on-device flag still names the first
    non-finite update, before a checkpoint (every 2 updates) would have saved the broken state."""
    model = U.UniPic(mcfg, rngs=nnx.Rngs(0))
    t = Trainer(model, stages(mcfg, gen_steps=5, lr=1e30, clip=0.0)[1:], sources(), tok, tmp_path, log_every=100,
                checkpoint_every=2, progress=False, tensorboard=False)
    with pytest.raises(NonFiniteLoss, match=r"global step 2: non-finite"):
        t.run()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_vae_scale_calibration_is_one_compile_over_global_batches(mcfg, tok, caplog):
    from unipic_jax.data import pipeline as P
    from unipic_jax.train import stages as stages_lib

    st = stages(mcfg)[0]
    st.calibrate_scale = True
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    model = sharding.create_sharded(lambda: U.UniPic(mcfg, rngs=nnx.Rngs(0)), mesh)
    pipe = P.Pipeline(sources(), st.data, tok, process_index=0, process_count=1)

    class T:  # what calibrate_vae_scale reads of the trainer
        pass

    t = T()
    t.model, t.mesh = model, mesh
    with caplog.at_level(logging.WARNING, logger="jax._src.interpreters.pxla"), jax.log_compiles():
        scale = stages_lib.calibrate_vae_scale(t, st, nnx.state(model, nnx.Param), pipe, batches=4)
    assert len([r for r in caplog.records if r.getMessage().startswith("Compiling jit(moments)")]) == 1
    means = np.concatenate([np.asarray(model.vae.posterior(pipe[k]["t2i/pixels"])[0]).ravel() for k in range(4)])
    assert scale == pytest.approx(1.0 / means.std(), rel=1e-4) and model.config.vae.scale == scale


def test_corrupted_latents():
    from unipic_jax.train.stages import corrupt_latents

    z = jax.random.normal(jax.random.key(0), (4, 16, 16, 8))
    np.testing.assert_array_equal(corrupt_latents(z, jax.random.key(1), 0.0, 0.0), z)
    swapped = np.asarray(corrupt_latents(z, jax.random.key(1), 0.0, 0.3))
    changed = np.any(swapped != np.asarray(z), axis=-1)
    assert 0.26 < changed.mean() < 0.34  # 1024 tokens, each swapped with probability 0.3
    tokens = {tuple(t) for t in np.asarray(z).reshape(-1, 8)}
    assert all(tuple(t) in tokens for t in swapped.reshape(-1, 8))  # every token is one of the batch's
    noisy = np.asarray(corrupt_latents(z, jax.random.key(2), 1.0, 0.0))
    tau = [np.polyfit(np.asarray(z[b]).ravel(), noisy[b].ravel(), 1)[0] for b in range(4)]  # slope ~ 1 - tau
    assert all(0.0 <= 1 - t <= 1.05 for t in tau) and np.std(tau) > 0.01  # a strength per image


def test_denoising_decoder_trains_the_decoder_only(mcfg, tok):
    cfg = stage_cfg("vae", 30, ("vae.decoder", "vae.post_quant_conv"), batch_size=dict(t2i=2), decoder_noise=0.5,
                    decoder_swap=0.1, recon="l2")
    st = Stage.from_config("dec", cfg, mcfg, 0)
    with pytest.raises(ValueError, match="trains only .*vae.decoder.*trainable=\\('vae',\\)"):
        Stage.from_config("dec", stage_cfg("vae", 3, ("vae",), batch_size=dict(t2i=2), decoder_noise=0.5), mcfg, 0)
    with pytest.raises(ValueError, match="calibrate_scale=True"):
        Stage.from_config("dec", stage_cfg("vae", 3, ("vae.decoder",), batch_size=dict(t2i=2), decoder_swap=0.1,
                                           calibrate_scale=True), mcfg, 0)
    model = U.UniPic(mcfg, rngs=nnx.Rngs(2))
    from unipic_jax.data import pipeline as P

    batch = {k: v for k, v in P.Pipeline(sources(), st.data, tok, process_index=0, process_count=1)[0].items()
             if k not in ("step", "bucket")}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = st.optimizer(params)
    step = make_train_step(graphdef, rest, st, tx, seed=0)
    state = init_state(params, tx, st, 0)
    enc0 = [np.array(x) for x in jax.tree.leaves(params["vae"]["encoder"])]
    dec0 = [np.array(x) for x in jax.tree.leaves(params["vae"]["decoder"])]
    losses = []
    for _ in range(st.steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        assert "clean_rec" in m
    for a, b in zip(enc0, jax.tree.leaves(state["params"]["vae"]["encoder"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the encoder, so the latent space, does not move
    assert any(not np.array_equal(a, b) for a, b in zip(dec0, jax.tree.leaves(state["params"]["vae"]["decoder"]),
                                                        strict=True))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
