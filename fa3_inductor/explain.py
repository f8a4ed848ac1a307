"""fa3_inductor.explain: trace a model or function with Dynamo and report every attention site's decision.

The capture backend runs the matcher on each graph Dynamo produces and then runs the graph eagerly; the report
says what `backend="fa3"` (default mode, no CUDA graphs) would do with the same inputs. The model's graph is
not compiled; on CUDA the measured site choice (site_choice.py) compiles and times each static site's cut-out
graphs, as the backend would (or takes the decision from its cache).
"""

from __future__ import annotations

import torch

from . import config as _config
from .report import Report


def explain(model_or_fn, *args, **kwargs) -> Report:
    if not callable(model_or_fn):
        raise TypeError(f"fa3_inductor.explain needs a module or a function, got {type(model_or_fn).__name__}")
    report = Report()
    cfg = _config.from_env()

    def capture(gm, example_inputs, **_):
        if cfg.enabled:
            from .backend import decide
            report.add(*decide(gm, cfg))
        else:
            report.graphs += 1
        return gm.forward

    compiled = torch.compile(model_or_fn, backend=capture)
    compiled(*args, **kwargs)
    report.log(cfg.log_sites)
    return report
