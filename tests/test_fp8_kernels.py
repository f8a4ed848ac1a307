"""The FP8 Triton kernels on CPU through TRITON_INTERPRET=1 (run in their own process by
tests/test_interpreter_process.py; skipped elsewhere).

- Quantize pass (kernels/fp8_quant.py): bit-for-bit the PyTorch emulation (kernels/fp8_reference.py) in every
  layout, scaling and rotation; the in-register FWHT against the explicit Hadamard matrix; padding written.
- FP8 forward (kernels/fp8_portable.py): close to the emulated online-softmax FP8 forward (same math; only
  the output rounding and fp32 summation order differ) and, by the accuracy rule adapted to FP8, within
      |out - ref| <= 2 · |deq - ref| + guard          (max-abs, per tensor)
  where ref is kernels/reference.py on the unquantized inputs (fp32 math: its error is ~1e-6, far below
  FP8's) and deq the same on the dequantized inputs: the error that quantizing the inputs alone costs. The kernel adds P's e4m3 rounding and fp32 accumulation on top; measured here it stays within
  0.9-1.15x of that floor. The guard is the output dtype's rounding. Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from interpreter_sandbox import (  # noqa: E402  (tests/, on sys.path)
    F8_NAN, INTERPRETER_ONLY, C, S, interpreter_sandbox)

from fa3_inductor.kernels import fp8_portable as fp
from fa3_inductor.kernels import fp8_quant
from fa3_inductor.kernels import fp8_reference as fr
from fa3_inductor.kernels import reference
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.fp8_recipe import Fp8Recipe, hadamard_dim, hadamard_matrix
from fa3_inductor.kernels.program import ScoreProgram

pytestmark = INTERPRETER_ONLY


@pytest.fixture(autouse=True, scope="module")
def _interpret(tmp_path_factory):
    with interpreter_sandbox(tmp_path_factory.mktemp("fa3_cache"), [tp, fp8_quant]):
        yield


def rand(*shape, seed=0, dtype=torch.float16, outliers=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    if outliers:     # the FA3 paper's test distribution, denser: N(0,1) + N(0,100)·Bernoulli(0.01)
        x = x + 10 * torch.randn(*shape, generator=gen) * (torch.rand(*shape, generator=gen) < 0.01)
    return x.to(dtype)


# --- quantize pass --------------------------------------------------------------------------------------

def _storage_bytes(op):
    return torch.frombuffer(bytearray(op.data.untyped_storage()), dtype=torch.uint8)


QUANT_CASES = [
    # d, block, rotate, scaling, transposed, dtype
    (64, 32, True, "block", False, torch.float16),
    (128, 16, True, "tensor", False, torch.bfloat16),
    (40, 32, True, "block", False, torch.float32),        # rotated width 64: zero-padded before the FWHT
    (40, 32, False, "block", True, torch.float16),        # V layout: (B, H, D, S), S contiguous, padded to 16
    (64, 48, False, "tensor", True, torch.bfloat16),      # block 48: three 16-row chunks per tile
    (16, 64, False, "block", False, torch.float16),
]


@pytest.mark.parametrize("d,block,rotate,scaling,transposed,dtype", QUANT_CASES,
                         ids=[f"d{c[0]}-b{c[1]}-{'rot' if c[2] else 'plain'}-{c[3]}-{'T' if c[4] else 'rows'}-"
                              f"{str(c[5])[6:]}" for c in QUANT_CASES])
def test_quantize_kernel_matches_emulation(d, block, rotate, scaling, transposed, dtype):
    x = rand(2, 3, 75, d, seed=d + block, dtype=dtype, outliers=True)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)          # (B, S, H, D) storage: any strides
    op = fp8_quant.quantize(x, block=block, rotate=rotate, seed=11, scaling=scaling, transposed=transposed)
    r8, rs = fr.quantize(x, block, rotate_seed=11 if rotate else None, scaling=scaling)
    rows = op.rows()
    assert rows.shape == r8.shape and op.scale.shape == rs.shape == (2, 3, -(-75 // block))
    assert torch.equal(rows.float(), r8.float()), "e4m3 values differ from the emulation"
    assert torch.equal(op.scale, rs)
    assert (_storage_bytes(op) != F8_NAN).all(), "padding or data left unwritten"
    if transposed:
        assert op.data.shape == (2, 3, d, 75) and op.data.stride(-1) == 1 and op.data.stride(-2) % 16 == 0
    else:
        assert op.data.stride(-1) == 1 and op.data.stride(-2) % 16 == 0
        assert op.data.shape[-1] == (hadamard_dim(d) if rotate else d)


def test_wgmma_key_order_is_the_kernel_permutation():
    """The torch index (rows(), tests), the Triton position function (general kernel) and the Triton reshape
    (tile kernel) describe one permutation: in each 16 keys, position 16g + 4t + 2a + b holds 16g + 8a + 2t + b."""
    order = fp8_quant.wgmma_key_order(48)
    assert sorted(order.tolist()) == list(range(48))
    assert order[:16].tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert torch.equal(order[16:32] - 16, order[:16])


@pytest.mark.parametrize("block,tile_kernel", [(32, False), (48, False), (32, True)])
def test_quantize_wgmma_keys(block, tile_kernel):
    """V for the Hopper FP8 kernel: transposed, each 16 keys in wgmma_key_order, all round16(S) columns written
    (keys past S are zeros), rows() the emulation's e4m3 values."""
    x = rand(2, 3, 75, 40, seed=block, dtype=torch.float16, outliers=True)
    op = fp8_quant.quantize(x, block=block, transposed=True, wgmma_keys=True, tile_kernel=tile_kernel)
    r8, rs = fr.quantize(x, block)
    assert op.data.shape == (2, 3, 40, 80) and op.data.stride(-1) == 1
    assert torch.equal(op.rows().float(), r8.float()) and torch.equal(op.scale, rs)
    assert (_storage_bytes(op) != F8_NAN).all(), "padding or data left unwritten"
    stored = op.data.float()
    natural = torch.zeros(2, 3, 40, 80)
    natural[..., :75] = r8.float().transpose(-1, -2)
    assert torch.equal(stored, natural[..., fp8_quant.wgmma_key_order(80)])


