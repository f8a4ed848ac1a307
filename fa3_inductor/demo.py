"""The README's demo: compile an unmodified HuggingFace Llama-style model with backend="fa3".

On CPU it shows every attention site rewritten and outputs equal to eager; on a GPU it also times a prefill
against Inductor. Run: python -m fa3_inductor.demo
"""

from __future__ import annotations

import time

import torch


def _model(device, dtype, attn, big):
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
    print(f"fa3-inductor demo on {torch.cuda.get_device_name() if gpu else 'CPU'} (torch {torch.__version__})")
    for attn in ("eager", "sdpa"):
        model, cfg = _model(device, dtype, attn, big=False)
        ids = torch.randint(0, cfg.vocab_size, (2, 37), device=device)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0                                  # a left-padded row
        with torch.no_grad():
            report = fa3_inductor.explain(model, input_ids=ids, attention_mask=mask)
            print(f"\n[{attn}] {report}")
            torch._dynamo.reset()
            ref = model(input_ids=ids, attention_mask=mask).logits
            out = torch.compile(model, backend="fa3")(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        err = (out[keep].float() - ref[keep].float()).abs().max().item()
        print(f"[{attn}] max |logits(fa3) - logits(eager)| on real tokens: {err:.2e}")
    if gpu:
        print("\nprefill, 4-layer Llama (hidden 2048, 16x128 heads, 8 KV heads), B=2 S=8192, bf16:")
        for attn in ("sdpa", "eager"):
            model, cfg = _model(device, dtype, attn, big=True)
            ids = torch.randint(0, cfg.vocab_size, (2, 8192), device=device)
            with torch.no_grad():
                for name, backend in (("inductor", "inductor"), ("fa3", "fa3")):
                    torch._dynamo.reset()
                    m = torch.compile(model, backend=backend)
                    print(f"  attn={attn:5s} {name:8s} {_time(lambda: m(input_ids=ids)):7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
