"""Model-side speed settings shared by the CLIP teacher (cache build) and the student: channels-last memory
format, autocast precision and ``torch.compile``.

- channels-last: convolutions on NHWC tensors use the faster tensor-core kernels on GPUs; the weights
  are converted in place, inputs follow (the device pipeline produces channels-last batches directly).
- compile: ``nn.Module.compile()`` compiles the module's forward in place, so ``state_dict`` keys, the EMAN
  teacher's copy and checkpoints are unchanged (``torch.compile(module)`` would add an ``_orig_mod.``
  wrapper). The first steps are slower (compilation); on CPU it needs a C++ compiler.
- autocast: the teacher's precision on CUDA (fp16 as before, bf16, or fp32); on CPU the teacher runs in
  fp32. The student's precision is Accelerate's ``optim.mixed_precision`` (``bf16`` recommended on GPUs).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def prepare_module(module: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Convert ``module`` to channels-last and/or compile its forward, in place; returns it."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        module.compile()
    return module


def inference_autocast(device: torch.device | str, precision: str = "fp16") -> contextlib.AbstractContextManager:
    """Autocast for inference on ``device``: ``precision`` (fp16 | bf16 | fp32) on CUDA, none elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)