TILE_CASES = [
    # d, block, rotate, transposed, dtype
    (64, 32, True, False, torch.float16),
    (128, 64, True, False, torch.float16),
    (80, 32, True, False, torch.float16),      # rotated width 128: zero-padded columns
    (256, 32, True, False, torch.float16),     # H_2 ⊗ H_128: two products and a butterfly
    (256, 16, False, True, torch.bfloat16),    # unrotated V, two 128-wide halves, transposed
    (40, 32, False, False, torch.float32),
]


@pytest.mark.parametrize("d,block,rotate,transposed,dtype", TILE_CASES,
                         ids=[f"d{c[0]}-b{c[1]}-{'rot' if c[2] else 'plain'}-{'T' if c[3] else 'rows'}-"
                              f"{str(c[4])[6:]}" for c in TILE_CASES])
def test_quantize_tile_kernel_matches_emulation(d, block, rotate, transposed, dtype):
    """The GPU's quantize kernel (the rotation as a tensor-core product: fp32 sums in another order than the
    butterflies') against the emulation: the same scales up to rounding, e4m3 values at most one step apart
    and almost all equal."""
    x = rand(2, 2, 75, d, seed=d + block, dtype=dtype, outliers=True)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    op = fp8_quant.quantize(x, block=block, rotate=rotate, seed=5, transposed=transposed, tile_kernel=True)
    r8, rs = fr.quantize(x, block, rotate_seed=5 if rotate else None)
    torch.testing.assert_close(op.scale, rs, atol=0, rtol=1e-6)
    a, b = op.rows().float(), r8.float()
    assert a.shape == b.shape
    assert (a != b).float().mean().item() <= 1e-3
    assert ((a - b).abs() <= b.abs() * 0.125 + 2.0 ** -9).all()
    assert (_storage_bytes(op) != F8_NAN).all(), "padding or data left unwritten"


@pytest.mark.parametrize("tiles,stages", [(2, 1), (4, 2)])
@pytest.mark.parametrize("d,rotate,transposed", [(64, True, False), (256, True, False), (128, False, True)])
def test_quantize_tile_kernel_several_tiles_per_program(monkeypatch, tiles, stages, d, rotate, transposed):
    """TILES tiles per program (software-pipelined loads) store exactly what one tile per program stores,
    the last program's tiles past the sequence included (75 rows: 3 tiles of 32)."""
    x = rand(2, 2, 75, d, seed=d + tiles, dtype=torch.float16, outliers=True)

    def run():
        return fp8_quant.quantize(x, block=32, rotate=rotate, seed=5, transposed=transposed,
                                  wgmma_keys=transposed, tile_kernel=True)
    one = run()
    monkeypatch.setattr(fp8_quant, "_tile_pipeline", lambda bd, rot, tr: (tiles, stages))
    many = run()
    assert torch.equal(_storage_bytes(many), _storage_bytes(one)) and torch.equal(many.scale, one.scale)


def test_quantize_tile_kernel_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="tile kernel"):
        fp8_quant.quantize(rand(1, 1, 40, 64, dtype=torch.float32), block=32, rotate=True, tile_kernel=True)
    with pytest.raises(ValueError, match="tile kernel"):
        fp8_quant.quantize(rand(1, 1, 40, 64), block=32, scaling="tensor", tile_kernel=True)
    with pytest.raises(ValueError, match="transposed"):
        fp8_quant.quantize(rand(1, 1, 40, 64), block=32, wgmma_keys=True)


