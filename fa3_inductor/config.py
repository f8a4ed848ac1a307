"""Defaults of the fa3 backend, read from environment flags; `torch.compile(..., options={...})` overrides them.

Every flag is documented in the README. `options` keys are the field names below; any other key is handed
to Inductor as one of its own config options.
"""

from __future__ import annotations

import dataclasses
import os

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


@dataclasses.dataclass
class Config:
    enabled: bool = True            # FA3_DISABLE=1: match nothing, plain Inductor
    kernel: str = "auto"            # FA3_KERNEL: auto | reference | triton | hopper
    debug_dir: str | None = None    # FA3_DEBUG_DIR: write every generated kernel source there
    log_sites: bool = False         # FA3_LOG=1: log each site's decision at WARNING (visible by default) instead of INFO

    def validate(self) -> "Config":
        if self.kernel not in KERNELS:
            raise ValueError(f"fa3 option kernel={self.kernel!r}: expected one of {KERNELS}")
        if not isinstance(self.enabled, bool) or not isinstance(self.log_sites, bool):
            raise ValueError("fa3 options enabled / log_sites must be booleans")
        return self

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
    ).validate()
