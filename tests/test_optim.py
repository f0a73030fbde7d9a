"""The trainer's AdamW (training/loop.py `adamw`): the fused kernel where torch has one, checked against torch's
plain per-tensor loop, and the plain loop wherever the fused kernel cannot run."""
import pytest
import torch

from posttrain.training.loop import adamw, make_optimizer
from posttrain.recipe.schema import OptimConfig


def _trained(fused: bool | None, dtype=torch.float32) -> list[torch.Tensor]:
    """Parameters after 20 AdamW steps (weight decay, a changing lr) on seeded gradients."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in ((64, 32), (32,), (7, 3, 5))]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = adamw(params, **kw) if fused is None else torch.optim.AdamW(params, fused=fused or None, **kw)
    for step in range(20):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        opt.param_groups[0]["lr"] = 1e-2 * (1 - step / 40)
        opt.step()
    return [p.detach().clone() for p in params]


def test_the_trainers_adamw_is_fused_and_equals_the_plain_loop():
    opt = make_optimizer(torch.nn.Linear(4, 4), OptimConfig(lr=1e-3))
    assert opt.defaults["fused"] is True
    plain, ours = _trained(False), _trained(None)
    start = torch.randn((64, 32), generator=torch.Generator().manual_seed(0))
    assert (ours[0] - start).abs().max() > 0.05  # the steps moved the weights
    for a, b in zip(plain, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6)  # float32 rounding, not a different update


def test_float64_fused_equals_the_plain_loop_to_rounding():
    for a, b in zip(_trained(False, torch.float64), _trained(None, torch.float64)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("param", [
    torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False),  # not floating
    torch.nn.Parameter(torch.zeros(3, device="meta")),  # a device with no fused kernel
])
def test_the_plain_loop_where_the_fused_kernel_cannot_run(param):
    assert adamw([param], lr=1e-3).defaults["fused"] is None


def test_fsdp_recipes_resolve_to_the_per_tensor_loop_unless_told():
    """A shard's fused step rounds apart from the whole tensor's, so a sharded run's checkpoint would not resume
    exactly on one rank (tests/test_distributed.py): under fsdp the default is the loop."""
    from posttrain.recipe import load_recipe

    stage = {"method": "sft", "data": {"path": "x.jsonl"}}
    fsdp = {"model": "m", "distributed": {"strategy": "fsdp"}, "stages": [stage, {**stage, "name": "b",
                                                                                  "optim": {"fused": True}}]}
    assert [s.optim.fused for s in load_recipe(fsdp).stages] == [False, True]
    assert load_recipe({"model": "m", "stages": [stage]}).stages[0].optim.fused is None
