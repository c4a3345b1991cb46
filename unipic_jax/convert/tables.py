"""The key tables: PyTorch / Hugging Face state-dict keys ↔ our NNX parameter paths, one
section per model family (see :mod:`unipic_jax.convert.mapping` for what a :class:`Rule` says).
"""

from __future__ import annotations

from unipic_jax.convert.mapping import Rule, layer_form


def _form(rules, cfg, stacks):
    """``rules`` as they fit ``cfg``'s layer form (stacked blocks when ``cfg.scan_layers``)."""
    return layer_form(rules, stacks) if cfg.scan_layers else tuple(rules)

# -- projectors: MLPProjector <-> the PyTorch nn.Sequential(Linear, SiLU, Linear) ------------

PROJECTOR_RULES = (
    Rule("0.weight", "fc1.kernel"), Rule("0.bias", "fc1.bias"),
    Rule("2.weight", "fc2.kernel"), Rule("2.bias", "fc2.bias"),
)


# -- Qwen2 (transformers Qwen2ForCausalLM <-> models/qwen2.py) ---------------------------

QWEN2_HF_RULES = (
    Rule("model.embed_tokens.weight", "embedder.embedding"),
    Rule("model.layers.{}.input_layernorm.weight", "layers.{}.input_norm.scale"),
    Rule("model.layers.{}.post_attention_layernorm.weight", "layers.{}.post_attn_norm.scale"),
    Rule("model.layers.{}.self_attn.q_proj.weight", "layers.{}.attn.q_proj.kernel", "reshape", 2),
    Rule("model.layers.{}.self_attn.q_proj.bias", "layers.{}.attn.q_proj.bias", "reshape", 2),
    Rule("model.layers.{}.self_attn.k_proj.weight", "layers.{}.attn.k_proj.kernel", "reshape", 2),
    Rule("model.layers.{}.self_attn.k_proj.bias", "layers.{}.attn.k_proj.bias", "reshape", 2),
    Rule("model.layers.{}.self_attn.v_proj.weight", "layers.{}.attn.v_proj.kernel", "reshape", 2),
    Rule("model.layers.{}.self_attn.v_proj.bias", "layers.{}.attn.v_proj.bias", "reshape", 2),
    Rule("model.layers.{}.self_attn.o_proj.weight", "layers.{}.attn.o_proj.kernel", "reshape", 1),
    Rule("model.layers.{}.mlp.gate_proj.weight", "layers.{}.mlp.gate_up_proj.kernel", stack=0),
    Rule("model.layers.{}.mlp.up_proj.weight", "layers.{}.mlp.gate_up_proj.kernel", stack=1),
    Rule("model.layers.{}.mlp.down_proj.weight", "layers.{}.mlp.down_proj.kernel"),
    Rule("model.norm.weight", "final_norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel"),
)


def qwen2_hf_rules(cfg):
    return _form(QWEN2_HF_RULES, cfg, ("layers",))


# Keys some checkpoints carry that hold no weights of their own (rotary buffers).
QWEN2_HF_IGNORED = (r".*rotary_emb\.inv_freq",)


# -- SigLIP / SigLIP2 (transformers Siglip(2)VisionModel <-> models/siglip2.py) -----------

