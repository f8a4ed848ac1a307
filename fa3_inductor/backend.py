"""The "fa3" torch.compile backend: rewrite every attention site to the fa3 op, then hand the graph to Inductor.

Registered under the `torch_dynamo_backends` entry point, so `torch.compile(m, backend="fa3")` needs no import.
`options` keys that name fa3 config fields configure us; the rest go to Inductor.
"""

from __future__ import annotations

from . import config as _config
from .patterns.matcher import find_sites
from .report import Report
from .rewrite import apply_spec, finish, inference_only
from .patterns.spec import Skip
from .site_choice import choose
from .site_kernel import note
from .site_size import spec_too_small


def decide(gm, cfg: _config.Config, cuda_graphs: bool = False, inductor_options: dict | None = None):
    """(specs to rewrite, skips, per-spec notes) for gm's attention sites. cuda_graphs: the graph will run under
    CUDA graphs, where host cost does not count (site_size.py, site_choice.py). inductor_options: what the graph
    is compiled with, for the measured choice's compiles of the site as written."""
    found, skips = find_sites(gm)
    specs, measured = [], []
    for spec in found:
        why = spec_too_small(spec, cuda_graphs, cfg.min_flops)
        timing = ""
        if not why:
            why, timing = choose(gm, spec, cfg.kernel, cfg.fp8_arg(), cuda_graphs, cfg.measure_sites,
                                 inductor_options)
        if why:
            skips.append(Skip(spec.site, spec.spelling, why))
        else:
            specs.append(spec)
            measured.append(timing)
    return specs, skips, ["; ".join(x for x in (note(spec, cfg), t) if x) for spec, t in zip(specs, measured)]


def rewrite_graph(gm, cfg: _config.Config, cuda_graphs: bool = False, inductor_options: dict | None = None) -> Report:
    """Find and rewrite the attention sites of gm in place; return what was decided."""
    report = Report()
    if not cfg.enabled:
        return report
    specs, skips, notes = decide(gm, cfg, cuda_graphs, inductor_options)
    infer = inference_only(gm)
    replaced = [apply_spec(gm, spec, cfg.kernel, cfg.fp8_arg(), infer) for spec in specs]
    if specs:
        finish(gm, replaced)
    report.add(specs, skips, notes)
    report.log(cfg.log_sites)
    return report


def fa3_backend(gm, example_inputs, mode=None, options=None):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from . import cache_key

    cfg, inductor_options = _config.from_env().with_options(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    report = rewrite_graph(gm, cfg, cuda_graphs=bool(patches.get("triton.cudagraphs")), inductor_options=patches)
    if report.rewritten:    # the cached code of a graph with fa3 ops depends on this package's version
        patches = cache_key.keyed_patches(patches)
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def fa3_eager_backend(gm, example_inputs, mode=None, options=None):
    """Debugging backend ("fa3_eager"): the same rewrite, then the graph runs eagerly, without Inductor."""
    cfg, _ = _config.from_env().with_options(options)
    rewrite_graph(gm, cfg)
    return gm.forward