if os.environ.get("TRITON_INTERPRET") == "1":       # triton is imported only in the interpreter's process
    import triton
    import triton.language as tl

    from fa3_inductor.kernels.fp8_quant_kernel import fwht_rows

    @triton.jit
    def _fwht_kernel(X, Y, ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
        offs = tl.arange(0, ROWS)[:, None] * N + tl.arange(0, N)[None, :]
        tl.store(Y + offs, fwht_rows(tl.load(X + offs), ROWS, N, LOG_N))


def test_fwht_kernel_matches_explicit_matrix():
    """The in-register butterflies alone: x @ H_n for n = 16 .. 256."""
    for n in (16, 32, 64, 128, 256):
        x = rand(4, n, seed=n, dtype=torch.float32)
        y = torch.empty_like(x)
        _fwht_kernel[(1,)](x, y, 4, n, n.bit_length() - 1)
        torch.testing.assert_close(y.double(), x.double() @ hadamard_matrix(n), atol=1e-4, rtol=1e-5)


def test_quantize_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="head dim"):
        fp8_quant.quantize(torch.zeros(1, 1, 4, 300), block=32)
    with pytest.raises(ValueError, match="block"):
        fp8_quant.quantize(torch.zeros(1, 1, 4, 64), block=24)
    with pytest.raises(ValueError, match="dtype"):
        fp8_quant.quantize(torch.zeros(1, 1, 4, 64, dtype=torch.float64), block=32)


# --- FP8 forward ----------------------------------------------------------------------------------------

QB = fp.INTERPRET_QUANT_BLOCKS


def check_fp8(q, k, v, ops, prog, recipe):
    assert fp.supports(prog, q, k, v, ops, recipe) is None
    out, lse = fp.forward(q, k, v, ops, prog, recipe)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1]) and lse.dtype == torch.float32
    emu, emu_lse = fr.emulate(q, k, v, ops, prog, recipe, *QB, fp.INTERPRET_CONFIG[1])
    deq, _ = fr.dequantized_attention(q, k, v, ops, prog, recipe, *QB)
    ops64 = [t if t.dtype == torch.bool else t.double() for t in ops]
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), ops64, prog)   # fp32 math
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan) and torch.equal(torch.isnan(emu), nan), "NaN pattern differs"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and not torch.isnan(lse).any()
    a, e, dq, r = (t[~nan].double() for t in (out, emu, deq, ref))
    if a.numel() == 0:
        return
    eps = torch.finfo(q.dtype).eps
    scale = max(1.0, r.abs().max().item())
    # same math as the emulation: output rounding, fp32 order, a rare e4m3 tie of P
    assert (a - e).abs().max().item() <= 2 * eps * max(1.0, e.abs().max().item()) + 1e-3 * scale
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], emu_lse[fin], atol=1e-4, rtol=1e-5)
    ours, floor = (a - r).abs().max().item(), (dq - r).abs().max().item()
    assert ours <= 2 * floor + eps * scale, f"FP8 error {ours:.3g} > 2 x quantization floor {floor:.3g}"


RECIPES = [Fp8Recipe("block", True, 0), Fp8Recipe("tensor", False, 0), Fp8Recipe("block", False, 1),
           Fp8Recipe("tensor", True, 2)]
RIDS = ["block+hadamard", "tensor", "block", "tensor+hadamard"]


@pytest.mark.parametrize("recipe", RECIPES, ids=RIDS)
def test_fp8_forward_outlier_data(recipe):
    q, k, v = (rand(1, 2, 70, 64, seed=n, outliers=True) for n in range(3))
    check_fp8(q, k, v, [], ScoreProgram(("mul", S, C(0.125))), recipe)


CASES = [
    # dtype, d, dv, b, hq, hk, sq, sk, causal, window
    (torch.bfloat16, 64, 64, 1, 4, 2, 50, 70, "bottom_right", None),
    (torch.float16, 40, 40, 2, 2, 1, 37, 45, "none", None),        # rotated width 64, unrotated V of 40
    (torch.float16, 128, 64, 1, 2, 1, 33, 65, "top_left", 5),
    (torch.bfloat16, 32, 32, 1, 2, 2, 1, 40, "none", None),        # decode: one query row
    (torch.float16, 64, 64, 1, 2, 2, 40, 1, "none", None),
    (torch.float16, 64, 64, 1, 2, 1, 40, 24, "bottom_right", None),  # rows with no visible key
]


@pytest.mark.parametrize("dtype,d,dv,b,hq,hk,sq,sk,causal,window", CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-dv{c[2]}-g{c[4] // c[5]}-{c[6]}x{c[7]}-{c[8]}-w{c[9]}"
                              for c in CASES])
