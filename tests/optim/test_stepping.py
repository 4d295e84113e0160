"""``take_step``: one step of any optimizer (eigensam's two passes, or a plain torch.optim
step), its non-finite guard, the closure it runs, and the FSDP2 option rules."""

import copy

import pytest
import torch
from conftest import SmallNet, loss_closure
from torch import nn

from eigensam import EigenSAM
from eigensam.hessian.closures import SplitClosure
from eigensam.hessian.hvp import EXACT_UNDER_FSDP2
from eigensam.optim import SAM, take_step
from eigensam.optim.fsdp2 import LOCAL_UNDER_FSDP2, check_fsdp2_options
from eigensam.optim.stepping import step_closure


def test_a_sam_step_is_the_optimizers_own(batch):
    torch.manual_seed(0)
    model = SmallNet(dropout=0.2)
    twin = copy.deepcopy(model)
    opt = EigenSAM(model, torch.optim.SGD, lr=0.1, eig_interval=2, hessian_parts=2)
    ref = EigenSAM(twin, torch.optim.SGD, lr=0.1, eig_interval=2, hessian_parts=2)
    for _ in range(3):
        torch.manual_seed(1)
        loss = take_step(opt, loss_closure(model), batch)
        torch.manual_seed(1)
        expected = ref.step(loss_closure(twin), batch=batch)
        assert torch.equal(loss, expected) and not loss.requires_grad
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_plain_step_is_zero_grad_closure_step(batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = take_step(opt, loss_closure(model), {"x": x, "y": y})  # a dict: keywords
        ref.zero_grad()
        expected = loss_closure(twin)(x, y)
        ref.step()
        assert float(loss) == float(expected.detach()) and loss.grad_fn is None
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_plain_step_refuses_nan_before_stepping(where, batch):
    x, y = batch
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if where == "gradient":
            next(model.parameters()).grad[0, 0] = float("inf")
            return loss
        return loss * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite loss .* weights were left unchanged"):
        take_step(opt, closure)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None


def test_step_closure_is_the_closure_the_step_runs(batch):
    model = SmallNet()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    closure = step_closure(sgd, loss_closure(model), batch)
    assert float(closure().detach()) == float(loss_closure(model)(*batch).detach())
    eigen = EigenSAM(model, torch.optim.SGD, lr=0.1, hessian_parts=4)
    assert isinstance(step_closure(eigen, loss_closure(model), batch), SplitClosure)
    sam = SAM(model, torch.optim.SGD, lr=0.1)
    assert not isinstance(step_closure(sam, loss_closure(model), batch), SplitClosure)


def test_fsdp2_option_rules():
    check_fsdp2_options()  # the defaults run
    check_fsdp2_options(hvp="fd-central")
    for options, message in (
        (dict(sharpness="local"), LOCAL_UNDER_FSDP2),
        (dict(hvp="autograd"), EXACT_UNDER_FSDP2),
    ):
        with pytest.raises(ValueError) as info:
            check_fsdp2_options(**options)
        assert str(info.value) == message
