"""generate() on a tiny HF Llama whose forward is compiled with backend="fa3" (through Inductor, CPU, fp32).

Greedy tokens equal eager's for DynamicCache and StaticCache and both attention implementations; every attention
site of every graph is rewritten, decode steps (one query against the cache) included; once the shapes have
gone dynamic, new prompt lengths and more generated tokens compile nothing new. mode="reduce-overhead" (CUDA
graphs; a no-op on CPU) runs. On CPU the op runs the reference kernel; test_decode_kernel.py repeats a generation
through the decode kernel in the Triton interpreter.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

# (prompt length, new tokens) per generate() call: the second length makes the prefill and the first decode
# step dynamic; the third call must then compile nothing.
CALLS = ((13, 5), (17, 4), (22, 7))


def tiny_llama(impl: str, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()
    assert model.config._attn_implementation == impl
    return model


def left_padded_prompt(length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def generate_kwargs(cache: str, new_tokens: int) -> dict:
    # disable_compile: transformers must not wrap the forward in its own torch.compile (it does so on GPUs
    # for static caches), which would replace our backend.
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, disable_compile=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    return kw


class SiteLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("fa3 rewritten") or msg.startswith("fa3 skipped"):
            self.lines.append(msg)


@pytest.fixture
def site_log():
    log = logging.getLogger("fa3_inductor")
    handler, old = SiteLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(old)


def run_calls(model, compiled_forward, cache, calls=CALLS, counter=None):
    """Generate eagerly and compiled for each (prompt length, tokens); return counter's frame count after each."""
    eager_forward = model.forward
    frames = []
    for n, (length, new) in enumerate(calls):
        ids, mask = left_padded_prompt(length, seed=n)
        kw = generate_kwargs(cache, new)
        model.forward = eager_forward
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        model.forward = compiled_forward
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        finally:
            model.forward = eager_forward
        assert out.shape == ref.shape == (2, length + new)
        assert torch.equal(out, ref), f"prompt {length}: compiled tokens {out[:, length:].tolist()} != eager " \
                                      f"{ref[:, length:].tolist()}"
        if counter is not None:
            frames.append(counter.frame_count)
    return frames


def compiled(model, backend="fa3", **kw):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(model.forward, backend=counter, **kw), counter


# Inductor compiles cost seconds each on CPU: the eager-attention variants use the same rewrite without Inductor.
@pytest.mark.parametrize("impl,cache,backend", [("sdpa", "dynamic", "fa3"), ("sdpa", "static", "fa3"),
                                                ("eager", "dynamic", "fa3_eager"), ("eager", "static", "fa3_eager")])
def test_generate_equals_eager_and_stops_compiling(impl, cache, backend, site_log):
    torch._dynamo.reset()
    model = tiny_llama(impl)
    fn, counter = compiled(model, backend)
    frames = run_calls(model, fn, cache, counter=counter)
    assert frames[2] == frames[1], f"frames after each generate(): {frames} (the third call recompiled)"
    assert frames[0] < CALLS[0][1] + 1, f"frames {frames}: a compile per generated token"
    skipped = [ln for ln in site_log.lines if ln.startswith("fa3 skipped")]
    assert not skipped, skipped
    rewritten = [ln for ln in site_log.lines if ln.startswith("fa3 rewritten")]
    assert len(rewritten) == frames[-1], f"{len(rewritten)} sites rewritten in {frames[-1]} one-layer graphs"
    assert any("Sq=1 " in ln for ln in rewritten), "no decode step (one query) was rewritten"
    if cache == "dynamic":   # the decode graph with a symbolic cache length is the one that serves every token
        assert any("Sq=1 Sk=s" in ln for ln in rewritten), rewritten


def test_dynamic_true_compiles_once_per_graph_kind():
    torch._dynamo.reset()
    model = tiny_llama("sdpa")
    fn, counter = compiled(model, "fa3_eager", dynamic=True)
    frames = run_calls(model, fn, "dynamic", counter=counter)
    assert frames[0] == frames[1] == frames[2], frames


def test_reduce_overhead_mode_static_cache():
    """CUDA graphs are skipped on CPU; the mode must still compile and give eager's tokens."""
    torch._dynamo.reset()
    model = tiny_llama("sdpa")
    fn = torch.compile(model.forward, backend="fa3", mode="reduce-overhead")
    run_calls(model, fn, "static", calls=CALLS[:1])
