"""The shared training step (utils/engine/optim.optimizer_step) under fp16 loss scaling.

On a GPU the official recipe trains under fp16 autocast with a GradScaler. CI has no GPU, so
these tests run the same code with a CPU GradScaler: the scaling, unscaling before clipping
and skipping of overflowing steps are the same code on either device.
"""
import copy

import torch

from utils.engine.optim import Precision, optimizer_step
from utils.runtime.config import resolved_precision
from utils.runtime.distributed import BatchGroup

CPU = torch.device("cpu")
GROUP = BatchGroup(shared=False)  # one process


def scaled_precision(init_scale):
    precision = Precision("fp32", CPU)
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return precision


def test_precision_auto_is_fp32_on_cpu_and_the_others_are_honoured():
    expected = {"auto": (torch.float32, False), "fp32": (torch.float32, False), "fp16": (torch.float16, True),
                "bf16": (torch.bfloat16, False)}
    for name, (dtype, scaled) in expected.items():
        precision = Precision(resolved_precision(name, "cpu"), CPU)
        assert precision.scaler.is_enabled() == scaled, name
        with precision.autocast():
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == dtype, name
    assert resolved_precision("auto", "cuda") == "fp16", "the official precision on a GPU"


def test_loss_scaling_gives_the_unscaled_step_with_clipping():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    inputs = torch.randn(5, 6)
    results = []
    for precision in (Precision("fp32", CPU), scaled_precision(2.0 ** 12)):
        trained = copy.deepcopy(model)
        parameters = list(trained.parameters())
        # Plain SGD is not invariant to the gradient's scale, so a step that clipped the still-scaled
        # gradient, or stepped with it, would land elsewhere.
        optimizer = torch.optim.SGD(parameters, lr=0.1)
        loss = trained(inputs).pow(2).sum()
        optimizer_step(loss, [optimizer], precision, GROUP, parameters, (parameters, 0.5))
        results.append([p.detach().clone() for p in parameters])
    moved = sum((after - before).norm() ** 2 for after, before in zip(results[0], model.parameters(), strict=True))
    torch.testing.assert_close(moved.sqrt(), torch.tensor(0.1 * 0.5))  # the step was clipped to norm 0.5
    for plain, scaled in zip(*results, strict=True):
        torch.testing.assert_close(scaled, plain)


def test_an_overflowing_step_is_skipped_and_the_scale_lowered():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    precision = scaled_precision(2.0 ** 16)
    # A finite loss whose scaled gradient overflows float32, as fp16 gradients overflow on a GPU.
    loss = model(torch.full((2, 4), 1e35)).sum()
    assert torch.isfinite(loss)
    optimizer_step(loss, [optimizer], precision, GROUP, parameters, (parameters, 1.0))
    for p, p0 in zip(parameters, before, strict=True):
        assert torch.equal(p.detach(), p0)
    assert precision.scaler.get_scale() == 2.0 ** 15

    loss = model(torch.ones(2, 4)).sum()  # an ordinary step afterwards goes through
    optimizer_step(loss, [optimizer], precision, GROUP, parameters, (parameters, 1.0))
    assert not torch.equal(parameters[0].detach(), before[0])
