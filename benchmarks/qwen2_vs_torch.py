"""Prefill time and greedy decode speed: unipic-jax Qwen2 vs transformers, same CPU.

    python -m benchmarks.qwen2_vs_torch [--threads 2] [--prompt 128] [--new 128] [--batch 1]
        [--hidden 768] [--layers 8] [--heads 12] [--kv_heads 2] [--mlp 2048] [--vocab 32000]

Both models hold the same random weights (a transformers Qwen2ForCausalLM saved to a
temporary folder and read with ``convert.from_hf``), compute in float32 and use the
same number of threads. Prefill = one forward pass over the prompt returning all logits.
Decode tokens/s = ``new`` tokens / (time to generate ``new + 1`` tokens − time to
generate 1 token), i.e. the cost of the decode steps alone; both stop only at the length
(no EOS). Each figure is the median of ``--repeats`` timed runs after a warm-up (which,
for JAX, includes compilation; compile times are printed separately); the runs of the two
frameworks are interleaved so that noise from other tenants of the machine hits both.

It also prints the memory-bandwidth floor of batch-1 decoding: each decode step reads
every weight once, so no float32 implementation can beat ``bandwidth / weight bytes``
tokens/s; the bandwidth is measured with a GEMV over as many bytes as the model has.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags


flags.DEFINE_integer("threads", os.cpu_count(), "threads for both frameworks (default: all CPUs)")
flags.DEFINE_integer("batch", 1, "sequences per call")
flags.DEFINE_integer("prompt", 128, "prompt length")
flags.DEFINE_integer("new", 128, "new tokens to decode")
flags.DEFINE_integer("repeats", 7, "timed runs per figure (the median is reported)")
flags.DEFINE_integer("hidden", 768, "Qwen2 hidden size")
flags.DEFINE_integer("layers", 8, "Qwen2 decoder layers")
flags.DEFINE_integer("heads", 12, "attention heads")
flags.DEFINE_integer("kv_heads", 2, "key/value heads")
flags.DEFINE_integer("mlp", 2048, "MLP intermediate size")
flags.DEFINE_integer("vocab", 32000, "vocabulary size")
flags.DEFINE_string("json", None, "also write the figures to this file")


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    # both frameworks get the same thread budget; must be set before jax/torch start
    threads = f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + threads
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from unipic_jax import convert

    torch.set_num_threads(args.threads)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=True,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = convert.from_hf(d, dtype=jnp.float32, progress=False)

    rng = np.random.RandomState(0)
    prompt = rng.randint(1, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    t_prompt = torch.tensor(prompt, dtype=torch.long)
    j_prompt = jnp.asarray(prompt)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))

    def jax_prefill():
        forward(state, j_prompt).block_until_ready()

    def torch_prefill():
        with torch.inference_mode():
            hf(t_prompt)

    def jax_gen(n):
        return lambda: np.asarray(model.generate(j_prompt, max_new_tokens=n))

    def torch_gen(n):
        def run():
            with torch.inference_mode():
                return hf.generate(t_prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        return run

    results = {"params": n_params, "threads": args.threads, "batch": args.batch, "prompt": args.prompt,
               "new": args.new, "jax": jax.__version__, "torch": torch.__version__}
    t = time.perf_counter()
    jax_prefill()
    results["jax_prefill_compile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    jax_gen(1)(), jax_gen(args.new + 1)()
    results["jax_generate_compile_s"] = time.perf_counter() - t
    torch_prefill(), torch_gen(1)(), torch_gen(args.new + 1)()  # warm-up

    # same tokens from both (sanity: the comparison is of the same computation)
    same = np.array_equal(np.asarray(jax_gen(16)()), torch_gen(16)()[:, args.prompt:].numpy())
    results["greedy_tokens_match"] = bool(same)

    # interleave the two frameworks so that machine noise hits both alike
    runs = {"jax": (jax_prefill, jax_gen(1), jax_gen(args.new + 1)),
            "torch": (torch_prefill, torch_gen(1), torch_gen(args.new + 1))}
    times = {name: ([], [], []) for name in runs}
    for _ in range(args.repeats):
        for name, fns in runs.items():
            for fn, acc in zip(fns, times[name]):
                acc.append(median_time(fn, 1))
    for name, (pre, one, full) in times.items():
        results[f"{name}_prefill_s"] = statistics.median(pre)
        decode_s = max(statistics.median(full) - statistics.median(one), 1e-9)
        results[f"{name}_decode_tok_s"] = args.batch * args.new / decode_s

    # The floor for batch-1 decode: every step reads every weight once. Time a GEMV over
    # as many float32 bytes as the model has (best of a few) to get this machine's bandwidth.
    weights = jnp.zeros((args.hidden, n_params // args.hidden), jnp.float32)
    gemv = jax.jit(lambda x, w: x @ w)
    x = jnp.ones((1, args.hidden), jnp.float32)
    gemv(x, weights).block_until_ready()
    t_gemv = min(median_time(lambda: gemv(x, weights).block_until_ready(), 3) for _ in range(3))
    results["bandwidth_GBps"] = weights.nbytes / t_gemv / 1e9
    results["decode_floor_tok_s"] = args.batch / t_gemv

    prefill_speedup = results["torch_prefill_s"] / results["jax_prefill_s"]
    decode_speedup = results["jax_decode_tok_s"] / results["torch_decode_tok_s"]
    results.update(prefill_speedup=prefill_speedup, decode_speedup=decode_speedup)
    print(f"Qwen2 {n_params / 1e6:.1f}M params, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens, {args.threads} threads, float32")
    print(f"{'':10s}{'prefill (s)':>14s}{'decode tok/s':>16s}")
    for name in ("jax", "torch"):
        print(f"{name:10s}{results[f'{name}_prefill_s']:14.4f}{results[f'{name}_decode_tok_s']:16.1f}")
    print(f"ratios: prefill torch/jax = {prefill_speedup:.2f}x (target >= 1), "
          f"decode jax/torch = {decode_speedup:.2f}x (target >= 2)")
    print(f"memory-bandwidth floor: {n_params * 4 / 1e6:.0f} MB of weights per step at "
          f"{results['bandwidth_GBps']:.1f} GB/s -> at most {results['decode_floor_tok_s']:.1f} tok/s for any "
          f"float32 implementation ({results['decode_floor_tok_s'] / results['torch_decode_tok_s']:.2f}x torch)")
    print(f"jax compile: prefill {results['jax_prefill_compile_s']:.1f}s, "
          f"generate {results['jax_generate_compile_s']:.1f}s; greedy tokens match: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
