"""Which torch device and precision a stage runs on, and the torch dtype of a precision name."""

from __future__ import annotations

from latentmill.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str) -> str:
    """ "auto" -> cuda when a GPU is visible, else cpu; any other name checked to be here (an absent GPU is
    an InputError naming --device auto|cpu, not a raw error from deep inside torch)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    fix = "give --device auto (a GPU where there is one, else the CPU) or --device cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, mps); {fix}.") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {device}: no CUDA GPU is visible on this machine; {fix}.")
        if kind.index is not None and kind.index >= count:
            raise InputError(
                f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}); {fix}."
            )
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: Apple's MPS is not available here; {fix}.")
    return device


def resolve_device_precision(device: str, precision: str) -> tuple[str, str]:
    """The device and the precision "auto" stands for: bf16 on CUDA, fp32 elsewhere."""
    device = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return device, precision


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
