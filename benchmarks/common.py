"""Helpers shared by the throughput benchmarks: devices, timing, summaries, machine description,
synthetic JPEG folders and the results files the README quotes.

Benchmarks never assert on timings. They measure a subject against a baseline in the same process,
interleaved (baseline, subject, baseline, subject, ...), and report the median of the paired ratios:
the machines they run on are shared and noisy, so absolute images/s only describe that moment.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
JPEG_QUALITY = 90  # synthetic images: a typical web/ImageNet JPEG quality
SYNTHETIC_BLOCKS = 8  # synthetic images: a smooth 8x8 random field upsampled, plus noise (not pure noise,
SYNTHETIC_NOISE = 12.0  # which compresses and decodes unlike photos)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ devices


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a timer read afterwards covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(seconds, fn()) with the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------------------ statistics


def summarize(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """{"median", "min", "max", "n", "values"} of a list of measurements (rounded for the JSON)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
        "values": [round(v, digits) for v in values],
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ------------------------------------------------------------------------------------------ machine


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (runnable processes; compare with the CPU count)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: CPUs, threads, library versions, accelerator, current load."""
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        "device": str(device),
        "load_average_at_start": load_average(),
    }
    for module in ("open_clip", "timm", "torchvision", "PIL"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def command_line() -> str:
    """How this result was produced, as a command to paste (relative to the repository root)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        script_name = str(script)
    return shlex.join(["python", script_name, *sys.argv[1:]])


def set_threads(threads: int | None) -> None:
    """torch intra-op threads for the main process (DataLoader workers use 1 each, torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ results


def write_results(path: Path, benchmark: str, description: str, setting: str, entry: dict[str, Any]) -> None:
    """Store `entry` under `runs[setting]` in the JSON file at `path`, keeping the other settings' runs.

    Each run records its own command, time and machine, so entries measured at different moments
    are never mixed into one ratio. Written atomically (temp file + os.replace)."""
    document: dict[str, Any] = {"benchmark": benchmark, "description": description, "runs": {}}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            if isinstance(previous.get("runs"), dict):
                document["runs"] = previous["runs"]
        except (json.JSONDecodeError, AttributeError):
            pass
    document["runs"][setting] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temp, path)


def timestamp() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------------------ images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _write_one_jpeg(job: tuple[Path, int, int, int]) -> Path:
    """Worker of write_jpeg_folder: one image from its own seed (so the result does not depend on the
    number of processes)."""
    from PIL import Image

    path, height, width, seed = job
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(SYNTHETIC_BLOCKS, SYNTHETIC_BLOCKS, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    image += rng.normal(0.0, SYNTHETIC_NOISE, size=image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)
    return path


def write_jpeg_folder(
    root: Path, count: int, size: int, num_classes: int, seed: int = 0, *, jitter: float = 0.0, processes: int = 1
) -> list[Path]:
    """`count` deterministic synthetic RGB JPEGs in `root/class_XX/`, `size` x `size` px, or with each side
    drawn uniformly from size * [1 - jitter, 1 + jitter] (ImageNet's photos vary in size and aspect), written
    by `processes` processes.

    Each image is a smooth random colour field (an 8x8 random grid upsampled bicubically) plus mild
    pixel noise: it compresses and decodes like a photo of that size, unlike white noise."""
    rng = np.random.default_rng(seed)
    jobs = []
    for index in range(count):
        folder = root / f"class_{index % num_classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (
            (size, size) if jitter <= 0
            else tuple(int(round(size * f)) for f in rng.uniform(1 - jitter, 1 + jitter, size=2))
        )
        jobs.append((folder / f"{index:06d}.jpg", height, width, seed * 1_000_003 + index))
    if processes <= 1:
        return [_write_one_jpeg(job) for job in jobs]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(_write_one_jpeg, jobs, chunksize=max(1, count // (4 * processes)))


def image_files(root: Path, limit: int | None = None) -> list[Path]:
    """Image files under `root` (recursive, sorted), at most `limit`."""
    if not root.is_dir():
        raise SystemExit(f"--data {str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--data {str(root)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit else files


def benchmark_images(
    data: str | None, count: int, size: int, num_classes: int, workdir: Path, *, jitter: float = 0.0,
    processes: int = 1,
) -> tuple[list[Path], str]:
    """The images to benchmark on: the first `count` files under `data`, or synthetic JPEGs written to
    `workdir` (see write_jpeg_folder). Returns (paths, description)."""
    if data:
        paths = image_files(Path(data), count)
        return paths, f"{len(paths)} images from {data}"
    paths = write_jpeg_folder(workdir / "images", count, size, num_classes, jitter=jitter, processes=processes)
    shape = f"{size}x{size}" if jitter <= 0 else f"{size} px +-{round(100 * jitter)}% per side"
    return paths, f"{count} synthetic {shape} JPEGs (quality {JPEG_QUALITY})"


def table_from_paths(paths: Sequence[Path], labels: np.ndarray, num_classes: int):
    """A SampleTable over image files (keys: paths relative to their common parent)."""
    from zeroshot_adapt.data.base import SampleTable, fingerprint_of
    from zeroshot_adapt.data.sources import FileImageLoader

    base = Path(os.path.commonpath([str(p.parent) for p in paths]))
    keys = [p.relative_to(base).as_posix() for p in paths]
    return SampleTable(
        dataset="benchmark",
        split="train",
        keys=keys,
        labels=np.asarray(labels, np.int64),
        class_names=[f"class {i}" for i in range(num_classes)],
        load_image=FileImageLoader([str(p) for p in paths]),
        fingerprint=fingerprint_of(keys),
    )


def default_processes() -> int:
    """Usable CPUs (for writing synthetic images)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def scratch_dir(parent: str | None) -> Path:
    """A fresh temporary directory (under `parent` when given) for images, caches and run folders."""
    return Path(tempfile.mkdtemp(prefix="zsa-bench-", dir=parent))