_SIGLIP_COMMON = (
    Rule("embeddings.position_embedding.weight", "pos_embed"),
    Rule("post_layernorm.weight", "post_layernorm.scale"),
    Rule("post_layernorm.bias", "post_layernorm.bias"),
    *(r for ln in ("layer_norm1", "layer_norm2") for r in (
        Rule(f"encoder.layers.{{}}.{ln}.weight", f"layers.{{}}.{ln}.scale"),
        Rule(f"encoder.layers.{{}}.{ln}.bias", f"layers.{{}}.{ln}.bias"))),
    *(r for p in ("q_proj", "k_proj", "v_proj") for r in (
        Rule(f"encoder.layers.{{}}.self_attn.{p}.weight", f"layers.{{}}.attn.{p}.kernel", "reshape", 2),
        Rule(f"encoder.layers.{{}}.self_attn.{p}.bias", f"layers.{{}}.attn.{p}.bias", "reshape", 2))),
    Rule("encoder.layers.{}.self_attn.out_proj.weight", "layers.{}.attn.out_proj.kernel", "reshape", 1),
    Rule("encoder.layers.{}.self_attn.out_proj.bias", "layers.{}.attn.out_proj.bias"),
    *(r for fc in ("fc1", "fc2") for r in (
        Rule(f"encoder.layers.{{}}.mlp.{fc}.weight", f"layers.{{}}.mlp.{fc}.kernel"),
        Rule(f"encoder.layers.{{}}.mlp.{fc}.bias", f"layers.{{}}.mlp.{fc}.bias"))),
    Rule("head.probe", "head.probe"),
    Rule("head.attention.in_proj_weight", "head.in_proj.kernel", "reshape", 3),
    Rule("head.attention.in_proj_bias", "head.in_proj.bias", "reshape", 3),
    Rule("head.attention.out_proj.weight", "head.out_proj.kernel", "reshape", 1),
    Rule("head.attention.out_proj.bias", "head.out_proj.bias"),
    Rule("head.layernorm.weight", "head.layernorm.scale"),
    Rule("head.layernorm.bias", "head.layernorm.bias"),
    *(r for fc in ("fc1", "fc2") for r in (
        Rule(f"head.mlp.{fc}.weight", f"head.mlp.{fc}.kernel"),
        Rule(f"head.mlp.{fc}.bias", f"head.mlp.{fc}.bias"))),
)
SIGLIP_HF_RULES_NAFLEX = (
    Rule("embeddings.patch_embedding.weight", "patch_embed.kernel", "reshape", 1),
    Rule("embeddings.patch_embedding.bias", "patch_embed.bias"),
    *_SIGLIP_COMMON,
)
SIGLIP_HF_RULES_FIXED = (
    Rule("embeddings.patch_embedding.weight", "patch_embed.kernel", "transpose", perm=(0, 2, 3, 1)),
    Rule("embeddings.patch_embedding.bias", "patch_embed.bias"),
    *_SIGLIP_COMMON,
)


def siglip_hf_rules(cfg):
    return _form(SIGLIP_HF_RULES_NAFLEX if cfg.naflex else SIGLIP_HF_RULES_FIXED, cfg, ("layers",))


# Parts of full SigLIP checkpoints (text tower, contrastive scale) that the vision tower does not use.
SIGLIP_HF_IGNORED = (r"text_model\..*", r"logit_scale", r"logit_bias")
SIGLIP_HF_PREFIXES = ("vision_model.",)  # full SigLIP models and transformers 4.x vision folders


# -- MAR (the release's mar.* <-> models/mar.py) -----------------------------------------

def _mar_block_rules(prefix: str) -> tuple[Rule, ...]:
    p = f"{prefix}_blocks.{{}}"
    return (
        Rule(f"{p}.norm1.weight", f"{p}.norm1.scale"), Rule(f"{p}.norm1.bias", f"{p}.norm1.bias"),
        Rule(f"{p}.attn.qkv.weight", f"{p}.qkv.kernel", "reshape", 3),
        Rule(f"{p}.attn.qkv.bias", f"{p}.qkv.bias", "reshape", 3),
        Rule(f"{p}.attn.proj.weight", f"{p}.proj.kernel", "reshape", 1),
        Rule(f"{p}.attn.proj.bias", f"{p}.proj.bias"),
        Rule(f"{p}.norm2.weight", f"{p}.norm2.scale"), Rule(f"{p}.norm2.bias", f"{p}.norm2.bias"),
        Rule(f"{p}.mlp.fc1.weight", f"{p}.fc1.kernel"), Rule(f"{p}.mlp.fc1.bias", f"{p}.fc1.bias"),
        Rule(f"{p}.mlp.fc2.weight", f"{p}.fc2.kernel"), Rule(f"{p}.mlp.fc2.bias", f"{p}.fc2.bias"),
    )


