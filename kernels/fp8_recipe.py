"""What an FP8 (e4m3) attention forward does to its inputs: the recipe, its serialised form, and the rotation.

The recipe travels as a string argument of the `fa3::attention` op ("" = FP8 off), so graphs compiled with
and without FP8 differ. It is pure data; kernels/fp8_quant.py applies it.

Rotation (incoherent processing). Q and K rows are multiplied by the same random orthogonal matrix
    M = H_n · diag(s) / sqrt(n)          (column-vector convention: q' = M q)
i.e. in the row layout the kernels use, Q' = Q · diag(s) · H_n / sqrt(n): each row is sign-flipped by s, then
Walsh–Hadamard transformed. Signs come first on purpose: flipping signs after H would not change any
magnitude, so it would spread outliers no better than H alone. H_n is the Sylvester Hadamard matrix
(H[i, j] = (-1)^popcount(i & j), symmetric), n = hadamard_dim(d) the next power of two >= max(d, 16);
a head dim that is not a power of two is zero-padded to n first, which keeps Q'K'ᵀ = QKᵀ (the padded
columns are zero in both). s ∈ {±1}^n is drawn from a CPU torch.Generator seeded with the recipe's seed,
so the same seed gives the same M on every machine.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

SCALINGS = ("block", "tensor")
E4M3_MAX = 448.0        # largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    scaling: str = "block"      # "block": one scale per tile of rows; "tensor": one scale per tensor
    hadamard: bool = True       # rotate Q and K by M before quantizing
    seed: int = 0               # seed of M's random signs

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling {self.scaling!r}: expected one of {SCALINGS}")
        if not isinstance(self.hadamard, bool):
            raise ValueError(f"fp8 hadamard must be a boolean, got {self.hadamard!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"fp8 seed must be a non-negative integer, got {self.seed!r}")

    def dumps(self) -> str:
        return f"e4m3;scaling={self.scaling};hadamard={int(self.hadamard)};seed={self.seed}"

    @staticmethod
    def loads(text: str) -> "Fp8Recipe | None":
        """The recipe in text, or None for "" (FP8 off)."""
        if not text:
            return None
        head, *fields = text.split(";")
        try:
            if head != "e4m3":
                raise ValueError(head)
            kv = dict(f.split("=", 1) for f in fields)
            return Fp8Recipe(kv["scaling"], {"0": False, "1": True}[kv["hadamard"]], int(kv["seed"]))
        except (ValueError, KeyError) as exc:
            raise ValueError(f"not a serialised fp8 recipe: {text!r}") from exc

    def describe(self) -> str:
        return f"fp8 e4m3 {self.scaling} scales" + (f" + Hadamard (seed {self.seed})" if self.hadamard else "")


def hadamard_dim(d: int) -> int:
    """Width of a rotated head: the next power of two >= max(d, 16)."""
    return max(16, 1 << max(0, (d - 1).bit_length()))


@functools.lru_cache(maxsize=64)
def _signs_cpu(seed: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float32)


_SIGNS: dict = {}


def signs(seed: int, n: int, device="cpu") -> torch.Tensor:
    """The ±1 fp32 vector s of M for (seed, n), cached per device (tensor not to be modified)."""
    key = (seed, n, str(device))
    t = _SIGNS.get(key)
    if t is None:
        t = _signs_cpu(seed, n).to(device)
        _SIGNS[key] = t
    return t


_SIGNED_H: dict = {}


def signed_hadamard(seed: int, n: int, dtype, device="cpu") -> torch.Tensor:
    """diag(s) · H_n (entries ±1, exact in any float dtype): the rotation without its 1/sqrt(n), as the tensor-core
    quantize pass multiplies by it; cached per (seed, n, dtype, device) (not to be modified)."""
    key = (seed, n, dtype, str(device))
    t = _SIGNED_H.get(key)
    if t is None:
        t = (_signs_cpu(seed, n).view(-1, 1) * hadamard_matrix(n, torch.float32)).to(dtype).to(device).contiguous()
        _SIGNED_H[key] = t
    return t


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Sylvester H_n (entries ±1, not normalised); n a power of two."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    i = torch.arange(n)
    bits = i.view(-1, 1) & i.view(1, -1)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def rotation_matrix(seed: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """The explicit row-layout rotation R (n × n, n = hadamard_dim(d)): rotated = pad(x, n) @ R, R = Mᵀ."""
    n = hadamard_dim(d)
    s = _signs_cpu(seed, n).to(dtype)
    return s.view(-1, 1) * hadamard_matrix(n, dtype) / n ** 0.5
