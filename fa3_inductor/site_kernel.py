"""What precision a rewritten site will run in, decided at compile time from Dynamo's fake values: with FP8
asked for, either the FP8 recipe or the reason the site stays 16-bit (for the explain report and the log).

It asks dispatch.select the same question the op asks at run time; shapes that only exist at run time
(dynamic sizes) are not guessed at, and the op logs its own fallback once per reason if it happens then.
"""

from __future__ import annotations

from . import dispatch
from . import config as _config
from .patterns.spec import AttentionSpec
from .rewrite import example_inputs


def note(spec: AttentionSpec, cfg: _config.Config) -> str:
    """"" when FP8 is off; else "fp8 e4m3 ..." or "16-bit: fp8 not possible: <reasons>"."""
    if not cfg.fp8:
        return ""
    recipe = cfg.recipe()
    vals = example_inputs(spec)
    if vals is None:
        return f"{recipe.describe()} (not checked at compile time: no example values)"
    q, k, v, operands = vals
    entry, passed_over = dispatch.select(spec.program, q, k, v, operands, cfg.kernel, recipe)
    if entry.fp8:
        return recipe.describe()
    return f"16-bit {entry.name}: fp8 not possible: {dispatch.fp8_fallback_reason(passed_over)}"