# Keys relative to the release's ``mar.`` prefix (the diffusion head's are DIFFLOSS_TORCH_RULES).
MAR_TORCH_RULES = (
    Rule("fake_latent", "fake_latent"),
    Rule("z_proj.weight", "z_proj.kernel"), Rule("z_proj.bias", "z_proj.bias"),
    Rule("z_proj_ln.weight", "z_proj_ln.scale"), Rule("z_proj_ln.bias", "z_proj_ln.bias"),
    Rule("encoder_pos_embed_learned", "encoder_pos_embed"),
    *_mar_block_rules("encoder"),
    Rule("encoder_norm.weight", "encoder_norm.scale"), Rule("encoder_norm.bias", "encoder_norm.bias"),
    Rule("decoder_embed.weight", "decoder_embed.kernel"), Rule("decoder_embed.bias", "decoder_embed.bias"),
    Rule("mask_token", "mask_token"),
    Rule("decoder_pos_embed_learned", "decoder_pos_embed"),
    *_mar_block_rules("decoder"),
    Rule("decoder_norm.weight", "decoder_norm.scale"), Rule("decoder_norm.bias", "decoder_norm.bias"),
    Rule("diffusion_pos_embed_learned", "diffusion_pos_embed"),
)
MAR_TORCH_IGNORED = (r"class_emb\.weight",)


def mar_torch_rules(cfg):
    return _form(MAR_TORCH_RULES, cfg, ("encoder_blocks", "decoder_blocks"))


# -- diffusion head (the release's mar.diffloss.* <-> models/diffloss.py) -----------------

# keys relative to the release's ``mar.diffloss.`` prefix
DIFFLOSS_TORCH_RULES = (
    Rule("net.time_embed.mlp.0.weight", "net.time_embed.fc1.kernel"),
    Rule("net.time_embed.mlp.0.bias", "net.time_embed.fc1.bias"),
    Rule("net.time_embed.mlp.2.weight", "net.time_embed.fc2.kernel"),
    Rule("net.time_embed.mlp.2.bias", "net.time_embed.fc2.bias"),
    Rule("net.cond_embed.weight", "net.cond_embed.kernel"),
    Rule("net.cond_embed.bias", "net.cond_embed.bias"),
    Rule("net.input_proj.weight", "net.input_proj.kernel"),
    Rule("net.input_proj.bias", "net.input_proj.bias"),
    Rule("net.res_blocks.{}.in_ln.weight", "net.res_blocks.{}.in_ln.scale"),
    Rule("net.res_blocks.{}.in_ln.bias", "net.res_blocks.{}.in_ln.bias"),
    Rule("net.res_blocks.{}.mlp.0.weight", "net.res_blocks.{}.mlp.fc1.kernel"),
    Rule("net.res_blocks.{}.mlp.0.bias", "net.res_blocks.{}.mlp.fc1.bias"),
    Rule("net.res_blocks.{}.mlp.2.weight", "net.res_blocks.{}.mlp.fc2.kernel"),
    Rule("net.res_blocks.{}.mlp.2.bias", "net.res_blocks.{}.mlp.fc2.bias"),
    Rule("net.res_blocks.{}.adaLN_modulation.1.weight", "net.res_blocks.{}.ada.kernel", "reshape", 2),
    Rule("net.res_blocks.{}.adaLN_modulation.1.bias", "net.res_blocks.{}.ada.bias", "reshape", 2),
    Rule("net.final_layer.linear.weight", "net.final_layer.linear.kernel"),
    Rule("net.final_layer.linear.bias", "net.final_layer.linear.bias"),
    Rule("net.final_layer.adaLN_modulation.1.weight", "net.final_layer.ada.kernel", "reshape", 2),
    Rule("net.final_layer.adaLN_modulation.1.bias", "net.final_layer.ada.bias", "reshape", 2),
)


def diffloss_torch_rules(cfg):
    return _form(DIFFLOSS_TORCH_RULES, cfg, ("net.res_blocks",))


# -- KL VAE (LDM kl16.ckpt and diffusers AutoencoderKL <-> models/vae.py) ------------------

_CONV = dict(kind="transpose", perm=(0, 2, 3, 1))  # torch OIHW -> ours OHWI


