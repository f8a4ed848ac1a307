"""Defaults of the fa3 backend, read from environment flags; `torch.compile(..., options={...})` overrides them.

Every flag is documented in the README. `options` keys are the field names below; any other key is handed
to Inductor as one of its own config options.
"""

from __future__ import annotations

import dataclasses
import os

from .kernels.fp8_recipe import SCALINGS, Fp8Recipe

KERNELS = ("auto", "reference", "triton", "hopper")


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected 0 or 1")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


@dataclasses.dataclass
class Config:
    enabled: bool = True            # FA3_DISABLE=1: match nothing, plain Inductor
    kernel: str = "auto"            # FA3_KERNEL: auto | reference | triton | hopper
    debug_dir: str | None = None    # FA3_DEBUG_DIR: write every generated kernel source there
    log_sites: bool = False         # FA3_LOG=1: log each site's decision at WARNING (visible by default) instead of INFO
    fp8: bool = False               # FA3_FP8=1: FP8 (e4m3) forward where a kernel can serve the site
    fp8_hadamard: bool | None = None  # FA3_FP8_HADAMARD: rotate Q, K by a random Hadamard matrix (None: on)
    fp8_scaling: str = "block"      # FA3_FP8_SCALING: block | tensor
    fp8_seed: int = 0               # FA3_FP8_SEED: seed of the Hadamard matrix's random signs
    min_flops: int = 10 ** 10       # FA3_MIN_FLOPS: without CUDA graphs, static CUDA prefill sites below this stay
    #                                 Inductor's (host cost; see site_size.py); 0 rewrites every site
    measure_sites: bool = True      # FA3_MEASURE_SITES=0: off. CUDA, static sizes, no CUDA graphs: time each site
    #                                 both ways at compile time, keep it Inductor's where that is faster (site_choice.py)

    def validate(self) -> "Config":
        if self.kernel not in KERNELS:
            raise ValueError(f"fa3 option kernel={self.kernel!r}: expected one of {KERNELS}")
        if not all(isinstance(x, bool) for x in (self.enabled, self.log_sites, self.measure_sites)):
            raise ValueError("fa3 options enabled / log_sites / measure_sites must be booleans")
        if not isinstance(self.fp8, bool) or not isinstance(self.fp8_hadamard, (bool, type(None))):
            raise ValueError("fa3 options fp8 / fp8_hadamard must be booleans")
        if self.fp8_scaling not in SCALINGS:
            raise ValueError(f"fa3 option fp8_scaling={self.fp8_scaling!r}: expected one of {SCALINGS}")
        self.recipe()   # checks the seed
        if not isinstance(self.min_flops, int) or isinstance(self.min_flops, bool) or self.min_flops < 0:
            raise ValueError(f"fa3 option min_flops={self.min_flops!r}: expected a non-negative integer")
        return self

    def recipe(self) -> Fp8Recipe:
        """The FP8 recipe these options describe (whether or not fp8 is on)."""
        hadamard = True if self.fp8_hadamard is None else self.fp8_hadamard
        return Fp8Recipe(self.fp8_scaling, hadamard, self.fp8_seed)

    def fp8_arg(self) -> str:
        """What the op receives: the serialised recipe, "" when FP8 is off."""
        return self.recipe().dumps() if self.fp8 else ""

    def with_options(self, options: dict | None) -> tuple["Config", dict]:
        """Split torch.compile options into (our config, Inductor's options)."""
        ours = {f.name for f in dataclasses.fields(self)}
        options = dict(options or {})
        mine = {k: options.pop(k) for k in list(options) if k in ours}
        return dataclasses.replace(self, **mine).validate(), options


def from_env() -> Config:
    return Config(
        enabled=not _env_bool("FA3_DISABLE", False),
        kernel=os.environ.get("FA3_KERNEL", "auto") or "auto",
        debug_dir=os.environ.get("FA3_DEBUG_DIR") or None,
        log_sites=_env_bool("FA3_LOG", False),
        fp8=_env_bool("FA3_FP8", False),
        fp8_hadamard=_env_bool("FA3_FP8_HADAMARD", True) if os.environ.get("FA3_FP8_HADAMARD") else None,
        fp8_scaling=os.environ.get("FA3_FP8_SCALING", "block") or "block",
        fp8_seed=_env_int("FA3_FP8_SEED", 0),
        min_flops=_env_int("FA3_MIN_FLOPS", 10 ** 10),
        measure_sites=_env_bool("FA3_MEASURE_SITES", True),
    ).validate()
