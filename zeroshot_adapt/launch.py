"""Process launch checks shared by the cache build and training.

``accelerate launch --num_processes N`` (N > 1) on a machine with fewer than two GPUs and without an
``accelerate config`` file silently starts ONE process: accelerate's launcher only switches to its multi-process
(torchrun) launcher when it finds several GPUs or is given ``--multi_gpu`` (accelerate 1.x,
``commands/launch.py``: ``_validate_launch_command`` sets ``multi_gpu`` only when ``device_count > 1``;
otherwise ``simple_launcher`` runs the script once). That single process sees ``MASTER_PORT`` (set for the
N processes it was asked for) but no ``WORLD_SIZE`` / ``LOCAL_RANK``. We refuse to run in that state instead
of training on 1/N of the requested processes. ``accelerate launch --multi_gpu --num_processes N`` starts N
processes on CPU too (torchrun; with ``Accelerator(cpu=True)`` they use gloo), as does ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from zeroshot_adapt.errors import UserError

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "LOCAL_RANK", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
SIMPLE_LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")  # set by `accelerate launch`


def use_cpu() -> bool:
    """Accelerate's ``cpu`` flag: True without CUDA, so multi-process runs on CPU use gloo (``cpu=False`` on a
    CUDA-less machine would leave a torchrun-launched process undistributed)."""
    return not torch.cuda.is_available()


def check_launch(environ: Mapping[str, str] | None = None) -> None:
    """Raise a UserError when ``accelerate launch`` was asked for several processes but started one (see the
    module docstring)."""
    env = os.environ if environ is None else environ
    launched_by_accelerate = any(name in env for name in SIMPLE_LAUNCHER_VARIABLES)
    if launched_by_accelerate and "MASTER_PORT" in env and not any(name in env for name in WORLD_SIZE_VARIABLES):
        raise UserError(
            "`accelerate launch --num_processes N` started only ONE process: with fewer than 2 GPUs and no "
            "`accelerate config` file, accelerate runs its single-process launcher unless given --multi_gpu. "
            "Use `accelerate launch --multi_gpu --num_processes N ...` (works on CPU: N processes with the gloo "
            "backend) or `torchrun --nproc_per_node N -m zeroshot_adapt.cli ...`; for one process, drop --num_processes"
        )
