"""Sites too small to pay the op's host cost: without CUDA graphs they stay Inductor's.

A call of fa3::attention costs ~0.1 ms of CPU (custom-op dispatch, launch of a Gluon kernel with four TMA
descriptors; bench/results/launch_overhead.md), cuDNN SDPA about half of that. When a model is host-bound —
the ANCHORS Llama at S=512 is: 2.4 ms of kernels under ~2 ms of Python and launches — that difference is the
whole gap (bench/NOTES.md), while the attention kernel itself saves nothing at that size. So, decided at compile
time on Dynamo's fake values: a prefill site on CUDA whose sizes are all static and whose attention costs less
than `min_flops` (FA3 convention: 4·B·Hq·Sq·Sk·D, halved when causal) is left as the model wrote it, unless the
graph runs under CUDA graphs (mode="reduce-overhead"), where host cost vanishes. Decode sites (a few queries
against a cache) are always rewritten: the split-KV kernel is their point. Dynamic sizes are always rewritten.
Static sites that pass this cheap rule are then measured (site_choice.py) unless measure_sites is off.
"""

from __future__ import annotations

from .patterns.spec import AttentionSpec
from .rewrite import example_inputs

DECODE_QUERIES = 16     # at most this many queries per head: a decode step (kernels/triton_decode.MAX_QUERIES)


def attention_flops(b: int, hq: int, sq: int, sk: int, d: int, causal: bool) -> float:
    flops = 4.0 * b * hq * sq * sk * d
    return flops / 2 if causal else flops


def small_site_reason(q_shape, k_shape, device_type: str, causal: bool, cuda_graphs: bool,
                      min_flops: int) -> str | None:
    """Why the site stays Inductor's, or None to rewrite it."""
    if min_flops <= 0 or cuda_graphs or device_type != "cuda":
        return None
    if not all(type(x) is int for x in (*q_shape, *k_shape)):
        return None
    b, hq, sq, d = q_shape
    sk = k_shape[2]
    if sq <= DECODE_QUERIES:
        return None
    flops = attention_flops(b, hq, sq, sk, d, causal)
    if flops >= min_flops:
        return None
    return (f"small site kept for Inductor: {flops:.2g} FLOPs per call < min_flops {min_flops:.2g}, where the "
            f"op's host cost outweighs the kernel without CUDA graphs (compile with mode='reduce-overhead' or "
            f"options={{'min_flops': 0}} to rewrite it)")


def spec_too_small(spec: AttentionSpec, cuda_graphs: bool, min_flops: int) -> str | None:
    vals = example_inputs(spec)
    if vals is None:
        return None
    q, k, _, _ = vals
    return small_site_reason(tuple(q.shape), tuple(k.shape), q.device.type, spec.program.causal != "none",
                             cuda_graphs, min_flops)
