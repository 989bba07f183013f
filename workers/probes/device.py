"""The torch device a probe runs on."""

from __future__ import annotations

import torch

from workers.errors import ProbeError


def resolve_device(name: str) -> torch.device:
    """Parse ``name`` ("cpu", "cuda", "cuda:1", ...) and check that this worker has it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ProbeError(
            f"device {name!r} is not a torch device; pass 'cpu' or 'cuda[:index]'",
            field="device",
            value=name,
        ) from exc
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            error = ProbeError(
                f"device {name!r} is not available on this worker "
                f"({torch.cuda.device_count()} CUDA devices); pass 'cpu' or run on a GPU worker",
                field="device",
                value=name,
            )
            error.permanent = False  # another worker on the same queue may have the device
            raise error
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ProbeError(
            f"device {name!r} is not supported; pass 'cpu' or 'cuda[:index]'",
            field="device",
            value=name,
        )
    return device
