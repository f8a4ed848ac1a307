"""What the backend decided for each attention site: the explain report and the log lines."""

from __future__ import annotations

import dataclasses
import logging

from .patterns.spec import AttentionSpec, Skip

log = logging.getLogger("fa3_inductor")


@dataclasses.dataclass
class SiteDecision:
    site: str
    spelling: str
    summary: str
    decision: str           # "rewritten" or "skipped: <reason>"
    note: str = ""          # rewritten sites with FP8 asked for: the FP8 recipe, or why the site stays 16-bit
    mask: str = ""          # rewritten sites: the mask kind (proven: causal, sliding_window, padding, ...)

    @property
    def reason(self) -> str:
        return self.decision.removeprefix("skipped: ") if self.decision != "rewritten" else ""


@dataclasses.dataclass
class Report:
    sites: list[SiteDecision] = dataclasses.field(default_factory=list)
    graphs: int = 0

    @property
    def rewritten(self) -> int:
        return sum(s.decision == "rewritten" for s in self.sites)

    @property
    def skipped(self) -> list[SiteDecision]:
        return [s for s in self.sites if s.decision != "rewritten"]

    def add(self, specs: list[AttentionSpec], skips: list[Skip], notes: list[str] | None = None) -> None:
        self.graphs += 1
        for s, note in zip(specs, notes or [""] * len(specs)):
            self.sites.append(SiteDecision(s.site, " → ".join(s.spelling),
                                           f"{s.program.describe()}; {s.summary()}", "rewritten", note,
                                           s.mask))
        for s in skips:
            self.sites.append(SiteDecision(s.site, " → ".join(s.spelling), "", f"skipped: {s.reason}"))

    def log(self, loud: bool = False) -> None:
        for s in self.sites:
            log.log(logging.WARNING if loud else logging.INFO, "fa3 %s [%s] %s %s%s", s.decision, s.site, s.spelling,
                    s.summary, f" [{s.note}]" if s.note else "")

    def __str__(self) -> str:
        head = (f"fa3 explain: {self.rewritten} attention site(s) rewritten, {len(self.skipped)} skipped, "
                f"{self.graphs} graph(s)")
        rows = [("site", "spelling found", "spec", "decision")]
        rows += [(s.site, s.spelling, s.summary, s.decision + (f" ({s.note})" if s.note else "")) for s in self.sites]
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(4)]
        lines = [head]
        for n, r in enumerate(rows):
            lines.append(" | ".join(c.ljust(w) if len(c) <= w else c for c, w in zip(r, widths)))
            if n == 0:
                lines.append("-+-".join("-" * w for w in widths))
        return "\n".join(lines)
