"""Cycles of one main-loop trip of one consumer warp alone on its SM sub-partition, from the SASS's own control
bits: a rough model to rank softmax variants without a GPU, not a prediction of TFLOPS.

With ping-pong, one consumer warp per sub-partition runs its softmax while the other warpgroup's warp waits for
its GEMMs, so the trip's latency with nothing to overlap it is what the schedule pays twice per key tile pair
(once per warpgroup) when it exceeds the other warpgroup's GEMM time (~512 cycles at D=128 in FP8).

Model: in-order issue, one instruction per cycle at most; each instruction waits for the scoreboards in its
wait mask and then stalls for its stall count (ptxas's encoding of fixed latencies); variable-latency results
set their scoreboard after a fixed guess (MUFU 18 cycles, SHFL 24, other 12), MUFU issues at most every 8
cycles (16 exp2 / clock / SM = 4 per sub-partition: 8 cycles per warp instruction). wgmma waits, mbarrier
waits and global loads cost nothing here (the GEMMs and TMA loads are assumed done: their cost is the
schedule's, not the softmax's).
"""

from __future__ import annotations

import re

MUFU_CYCLES = 8
LATENCY = {"MUFU": 18, "SHFL": 24}
OTHER_LATENCY = 12
FREE = ("LDG", "SYNCS", "WARPGROUP", "BAR", "DEPBAR")


def _control(hi: int) -> tuple[int, int, int, int]:
    """(stall, write scoreboard, read scoreboard, wait mask) of a Volta+ instruction's high 64 bits."""
    return (hi >> 41) & 0xF, (hi >> 46) & 0x7, (hi >> 49) & 0x7, (hi >> 52) & 0x3F


def instructions(sass: str) -> list[tuple[int, str, int]]:
    """(address, text, high 64 bits) of every instruction of a cuobjdump listing."""
    lines = sass.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* 0x[0-9a-f]{16} \*/", line)
        h = re.match(r"\s+/\* 0x([0-9a-f]{16}) \*/", lines[i + 1])
        if m and h:
            out.append((int(m.group(1), 16), m.group(2).strip(), int(h.group(1), 16)))
    return out


def _op(text: str) -> str:
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def trip_cycles(path: list[tuple[str, int]]) -> int:
    """Issue model over one trip: path = [(instruction text, high 64 bits)] in program order."""
    t = 0
    ready = [0] * 6
    mufu_free = 0
    for text, hi in path:
        stall, wb, rb, wait = _control(hi)
        op = _op(text)
        start = max([t] + [ready[b] for b in range(6) if wait >> b & 1])
        if op == "MUFU":
            start = max(start, mufu_free)
            mufu_free = start + MUFU_CYCLES
        if wb < 6:
            lat = 0 if op in FREE or "DEPBAR" in text else LATENCY.get(op, OTHER_LATENCY)
            ready[wb] = max(ready[wb], start + lat)
        if rb < 6:
            ready[rb] = max(ready[rb], start + 2)
        t = start + max(stall, 1)
    return max([t] + ready)


def shared_cycles(path: list[tuple[str, int]], warps: int = 2, trips: int = 8) -> float:
    """Cycles per trip and warp pair when `warps` warps run the trip back to back on one sub-partition (no
    ping-pong: both consumer warpgroups in their softmax at once), sharing the issue slot and the MUFU unit;
    the first warp starts first, the next half a trip later. GEMM waits are free as in trip_cycles: a lower
    bound where the two warps' softmaxes overlap perfectly."""
    stream = path * trips
    pos = [0] * warps
    t_next = [trip_cycles(path) * w // (2 * warps) for w in range(warps)]
    ready = [[0] * 6 for _ in range(warps)]
    mufu_free = 0
    clock = 0
    while any(p < len(stream) for p in pos):
        best = None
        for w in range(warps):
            if pos[w] >= len(stream):
                continue
            text, hi = stream[pos[w]]
            _, _, _, wait = _control(hi)
            start = max([clock, t_next[w]] + [ready[w][b] for b in range(6) if wait >> b & 1])
            if _op(text) == "MUFU":
                start = max(start, mufu_free)
            if best is None or start < best[0]:
                best = (start, w)
        start, w = best
        text, hi = stream[pos[w]]
        stall, wb, rb, _ = _control(hi)
        op = _op(text)
        if op == "MUFU":
            mufu_free = start + MUFU_CYCLES
        if wb < 6:
            lat = 0 if op in FREE or "DEPBAR" in text else LATENCY.get(op, OTHER_LATENCY)
            ready[w][wb] = max(ready[w][wb], start + lat)
        if rb < 6:
            ready[w][rb] = max(ready[w][rb], start + 2)
        t_next[w] = start + max(stall, 1)
        clock = start + 1          # one issue per cycle for the sub-partition
        pos[w] += 1
    return max(t_next) / trips


def _path(sass: str):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from sm90_cross_compile import main_loop_path
    path = main_loop_path(sass)
    if path is None:
        return None
    hi = {a: h for a, _, h in instructions(sass)}
    return [(t, hi[a]) for a, t in path]


def loop_trip_cycles(sass: str) -> int | None:
    """trip_cycles of consumer 0's main loop, unmasked path (sm90_cross_compile.main_loop_path), or None."""
    path = _path(sass)
    return None if path is None else trip_cycles(path)


def loop_shared_cycles(sass: str) -> float | None:
    """shared_cycles of consumer 0's main loop (both consumers' warps on one sub-partition), or None."""
    path = _path(sass)
    return None if path is None else round(shared_cycles(path), 1)