def test_fp8_forward_shapes(dtype, d, dv, b, hq, hk, sq, sk, causal, window):
    q = rand(b, hq, sq, d, seed=1, dtype=dtype)
    k = rand(b, hk, sk, d, seed=2, dtype=dtype)
    v = rand(b, hk, sk, dv, seed=3, dtype=dtype)
    check_fp8(q, k, v, [], ScoreProgram(("mul", S, C(d ** -0.5)), causal=causal, window=window), RECIPES[0])


def test_fp8_forward_strided_inputs():
    q = rand(2, 35, 2, 64, seed=4).transpose(1, 2)
    kv = rand(2, 41, 1, 128, seed=5).transpose(1, 2)
    check_fp8(q, kv[..., :64], kv[..., 64:], [], ScoreProgram(("mul", S, C(0.125)), causal="bottom_right"),
              RECIPES[0])


@pytest.mark.parametrize("empty_row", ["nan", "zero", "uniform"])
def test_fp8_forward_bool_mask_with_empty_rows(empty_row):
    q, k, v = rand(2, 2, 36, 32, seed=6), rand(2, 2, 44, 32, seed=7), rand(2, 2, 44, 32, seed=8)
    mask = torch.rand(2, 1, 36, 44, generator=torch.Generator().manual_seed(9)) > 0.4
    mask[0, 0, 3] = False
    prog = ScoreProgram(("where", ("operand", 0), ("mul", S, C(32 ** -0.5)), C(-math.inf)), n_operands=1,
                        empty_row=empty_row)
    check_fp8(q, k, v, [mask], prog, RECIPES[2])


def test_fp8_forward_bias_and_softcap():
    q, k, v = (rand(1, 2, 40, 128, seed=12 + n) for n in range(3))
    bias = rand(1, 2, 40, 40, seed=15)
    prog = ScoreProgram(("mul", ("tanh", ("div", ("add", ("mul", S, C(0.09)), ("operand", 0)), C(5.0))), C(5.0)),
                        n_operands=1)
    check_fp8(q, k, v, [bias], prog, RECIPES[0])


def test_fp8_tile_shapes(monkeypatch):
    """Kernel tiles equal to the quantization blocks, and a tile that does not divide them (refused)."""
    q, k, v = (rand(1, 2, 45, 64, seed=20 + n) for n in range(3))
    prog = ScoreProgram(("mul", S, C(0.125)), causal="top_left")
    monkeypatch.setattr(fp, "INTERPRET_CONFIG", (32, 32, 4, 1))
    check_fp8(q, k, v, [], prog, RECIPES[0])
    monkeypatch.setattr(fp, "INTERPRET_CONFIG", (32, 64, 4, 1))
    with pytest.raises(ValueError, match="does not divide"):
        fp.forward(q, k, v, [], prog, RECIPES[0])


# --- dispatch, op, backend --------------------------------------------------------------------------------

def test_dispatch_op_and_backward():
    from fa3_inductor import dispatch
    from fa3_inductor.op import attention
    q, k, v = (rand(1, 2, 40, 64, seed=30 + n) for n in range(3))
    prog = ScoreProgram(("mul", S, C(0.125)), causal="top_left")
    entry, _ = dispatch.select(prog, q, k, v, [], "auto", Fp8Recipe())
    assert entry.name == "triton_fp8"
    entry, passed = dispatch.select(prog, q.float(), k.float(), v.float(), [], "auto", Fp8Recipe())
    assert entry.name == "triton" and any("fp16/bf16" in p for p in passed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, program=prog, fp8=True)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_leaves, program=prog)
    assert not torch.equal(out, ref)                        # the FP8 forward ran
    dout = rand(*out.shape, seed=33)
    (out * dout).sum().backward()
    (ref * dout).sum().backward()
    # the 16-bit backward with the FP8 forward's out and lse: gradients within FP8's error of the 16-bit ones
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.dtype == b.grad.dtype and torch.isfinite(a.grad).all()
        rel = (a.grad.float() - b.grad.float()).norm() / b.grad.float().norm()
        assert rel < 0.1, f"gradient relative error {rel:.3g}"


def test_backend_fp8_option_changes_the_result():
    def site(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v

    q, k, v = (rand(1, 2, 40, 64, seed=40 + n) for n in range(3))
    torch._dynamo.reset()
    plain = torch.compile(site, backend="fa3_eager")(q, k, v)
    torch._dynamo.reset()
    fp8 = torch.compile(site, backend="fa3_eager", options={"fp8": True})(q, k, v)
    ref = site(q.double(), k.double(), v.double())
    assert not torch.equal(plain, fp8)
    assert (fp8.double() - ref).abs().max() < 0.1
