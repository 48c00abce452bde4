"""Which torch device and precision a stage runs on, and the torch dtype of a precision name."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str) -> str:
    """ "auto" -> cuda when a GPU is visible, else cpu; any other name as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_precision(device: str, precision: str) -> tuple[str, str]:
    """The device and the precision "auto" stands for: bf16 on CUDA, fp32 elsewhere."""
    device = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return device, precision


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