def _conv(torch_name: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{torch_name}.weight", f"{ours}.kernel", **_CONV), Rule(f"{torch_name}.bias", f"{ours}.bias")


def _norm(torch_name: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{torch_name}.weight", f"{ours}.scale"), Rule(f"{torch_name}.bias", f"{ours}.bias")


def _linear_as_1x1(torch_name: str, ours: str) -> tuple[Rule, Rule]:
    """A torch Linear (C, C) stored as our 1×1 conv (C, 1, 1, C)."""
    return Rule(f"{torch_name}.weight", f"{ours}.kernel", "reshape", 1), Rule(f"{torch_name}.bias", f"{ours}.bias")


def _resnet(t: str, o: str, shortcut: str) -> list[Rule]:
    return [*_norm(f"{t}.norm1", f"{o}.norm1"), *_conv(f"{t}.conv1", f"{o}.conv1"),
            *_norm(f"{t}.norm2", f"{o}.norm2"), *_conv(f"{t}.conv2", f"{o}.conv2"),
            *_conv(f"{t}.{shortcut}", f"{o}.nin_shortcut")]


def vae_ldm_rules(cfg) -> tuple[Rule, ...]:
    """``kl16.ckpt`` (LDM) names; ours are the same with ``kernel``/``scale`` leaf names."""
    rules: list[Rule] = []
    for part in ("encoder", "decoder"):
        rules += [*_conv(f"{part}.conv_in", f"{part}.conv_in"), *_conv(f"{part}.conv_out", f"{part}.conv_out"),
                  *_norm(f"{part}.norm_out", f"{part}.norm_out")]
        for b in ("block_1", "block_2"):
            rules += _resnet(f"{part}.mid.{b}", f"{part}.mid.{b}", "nin_shortcut")
        if cfg.attention:
            rules += _norm(f"{part}.mid.attn_1.norm", f"{part}.mid.attn_1.norm")
            for w in ("q", "k", "v", "proj_out"):
                rules += _conv(f"{part}.mid.attn_1.{w}", f"{part}.mid.attn_1.{w}")
    for part, lv, rs in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        rules += _resnet(f"{part}.{lv}.{{}}.block.{{}}", f"{part}.{lv}.{{}}.block.{{}}", "nin_shortcut")
        rules += _conv(f"{part}.{lv}.{{}}.{rs}.conv", f"{part}.{lv}.{{}}.{rs}.conv")
    if cfg.attention:
        rules += _norm("encoder.down.{}.attn.{}.norm", "encoder.down.{}.attn.{}.norm")
        for w in ("q", "k", "v", "proj_out"):
            rules += _conv(f"encoder.down.{{}}.attn.{{}}.{w}", f"encoder.down.{{}}.attn.{{}}.{w}")
    rules += [*_conv("quant_conv", "quant_conv"), *_conv("post_quant_conv", "post_quant_conv")]
    return tuple(rules)


def vae_diffusers_rules(cfg) -> tuple[Rule, ...]:
    """diffusers ``AutoencoderKL`` names (its decoder counts levels from the lowest resolution)."""
    n = len(cfg.ch_mult)
    rules: list[Rule] = []
    for part in ("encoder", "decoder"):
        rules += [*_conv(f"{part}.conv_in", f"{part}.conv_in"), *_conv(f"{part}.conv_out", f"{part}.conv_out"),
                  *_norm(f"{part}.conv_norm_out", f"{part}.norm_out")]
        for k, b in enumerate(("block_1", "block_2")):
            rules += _resnet(f"{part}.mid_block.resnets.{k}", f"{part}.mid.{b}", "conv_shortcut")
        if cfg.attention:
            rules += _norm(f"{part}.mid_block.attentions.0.group_norm", f"{part}.mid.attn_1.norm")
            for t, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                rules += _linear_as_1x1(f"{part}.mid_block.attentions.0.{t}", f"{part}.mid.attn_1.{o}")
    rules += _resnet("encoder.down_blocks.{}.resnets.{}", "encoder.down.{}.block.{}", "conv_shortcut")
    rules += _conv("encoder.down_blocks.{}.downsamplers.0.conv", "encoder.down.{}.downsample.conv")
    if cfg.attention:
        rules += _norm("encoder.down_blocks.{}.attentions.{}.group_norm", "encoder.down.{}.attn.{}.norm")
        for t, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            rules += _linear_as_1x1(f"encoder.down_blocks.{{}}.attentions.{{}}.{t}",
                                    f"encoder.down.{{}}.attn.{{}}.{o}")
    for k in range(n):  # diffusers up_blocks[k] is LDM level n-1-k
        i = n - 1 - k
        rules += _resnet(f"decoder.up_blocks.{k}.resnets.{{}}", f"decoder.up.{i}.block.{{}}", "conv_shortcut")
        rules += _conv(f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{i}.upsample.conv")
    rules += [*_conv("quant_conv", "quant_conv"), *_conv("post_quant_conv", "post_quant_conv")]
    return tuple(rules)
