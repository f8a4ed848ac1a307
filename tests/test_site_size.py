"""The small-site rule (fa3_inductor/site_size.py): which sites stay Inductor's without CUDA graphs."""

from __future__ import annotations

import pytest

from fa3_inductor import config
from fa3_inductor.site_size import attention_flops, small_site_reason

S512 = ((2, 16, 512, 128), (2, 8, 512, 128))      # the ANCHORS Llama at S=512: 2.1e9 causal FLOPs
S8K = ((2, 16, 8192, 128), (2, 8, 8192, 128))


def test_flops_convention():
    assert attention_flops(2, 16, 512, 512, 128, False) == 4 * 2 * 16 * 512 * 512 * 128
    assert attention_flops(2, 16, 512, 512, 128, True) == 2 * 2 * 16 * 512 * 512 * 128


def test_small_static_cuda_prefill_is_kept():
    why = small_site_reason(*S512, "cuda", True, False, 10 ** 10)
    assert why and "min_flops" in why and "reduce-overhead" in why


@pytest.mark.parametrize("case", ["large", "cuda_graphs", "cpu", "disabled", "decode", "symbolic"])
def test_rewritten(case):
    q, k = S8K if case == "large" else S512
    device, graphs, min_flops = "cuda", False, 10 ** 10
    if case == "cuda_graphs":
        graphs = True
    if case == "cpu":
        device = "cpu"
    if case == "disabled":
        min_flops = 0
    if case == "decode":
        q = (2, 16, 1, 128)
    if case == "symbolic":
        q = (2, 16, object(), 128)
    assert small_site_reason(q, k, device, True, graphs, min_flops) is None


def test_option_validation(monkeypatch):
    cfg, rest = config.Config().with_options({"min_flops": 0, "max_autotune": True})
    assert cfg.min_flops == 0 and rest == {"max_autotune": True}
    for bad in (-1, 1.5, True, "1e10"):
        with pytest.raises(ValueError, match="min_flops"):
            config.Config().with_options({"min_flops": bad})
    monkeypatch.setenv("FA3_MIN_FLOPS", "123")
    assert config.from_env().min_flops == 123
