"""fa3-inductor's own code in the key of Inductor's caches.

Inductor's FX graph cache and AOTAutograd's cache key a graph by its code, Inductor's config and the torch /
Triton versions, not by what its custom ops do. A graph with fa3 ops compiled once bakes the op's fake output
strides into the cached wrapper (assert_size_stride) and AOTAutograd's joint graph: after an upgrade of this
package that changes them (the op's output layout, say), a warm cache would serve code that fails its stride
checks, or worse reads the output in the old layout. Inductor's hook for code it cannot see is a custom pass
with a uuid(): the backend installs a post-grad pass that does nothing itself (it runs the user's pass, if
any) and whose uuid is a hash of this package's sources, so a changed package misses the cache once and a
warm unchanged one still hits.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib

from torch._inductor.custom_graph_pass import CustomGraphPass


@functools.lru_cache(1)
def source_hash() -> str:
    """sha256 over the package's Python sources (fa3_inductor with its patterns / kernels subpackages)."""
    from . import kernels, patterns    # their own directories in an editable install (setuptools package-dir)
    h = hashlib.sha256()
    for name, init in (("fa3_inductor", __file__), ("kernels", kernels.__file__), ("patterns", patterns.__file__)):
        for path in sorted(pathlib.Path(init).resolve().parent.glob("*.py")):
            h.update(f"{name}/{path.name}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class KeyedPass(CustomGraphPass):
    """The post-grad custom pass the backend sets: runs `inner` (the user's pass, or None) and keys the cache on
    source_hash() and inner's own uuid. An inner pass Inductor cannot key (no uuid) keeps its effect: the
    cache is bypassed, as it would have been without this wrapper."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        if self.inner is None:
            return ("fa3", source_hash())
        inner = self.inner.uuid() if isinstance(self.inner, CustomGraphPass) else None
        return None if inner is None else ("fa3", source_hash(), inner)


def keyed_patches(patches: dict) -> dict:
    """patches (compile_fx config patches) with the post-grad pass wrapped in a KeyedPass."""
    from torch._inductor import config
    inner = patches.get("post_grad_custom_post_pass", config.post_grad_custom_post_pass)
    if isinstance(inner, KeyedPass):
        return patches
    return {**patches, "post_grad_custom_post_pass": KeyedPass(inner)}
