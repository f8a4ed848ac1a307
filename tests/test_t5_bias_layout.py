"""What surrounds a T5-style position-bias site after the rewrite, in Inductor's output code (fp32, CPU).

T5's sdpa spelling: bias = where(padding mask, embedding(buckets).permute(2, 0, 1)[None], finfo.min), a
(B, H, Sq, Sk) tensor whose eager strides put H innermost, passed as SDPA's attn_mask; the output goes through
transpose(1, 2).contiguous().reshape into the o-projection. Under plain Inductor the bias buffer is written
contiguous by the kernel that computes it (SDPA's layout constraint) and the output transpose is free.
  test_fa3_graph_adds_nothing_around_the_site  the fa3 graph writes the bias in the same kernel, in a
      unit-last-stride layout (rewrite.dense_operand), and reads the op's output into the o-projection without a
      copy (the op's (B, Sq, H, D)-ordered output, op.out_strides): no more kernels, copies or bias-sized
      buffers than Inductor's graph
  test_measured_subgraph_ends_after_the_output_layout_chain  site_subgraph's cut-out graphs return what the
      o-projection reads, so the measured choice pays whatever the op's output layout costs there, and take the
      bias in the layout Inductor writes it in the model, so neither side pays a bias copy the model does not
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

import fa3_inductor  # noqa: F401
from fa3_inductor.patterns.matcher import find_sites
from fa3_inductor.site_subgraph import extract
from fa3_inductor.site_values import real_inputs

from helpers import import_bench  # noqa: E402

common = import_bench("common")

B, S, H, D, BUCKETS = 2, 19, 4, 16, 8


def t5_layer(x, wq, wk, wv, wo, emb, buckets, mask):
    q = (x @ wq).view(B, S, H, D).transpose(1, 2)
    k = (x @ wk).view(B, S, H, D).transpose(1, 2)
    v = (x @ wv).view(B, S, H, D).transpose(1, 2)
    values = F.embedding(buckets, emb).permute(2, 0, 1).unsqueeze(0)        # (1, H, S, S), H innermost
    keep = mask[:, None, None, :].expand(B, 1, S, S)
    bias = torch.where(keep, values, torch.finfo(x.dtype).min)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return o.transpose(1, 2).contiguous().reshape(B, S, H * D) @ wo


def _inputs():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(H * D, H * D, generator=g) * 0.1 for _ in range(4)]
    x = torch.randn(B, S, H * D, generator=g)
    emb = torch.randn(BUCKETS, H, generator=g)
    pos = torch.arange(S)
    buckets = (pos[None, :] - pos[:, None]).clamp(-BUCKETS // 2, BUCKETS // 2 - 1) + BUCKETS // 2
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[-1, S - 4:] = False
    return (x, *w, emb, buckets, mask)


def _calls(sources: list[str]) -> list[str]:
    """Each output-code module's text from its `call` wrapper on."""
    return [src[src.index("def call("):] for src in sources]


def _compiled(backend: str, args, **options):
    torch._dynamo.reset()
    with common.inductor_output_code() as sources, torch.no_grad():
        out = torch.compile(t5_layer, backend=backend, options=options or None)(*args)
    (code,) = _calls(sources)
    return out, code


def _kernels(code: str) -> list[str]:
    return re.findall(r"^\s*(cpp_fused_\w+)\(", code, re.M)


def _copies(code: str) -> list[str]:
    """Kernels that only copy (a clone of a transposed view): Inductor names them after those two ops alone."""
    return [k for k in _kernels(code) if re.fullmatch(r"cpp_fused_clone_transpose_\d+", k)]


def _bias_buffers(code: str) -> list[str]:
    return re.findall(rf"empty_strided_cpu\(\({B}, {H}, {S}, {S}\), \(([^)]*)\)", code)


def test_fa3_graph_adds_nothing_around_the_site():
    args = _inputs()
    with torch.no_grad():
        want = t5_layer(*args)
    ind_out, ind = _compiled("inductor", args)
    fa3_out, fa3 = _compiled("fa3", args, min_flops=0)
    assert "fa3.attention" in fa3 and "fa3.attention" not in ind
    torch.testing.assert_close(fa3_out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ind_out, want, rtol=1e-5, atol=1e-5)
    # the operand the op reads: allocated by the fused kernel that computes it, last stride 1
    call = re.search(r"torch\.ops\.fa3\.attention\w*\.default\(.*?\[(\w+)\]", fa3).group(1)
    strides = re.search(rf"{call} = empty_strided_cpu\(\([^)]*\), \(([^)]*)\)", fa3).group(1)
    assert strides.split(", ")[-1] == "1", strides
    # no more bias-sized buffers, copies or kernels than Inductor's graph
    assert len(_bias_buffers(fa3)) == len(_bias_buffers(ind)) == 1
    assert not _copies(fa3) and not _copies(ind)
    assert len(_kernels(fa3)) == len(_kernels(ind))
    # the o-projection reads the op's output buffer itself
    out = re.search(r"assert_size_stride\((\w+), \(2, 4, 19, 16\), \(([^)]*)\)", fa3)
    assert out.group(2) == f"{S * H * D}, {D}, {H * D}, 1"
    assert re.search(rf"extern_kernels\.mm\(reinterpret_tensor\({out.group(1)},", fa3)


def test_measured_subgraph_ends_after_the_output_layout_chain():
    from fa3_inductor.site_choice import _compile
    graphs = []

    def capture(gm, example_inputs, **_):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    args = _inputs()
    with torch.no_grad():
        torch.compile(t5_layer, backend=capture)(*args)
    (gm,) = graphs
    (spec,), _ = find_sites(gm)
    sub = extract(gm, spec, "auto")
    # the cut-out graphs end where the layout chain does: the reshape that feeds the o-projection
    assert sub.returns is not spec.output and tuple(sub.returns.meta["example_value"].shape) == (B, S, H * D)
    # the bias (computed in the graph, H innermost in eager) is timed in the layout Inductor gives it in the model
    (bias,) = [x for x, r in zip(sub.inputs, sub.roles) if r == "operand"]
    assert bias.shape == (B, H, S, S) and bias.is_contiguous()
    vals = real_inputs(sub.inputs, sub.roles)
    assert all(x.device.type == "cpu" for x in vals if isinstance(x, torch.Tensor))
    codes = {}
    with torch.no_grad():
        for name, g in (("inductor", sub.original), ("fa3", sub.rewritten)):
            with common.inductor_output_code() as sources:
                fn = _compile(g, vals, {})
            (codes[name],) = _calls(sources)
            got = fn(*vals)[0]
            codes[name + "_out"] = got
    torch.testing.assert_close(codes["fa3_out"], codes["inductor_out"], rtol=1e-5, atol=1e-5)
    # neither pays a copy of the bias (nor of the output) that the model does not
    assert not _copies(codes["inductor"]) and not _copies(codes["fa3"])
    assert "clone" not in " ".join(_kernels(codes["inductor"]) + _kernels(codes["fa3"]))
