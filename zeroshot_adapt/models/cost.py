"""Up-front training-cost warnings: a large student on CPU is slow, so say so before training starts.

The estimate is cheap: one forward + backward pass on a batch of BATCH_FOR_TIMING blank images (eval mode,
so BatchNorm statistics are untouched; no random numbers drawn), scaled by the images each step processes.
"""

from __future__ import annotations

import time

import torch
from torch import nn

LARGE_STUDENT_PARAMS = 15_000_000  # above ResNet-18 (11.7M), below ResNet-50 (25.6M)
BATCH_FOR_TIMING = 2
SMALLER_STUDENTS = "--set student.arch=resnet18, or the demo CNN --set student.arch=zsa_cnn_small " \
                   "(with --set data.image_size=32)"


def measure_seconds_per_image(model: nn.Module, image_size: int, batch: int = BATCH_FOR_TIMING) -> float:
    """Seconds of one forward + backward per image, measured once on blank images; leaves the model as it was
    (mode, gradients, BatchNorm statistics)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        images = torch.zeros(batch, 3, image_size, image_size, device=device)
        start = time.perf_counter()
        model(images).float().sum().backward()
        seconds = time.perf_counter() - start
    finally:
        for parameter in model.parameters():
            parameter.grad = None
        model.train(was_training)
    return seconds / batch


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def large_student_message(arch: str, num_params: int, device_type: str, seconds_per_image: float,
                          images_per_step: int, total_steps: int) -> str | None:
    """The warning for a student of `num_params` parameters on `device_type`, or None when there is nothing
    to say (an accelerator, or a student under LARGE_STUDENT_PARAMS).

    Estimated time = seconds_per_image * images_per_step * total_steps (forward + backward of every image a
    step sees; data loading and evaluation come on top)."""
    if device_type != "cpu" or num_params < LARGE_STUDENT_PARAMS:
        return None
    estimate = seconds_per_image * images_per_step * total_steps
    return (f"student {arch} ({num_params / 1e6:.1f}M parameters) is training on the CPU: about "
            f"{_duration(estimate)} for {total_steps} steps of {images_per_step} images "
            f"({seconds_per_image * 1000:.0f} ms per image, measured). A smaller student is much faster: "
            f"{SMALLER_STUDENTS}; or run on a GPU")
