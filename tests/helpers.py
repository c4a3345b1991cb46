"""Helpers shared by the tests (importable: tests/ is on pytest's pythonpath)."""

import numpy as np


def make_hf_qwen2(path, *, seed=0, dtype=None, max_shard_size=None, **overrides):
    """Saves a randomly initialised transformers Qwen2ForCausalLM under ``path``."""
    import torch
    import transformers

    kw = dict(
        vocab_size=203, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
        max_position_embeddings=256, initializer_range=0.2, bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()
    # random q/k/v biases (zero at init) so the bias mapping is really exercised
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.2)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model


def rand_ids(shape, vocab, seed=0, low=3):
    return np.random.RandomState(seed).randint(low, vocab, shape).astype(np.int32)


def read_all(path):
    """Every tensor of a Hugging Face folder, by key."""
    from unipic_jax.convert.hf import SafetensorsFolder

    folder = SafetensorsFolder(path)
    return dict(folder.tensors(folder.keys()))


def assert_same_tensors(a, b):
    """The two folders hold the same keys with bit-identical tensors."""
    ta, tb = read_all(a), read_all(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k


def randomize(model, seed=0, scale=0.1):
    """Adds N(0, scale²) noise to every parameter of an NNX model, in place, and returns it:
    layers that MAR and the diffusion head initialise to zero (adaLN modulation, the head's
    output layer) then take part in what a test measures."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    rs = np.random.RandomState(seed)
    new = [x + jnp.asarray(rs.randn(*x.shape) * scale, x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model
