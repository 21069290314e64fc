"""Precision and the optimiser step every training step shares."""
from contextlib import nullcontext

import torch


class Precision:
    """Autocast and loss scaling at a resolved precision (utils/runtime/config.resolved_precision):
    fp16 with a GradScaler, bf16 without, fp32 without autocast; honoured on CPU too (CPU autocast,
    the same GradScaler path)."""

    def __init__(self, name, device):
        if name not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be resolved to fp16, bf16 or fp32 before it is used, got {name!r}")
        self.name = name
        self.enabled = name != "fp32"
        self.dtype = torch.bfloat16 if name == "bf16" else torch.float16
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()


def optimizer_step(loss, optimizers, precision, group, trained, clip=None):
    """Backward, reduce gradients over the processes, clip, step every optimiser: one training step.

    `trained` lists every parameter that learns; `clip` is (parameters, max_norm) or None.
    Returns the total gradient norm the clipping saw (None without clipping).
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    group.reduce_gradients(trained)
    total_norm = None
    if clip is not None:
        for optimizer in optimizers:
            precision.scaler.unscale_(optimizer)
        total_norm = torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    for optimizer in optimizers:
        precision.scaler.step(optimizer)
    precision.scaler.update()
    return total_norm
