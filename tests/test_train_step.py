"""One AdamW training step of tiny HF models compiled with the fa3 rewrite equals the eager step (CPU, fp32).

Llama (causal LM loss on a left-padded batch) goes through Inductor and AOT autograd (backend="fa3"); BERT
(right-padded batch, a projection loss over real tokens) through the rewrite without Inductor ("fa3_eager", the
op's own autograd), which keeps the CPU time down. Models are in train() mode with dropout set to 0 (active dropout
is left to eager by design). Compared: the loss, every parameter's gradient, and the loss after the optimizer
step (which every parameter update feeds into).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
import zoo  # noqa: E402

TOL = 1e-4   # of the scale, as tests/models/test_hf_models.py (fp32 rounding differences are ~1e-7)


def _setup(name, impl):
    model, inputs, _ = zoo.build(name, impl)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if name == "llama":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

        def loss_fn(m):
            return m(**batch, labels=labels, use_cache=False).loss
    else:
        w = torch.randn(*batch["input_ids"].shape, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
        w = w * batch["attention_mask"][..., None]

        def loss_fn(m):
            return (m(**batch).last_hidden_state * w).sum()
    return model, loss_fn


def _step(model, fn, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(fn)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    after = loss_fn(fn).detach()   # with grad mode on: no_grad would compile a second graph
    return loss.detach(), grads, after


def _close(a, b, what, floor=0.0):
    scale = max(b.abs().max().item(), floor, 1e-6)
    err = (a - b).abs().max().item()
    assert err <= TOL * scale, f"{what}: max |fa3 - eager| = {err:.3e}, scale {scale:.3e}"


@pytest.mark.parametrize("name,impl,backend", [("llama", "sdpa", "fa3"), ("bert", "eager", "fa3_eager")])
def test_adamw_step_equals_eager(name, impl, backend):
    torch._dynamo.reset()
    model, loss_fn = _setup(name, impl)
    twin = copy.deepcopy(model)
    ref_loss, ref_grads, ref_after = _step(model, model, loss_fn)
    loss, grads, after = _step(twin, torch.compile(twin, backend=backend), loss_fn)
    _close(loss, ref_loss, f"{name} loss")
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())  # noise-only grads (key bias)
    for n, g in ref_grads.items():
        _close(grads[n], g, f"{name} grad of {n}", floor)
    _close(after, ref_after, f"{name} loss after the AdamW step")
    assert (after - ref_loss).abs() > 10 * TOL * ref_loss.abs(), "the step did not change the loss"
