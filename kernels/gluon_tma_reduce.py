"""TMA bulk reduction (cp.reduce.async.bulk.tensor ... .add) from shared memory into global memory, for Gluon.

Triton 3.6's Gluon exposes TMA loads and stores but not the reduction its builder already has
(`create_async_tma_reduce`, the op `tl` tensor descriptors' atomic_add lower to). The warp-specialized
backward adds each dQ tile into the fp32 accumulator with one of these per warpgroup instead of per-thread
atomics (FlashAttention-3 does the same): the TMA unit streams the tile to L2, where the adds happen. Like a
TMA store it completes in the bulk async group: `tma.store_wait(n)` before the shared buffer is reused.
Pinned to Triton 3.6's internal builder API (the version the GPU image and CI run).
"""

from __future__ import annotations

from triton._C.libtriton import ir
from triton.experimental.gluon.language._core import builtin


@builtin
def async_reduce_add_shared_to_global(tensor_desc, coord, src, _semantic=None):
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)
