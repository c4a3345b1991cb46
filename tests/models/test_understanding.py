"""Understanding through SigLIP2 against the same composition built from PyTorch modules:
transformers' vision tower → torch MLP → inputs_embeds of transformers' Qwen2ForCausalLM."""

import numpy as np
import pytest
import torch
import transformers

from test_siglip2 import hf_naflex, perturb
from unipic_jax import convert
from unipic_jax import tokenizer as T
from unipic_jax.models import understanding as U

VOCAB = 151936  # the real tokenizer's ids (and <image> = 151669) must fit


@pytest.fixture(scope="module")
def parts(tmp_path_factory, qwen_tokenizer_dir):
    d = tmp_path_factory.mktemp("und")
    vision = hf_naflex(d / "vision", hidden_size=32, num_attention_heads=4, intermediate_size=64, num_patches=16)
    torch.manual_seed(1)
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2, eos_token_id=151645,
        pad_token_id=151643, bos_token_id=None)).eval()
    llm.save_pretrained(d / "llm")
    proj = perturb(torch.nn.Sequential(torch.nn.Linear(32, 40), torch.nn.SiLU(), torch.nn.Linear(40, 48)), 2, 0.3)
    state = {k: v.detach().numpy() for k, v in proj.state_dict().items()}
    tok = T.load_tokenizer(qwen_tokenizer_dir)
    model = convert.understanding_from_hf(d / "llm", d / "vision", projector=state, image_token_id=T.image_token_id(tok))
    rs = np.random.RandomState(0)
    images = [rs.randint(0, 256, (40, 90, 3), dtype=np.uint8), rs.randint(0, 256, (70, 30, 3), dtype=np.uint8)]
    return dict(vision=vision, llm=llm, proj=proj, model=model, tok=tok, images=images)


def torch_inputs(p, questions, answers=None):
    """The PyTorch composition: each image's real patches only, in place of one <image>."""
    pv, pmask, shapes = U.preprocess(p["model"].config.vision, p["images"])
    with torch.no_grad():
        feats = p["vision"](pixel_values=torch.tensor(pv), pixel_attention_mask=torch.tensor(pmask),
                            spatial_shapes=torch.tensor(shapes)).last_hidden_state
        feats = p["proj"](feats)
    tok, image_id = p["tok"], T.image_token_id(p["tok"])
    rows = []
    for b, q in enumerate(questions):
        ids = tok(T.understanding_prompt(q) + ("" if answers is None else answers[b] + T.ANSWER_SUFFIX)).input_ids
        i = ids.index(image_id)
        n = int(pmask[b].sum())
        with torch.no_grad():
            before = p["llm"].get_input_embeddings()(torch.tensor(ids[:i]))
            after = p["llm"].get_input_embeddings()(torch.tensor(ids[i + 1:]))
        rows.append((torch.cat([before, feats[b, :n], after]), i, n, ids))
    return rows, (pv, pmask, shapes)


def test_understanding_logits_match_the_torch_composition(parts):
    questions = ["What colour is the square?", "How many circles?"]
    rows, (pv, pmask, shapes) = torch_inputs(parts, questions)
    ids, mask, _ = U.build_prompts(parts["tok"], questions, pmask)
    logits = np.asarray(parts["model"](ids, mask, pv, pmask, shapes))
    N = pmask.shape[1]
    for b, (emb, start, n, tids) in enumerate(rows):
        with torch.no_grad():
            ref = parts["llm"](inputs_embeds=emb[None]).logits[0].numpy()
        text_after = len(tids) - start - 1
        ours = np.concatenate([logits[b, : start], logits[b, start:start + N][pmask[b].astype(bool)],
                               logits[b, start + N: start + N + text_after]])
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_understanding_loss_is_cross_entropy_on_answer_tokens(parts):
    questions, answers = ["Where is the red triangle?", "What shape?"], ["left", "a blue circle"]
    rows, (pv, pmask, shapes) = torch_inputs(parts, questions, answers)
    ids, mask, labels = U.build_prompts(parts["tok"], questions, pmask, answers=answers)
    logits = parts["model"](ids, mask, pv, pmask, shapes)
    loss = float(U.understanding_loss(logits, labels))
    nll, count = 0.0, 0
    for (emb, start, n, tids), ans in zip(rows, answers):
        n_ans = len(parts["tok"](ans + T.ANSWER_SUFFIX).input_ids)
        with torch.no_grad():
            ref = parts["llm"](inputs_embeds=emb[None]).logits[0]
        targets = torch.tensor(tids[-n_ans:])
        pred = ref[len(emb) - n_ans - 1: len(emb) - 1]
        nll += torch.nn.functional.cross_entropy(pred, targets, reduction="sum").item()
        count += n_ans
    assert (labels >= 0).sum() == count
    np.testing.assert_allclose(loss, nll / count, rtol=1e-5)


def test_answers_come_from_the_kv_cache_like_transformers_generate(parts):
    questions = ["Describe the image.", "Is there a square?"]
    rows, (pv, pmask, shapes) = torch_inputs(parts, questions)
    ids, mask, _ = U.build_prompts(parts["tok"], questions, pmask)
    new = np.asarray(parts["model"].generate(ids, mask, pv, pmask, shapes, max_new_tokens=12, eos_token_id=()))
    for b, (emb, *_rest) in enumerate(rows):
        with torch.no_grad():
            ref = parts["llm"].generate(inputs_embeds=emb[None], max_new_tokens=12, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0].numpy()
        np.testing.assert_array_equal(new[b], ref[-12:])
    text = U.answer(parts["model"], parts["tok"], parts["images"][0], questions[0], max_new_tokens=6)
    one = np.asarray(parts["model"].generate(*U.build_prompts(parts["tok"], questions[:1], pmask[:1])[:2], pv[:1],
                                             pmask[:1], shapes[:1], max_new_tokens=6,
                                             eos_token_id=T.stop_token_ids(parts["tok"])))
    assert text == parts["tok"].decode(one[0], skip_special_tokens=True).strip()


def test_prompt_building_and_gradient_scale(parts):
    tok = parts["tok"]
    pmask = np.array([[1, 1, 1, 0, 0]])
    ids, mask, labels = U.build_prompts(tok, ["q?"], pmask, answers=["yes"])
    image_id = T.image_token_id(tok)
    assert (ids[0] == image_id).sum() == 5 and mask[0][ids[0] == image_id].tolist() == [1, 1, 1, 0, 0]
    assert tok.decode(ids[0][labels[0] >= 0]) == "yes<|im_end|>"
    with pytest.raises(ValueError, match="exactly one <image>"):
        U.build_prompts(tok, ["two <image> tokens"], pmask)
    import jax
    import jax.numpy as jnp

    g = jax.grad(lambda x: jnp.sum(U.scale_gradient(x, 0.1) ** 2))(jnp.ones(3))
    np.testing.assert_allclose(g, 0.2 * np.ones(3), rtol=1e-6)
