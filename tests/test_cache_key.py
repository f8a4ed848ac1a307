"""Inductor's caches see fa3-inductor's version (fa3_inductor/cache_key.py): a graph with fa3 ops compiled by a
changed package misses the FX graph cache, an unchanged one hits it, and a user's own post-grad pass still runs
(and still keys, or bypasses, the cache as it would without us)."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache

from fa3_inductor import cache_key


def _site(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v


def _args(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 33, 16, generator=g) for _ in range(3)]


def _compile_counts(fn=_site):
    """(hits, misses, bypasses) of the FX graph cache for one fresh compile of fn, and its output."""
    torch._dynamo.reset()
    counters.clear()
    args = _args()
    out = torch.compile(fn, backend="fa3")(*args)
    torch.testing.assert_close(out, _site(*args), atol=2e-5, rtol=1e-4)
    c = counters["inductor"]
    return c["fxgraph_cache_hit"], c["fxgraph_cache_miss"], c["fxgraph_cache_bypass"]


@pytest.fixture
def graph_cache(monkeypatch):
    monkeypatch.setattr(inductor_config, "fx_graph_cache", True)
    monkeypatch.setattr(inductor_config, "force_disable_caches", False)
    with fresh_cache():
        yield


def test_unchanged_package_hits_changed_misses(graph_cache, monkeypatch):
    assert _compile_counts() == (0, 1, 0)
    assert _compile_counts() == (1, 0, 0)
    monkeypatch.setattr(cache_key, "source_hash", lambda: "another version")
    assert _compile_counts() == (0, 1, 0)


def test_graph_without_sites_is_keyed_as_inductor_keys_it(graph_cache):
    def mlp(x):
        return torch.relu(x @ x.transpose(-1, -2)).sum(-1)

    torch._dynamo.reset()
    counters.clear()
    torch.compile(mlp, backend="fa3")(torch.randn(4, 8))
    torch.compile(mlp, backend="inductor")(torch.randn(4, 8))
    torch._dynamo.reset()
    torch.compile(mlp, backend="inductor")(torch.randn(4, 8))
    # the fa3 compile of a graph with no site put its entry where Inductor's own compile found it
    assert counters["inductor"]["fxgraph_cache_miss"] == 1 and counters["inductor"]["fxgraph_cache_hit"] == 2


class _UserPass(CustomGraphPass):
    def __init__(self, uuid):
        self.calls, self._uuid = 0, uuid

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self._uuid


def test_user_post_grad_pass_runs_and_keys(graph_cache, monkeypatch):
    user = _UserPass("user-v1")
    monkeypatch.setattr(inductor_config, "post_grad_custom_post_pass", user)
    assert _compile_counts() == (0, 1, 0) and user.calls == 1
    assert _compile_counts() == (1, 0, 0)
    user._uuid = "user-v2"
    assert _compile_counts() == (0, 1, 0) and user.calls == 2


def test_user_pass_without_uuid_still_bypasses(graph_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(inductor_config, "post_grad_custom_post_pass", lambda graph: calls.append(graph))
    hits, misses, bypasses = _compile_counts()
    assert (hits, bypasses) == (0, 1) and calls


def test_source_hash_covers_the_subpackages(monkeypatch, tmp_path):
    """A change to a kernels/ source (installed as fa3_inductor.kernels, its own directory when editable) changes
    the hash."""
    import pathlib

    import fa3_inductor.kernels as kernels
    before = cache_key.source_hash()
    assert len(before) == 64
    fake = tmp_path / "kernels"
    fake.mkdir()
    for f in pathlib.Path(kernels.__file__).resolve().parent.glob("*.py"):
        (fake / f.name).write_bytes(f.read_bytes())
    (fake / "program.py").write_text((fake / "program.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(kernels, "__file__", str(fake / "__init__.py"))
    cache_key.source_hash.cache_clear()
    try:
        assert cache_key.source_hash() != before
    finally:
        monkeypatch.undo()
        cache_key.source_hash.cache_clear()
    assert cache_key.source_hash() == before
