"""Throughput of the teacher's prediction-cache build against a bare forward pass of the same model.

Subject: the real build, ``build_cache`` + ``predict_indices`` (CPU pipeline: DataLoader workers decode JPEGs
with PIL and apply CLIP's eval preprocessing) or ``predict_indices_device`` (device pipeline: workers read
the files, the device decodes the batch with ``torchvision.io.decode_jpeg`` and preprocesses it with tensor
ops while the previous batch encodes), as ``pipeline._build_teacher_cache`` runs it; zero-shot logits and
max-softmax are computed, shards are written (atomic, fsync'd) and merged into the cache. Swept over
``--pipeline``, ``--workers`` and ``--shard-size``.

Baseline, same process, interleaved with every subject run: ``encode_image`` + normalize + zero-shot
logits + softmax/argmax on tensors that were decoded and preprocessed beforehand and sit in memory
(on the device), in batches of the same size, same precision and memory format: the most the model itself
can do.

ratio = subject images/s / baseline images/s, paired per repeat (baseline runs right before and after
each subject run), median over repeats. The per-phase breakdown (ms per image, worker-less, per pipeline):

- read: the file read (both pipelines' workers do it);
- decode: PIL decode in a worker (CPU pipeline) or the batched device decode (device pipeline);
- preprocess: CLIP's eval resize / crop / normalize (PIL in a worker, or tensor ops on the device);
- transfer: host-to-device copy of the preprocessed float batch (CPU pipeline) or of the encoded bytes
  (device pipeline; the decode itself reads them from pinned host memory);
- forward: the bare model time per image (the baseline);
- write + merge: ``build_cache`` total minus the time inside ``compute``.

The teacher's weights are random (``pretrained="none"``; no downloads) and its classifier is a random
unit-norm [D, C] matrix: neither changes the cost of a build, and the text tower runs once per build,
outside what is measured here.

CPU-sized default (tiny teacher, 1000 synthetic 224-px JPEGs, both pipelines at 0, 1 and 2 workers)::

    python benchmarks/cache_throughput.py --threads 1

GPU (RN50 at 224 px, the paper's teacher, ImageNet-like JPEG sizes; see gpu.sh)::

    python benchmarks/cache_throughput.py --model RN50-quickgelu --images 8192 --source-size 400 \
        --size-jitter 0.25 --batch-size 256 --workers 4 15 --pipeline cpu device --precision fp16 --channels-last

Writes ``benchmarks/results/cache_throughput.json`` (``runs[<setting>]``; other settings are kept).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    RESULTS_DIR,
    benchmark_images,
    command_line,
    default_processes,
    load_average,
    machine_info,
    median,
    resolve_device,
    scratch_dir,
    set_threads,
    summarize,
    synchronize,
    table_from_paths,
    timestamp,
    write_results,
)

from zeroshot_adapt.cache import build_cache
from zeroshot_adapt.config import TeacherConfig
from zeroshot_adapt.data.datasets import TableDataset
from zeroshot_adapt.data.device import EncodedItems, TensorPreprocess, decode_images
from zeroshot_adapt.demo.tiny_clip import register_tiny_clip
from zeroshot_adapt.models.acceleration import inference_autocast, prepare_module
from zeroshot_adapt.teacher.classifier import zeroshot_logits
from zeroshot_adapt.teacher.clip import ClipModel, load_clip
from zeroshot_adapt.teacher.predict import predict_indices, predict_indices_device

RESULTS_PATH = RESULTS_DIR / "cache_throughput.json"
DESCRIPTION = (
    "images/s of the full teacher cache build (build_cache + predict_indices (CPU pipeline: workers decode) or "
    "predict_indices_device (device pipeline: the device decodes and preprocesses batches); CLIP encode_image, "
    "zero-shot logits, shard writes, merge) vs a bare forward pass of the same model on pre-decoded in-memory "
    "tensors, same process, interleaved; ratio = build / bare, median of paired repeats"
)
PIPELINES = {"cpu": predict_indices, "device": predict_indices_device}
PHASE_SAMPLE = 256  # images in the worker-less per-phase pass
GOAL_RATIO = 0.9
SMALL_SHARD = 256  # default sweep: the project's shard size and one batch per shard (worst case for restarts)
MAX_PRELOAD_BYTES = 2 << 30  # keep at most this much of pre-decoded tensors for the baseline (then cycle)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    teacher = TeacherConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="zsa-tiny-digits", help="open_clip model name (random weights)")
    parser.add_argument("--images", type=int, default=1000, help="images per build")
    parser.add_argument("--source-size", type=int, default=224, help="side of the synthetic JPEGs (px)")
    parser.add_argument("--data", default=None, help="use the first --images files of this image folder instead")
    parser.add_argument("--batch-size", type=int, default=teacher.batch_size)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to sweep")
    parser.add_argument(
        "--shard-size", type=int, nargs="+", default=[teacher.shard_size, SMALL_SHARD],
        help="samples per cache shard to sweep (predict_indices starts new workers for every shard)",
    )
    parser.add_argument("--size-jitter", type=float, default=0.0,
                        help="synthetic JPEG sides drawn from size * [1 - j, 1 + j] (ImageNet-like variety)")
    parser.add_argument("--pipeline", nargs="+", default=["cpu", "device"], choices=sorted(PIPELINES),
                        help="input pipelines to sweep (data.pipeline)")
    parser.add_argument("--precision", default=teacher.precision, choices=("fp16", "bf16", "fp32"),
                        help="teacher autocast on CUDA (teacher.precision)")
    parser.add_argument("--channels-last", action="store_true", help="teacher.channels_last")
    parser.add_argument("--compile", action="store_true", help="teacher.compile (torch.compile the image tower)")
    parser.add_argument("--classes", type=int, default=10, help="zero-shot classes (width of the logits)")
    parser.add_argument("--repeats", type=int, default=5, help="bracketed builds per setting")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    parser.add_argument("--tmp-dir", default=None, help="where the images and caches are written (default: $TMPDIR)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    for name in ("images", "batch_size", "repeats", "classes", "source_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.workers) < 0 or min(args.shard_size) < 1:
        parser.error("--workers must be >= 0 and --shard-size >= 1")
    return args


# ------------------------------------------------------------------------------------------ pieces


def image_side(clip: ClipModel) -> int:
    size = clip.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def random_classifier(clip: ClipModel, num_classes: int, device: torch.device) -> torch.Tensor:
    """A unit-norm [D, C] zero-shot classifier (random: the weights are random too)."""
    side = image_side(clip)
    with torch.no_grad():
        dim = clip.model.encode_image(torch.zeros(1, 3, side, side, device=device)).shape[-1]
    generator = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(dim, num_classes, generator=generator), dim=0).to(device)


def decode_pass(dataset: TableDataset, keep: int) -> tuple[list[float], list[torch.Tensor]]:
    """Decode + preprocess every item in this process (no workers). Returns the per-image seconds and
    the first `keep` tensors."""
    seconds, tensors = [], []
    for position in range(len(dataset)):
        start = time.perf_counter()
        image = dataset[position]["image"]
        seconds.append(time.perf_counter() - start)
        if position < keep:
            tensors.append(image)
    return seconds, tensors


def make_batches(
    tensors: list[torch.Tensor], batch_size: int, device: torch.device, channels_last: bool = False
) -> list[torch.Tensor]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.stack(tensors[i : i + batch_size]).to(device).contiguous(memory_format=memory_format)
            for i in range(0, len(tensors), batch_size)]


@torch.no_grad()
def bare_forward(
    clip: ClipModel, classifier: torch.Tensor, batches: list[torch.Tensor], num_images: int, batch_size: int,
    device: torch.device, precision: str = "fp16",
) -> float:
    """Seconds for `num_images` images through encode_image + zero-shot logits + max-softmax, in batches of
    `batch_size` cycled from the pre-decoded `batches`; the same math (and autocast) as predict_indices."""
    scale = clip.logit_scale
    synchronize(device)
    start = time.perf_counter()
    done, which = 0, 0
    while done < num_images:
        images = batches[which % len(batches)]
        take = min(len(images), num_images - done)
        images = images[:take]
        with inference_autocast(device, precision):
            features = clip.model.encode_image(images)
        features = F.normalize(features.float(), dim=-1)
        logits = zeroshot_logits(features, classifier, scale)
        logits.softmax(dim=-1).max(dim=-1)
        done += take
        which += 1
    synchronize(device)
    return time.perf_counter() - start


def cache_build(
    clip: ClipModel, classifier: torch.Tensor, table, *, batch_size: int, workers: int, shard_size: int,
    device: torch.device, root: Path, tag: str, pipeline: str = "cpu", precision: str = "fp16",
) -> dict[str, float]:
    """One complete cache build in a fresh directory; {"total_s", "compute_s", "write_merge_s"}."""
    compute_seconds = 0.0
    predict = PIPELINES[pipeline]

    def compute(indices: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal compute_seconds
        start = time.perf_counter()
        arrays = predict(
            clip, classifier, table, indices, batch_size=batch_size, num_workers=workers, device=device,
            precision=precision,
        )
        compute_seconds += time.perf_counter() - start
        return arrays

    identity = {"benchmark": "cache_throughput", "run": tag}
    synchronize(device)
    start = time.perf_counter()
    build_cache(root, identity, list(table.keys), compute, shard_size=shard_size, progress=False)
    total = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return {"total_s": total, "compute_s": compute_seconds, "write_merge_s": total - compute_seconds}


@torch.no_grad()
def phase_breakdown(
    clip: ClipModel, table, pipeline: str, *, batch_size: int, device: torch.device, channels_last: bool,
) -> dict[str, float]:
    """ms per image of read / decode / preprocess / transfer for one pipeline, worker-less, on the first
    PHASE_SAMPLE images in batches of `batch_size` (the device is synchronized around each phase)."""
    from zeroshot_adapt.data.sources import decode_image

    items = EncodedItems(table, np.arange(min(len(table), PHASE_SAMPLE)))
    paths = [table.load_image.paths[int(i)] for i in items.indices]
    preprocess = TensorPreprocess.from_transform(clip.preprocess)
    totals = {"read": 0.0, "decode": 0.0, "preprocess": 0.0, "transfer": 0.0}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        t0 = time.perf_counter()
        if pipeline == "cpu":
            raw = [Path(p).read_bytes() for p in chunk]
            t1 = time.perf_counter()
            images = [decode_image(data, name) for data, name in zip(raw, chunk, strict=True)]
            t2 = time.perf_counter()
            batch = torch.stack([clip.preprocess(image) for image in images])
            t3 = time.perf_counter()
            batch.to(device)
            synchronize(device)
            t4 = time.perf_counter()
            totals["read"] += t1 - t0
            totals["decode"] += t2 - t1
            totals["preprocess"] += t3 - t2
            totals["transfer"] += t4 - t3
        else:
            encoded = [items[i]["image"] for i in range(start, start + len(chunk))]  # read + header
            t1 = time.perf_counter()
            for item in encoded:  # what decode_jpeg(device="cuda") copies: the encoded bytes
                if item.kind == "jpeg":
                    torch.frombuffer(bytearray(item.data), dtype=torch.uint8).to(device)
            synchronize(device)
            t2 = time.perf_counter()
            decoded = decode_images(encoded, device)  # (copies the bytes again: transfer is counted twice)
            synchronize(device)
            t3 = time.perf_counter()
            preprocess(decoded.images, channels_last=channels_last)
            synchronize(device)
            t4 = time.perf_counter()
            totals["read"] += t1 - t0
            totals["transfer"] += t2 - t1
            totals["decode"] += t3 - t2
            totals["preprocess"] += t4 - t3
    return {name: round(1e3 * value / len(paths), 4) for name, value in totals.items()}


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    set_threads(args.threads)
    register_tiny_clip()
    machine = machine_info(device)
    workdir = scratch_dir(args.tmp_dir)
    try:
        paths, image_source = benchmark_images(args.data, args.images, args.source_size, args.classes, workdir,
                                               jitter=args.size_jitter, processes=default_processes())
        num_images = len(paths)
        labels = np.arange(num_images) % args.classes
        table = table_from_paths(paths, labels, args.classes)
        clip = load_clip(args.model, "none", device=device)
        prepare_module(clip.model.visual, channels_last=args.channels_last, compile=args.compile)
        classifier = random_classifier(clip, args.classes, device)
        side = image_side(clip)
        print(f"{args.model} at {side}px on {device}; {image_source}; batch {args.batch_size}", flush=True)

        # Worker-less decode pass: the per-image cost the workers must hide, and the baseline's tensors.
        dataset = TableDataset(table, clip.preprocess)
        per_tensor = 3 * side * side * 4
        keep = max(args.batch_size, min(num_images, MAX_PRELOAD_BYTES // per_tensor))
        decode_seconds, tensors = decode_pass(dataset, keep)
        batches = make_batches(tensors, args.batch_size, device, args.channels_last)
        del tensors
        decode_ms = 1e3 * median(decode_seconds)
        decode_mean_ms = 1e3 * float(np.mean(decode_seconds))
        print(f"decode + preprocess, no workers: {decode_ms:.2f} ms/image (median), {decode_mean_ms:.2f} mean")

        # Warm-up: the model (allocator, kernels) and one small build (imports in the workers' parent).
        forward = (clip, classifier, batches)
        bare_forward(*forward, min(num_images, 2 * args.batch_size), args.batch_size, device, args.precision)
        warm = table.subset(np.arange(min(num_images, args.batch_size)))
        for pipeline in args.pipeline:
            cache_build(clip, classifier, warm, batch_size=args.batch_size, workers=0, shard_size=args.batch_size,
                        device=device, root=workdir / "cache-warmup", tag=f"warmup-{pipeline}", pipeline=pipeline,
                        precision=args.precision)
        phases = {
            pipeline: phase_breakdown(clip, table, pipeline, batch_size=args.batch_size, device=device,
                                      channels_last=args.channels_last)
            for pipeline in args.pipeline
        }
        print(f"per-phase ms per image (worker-less): {phases}", flush=True)

        # Every build is bracketed by two bare passes; its ratio uses their mean (drift-robust pairing).
        settings = [(p, w, s) for s in args.shard_size for p in args.pipeline for w in args.workers]
        subject: dict[tuple[str, int, int], dict[str, list[float]]] = {
            key: {"total_s": [], "compute_s": [], "write_merge_s": [], "ratio": []} for key in settings
        }
        baseline_s = [bare_forward(*forward, num_images, args.batch_size, device, args.precision)]
        for repeat in range(args.repeats):
            for pipeline, workers, shard_size in settings:
                build = cache_build(
                    clip, classifier, table, batch_size=args.batch_size, workers=workers, shard_size=shard_size,
                    device=device, root=workdir / "cache", tag=f"{repeat}-{pipeline}-{workers}-{shard_size}",
                    pipeline=pipeline, precision=args.precision,
                )
                baseline_s.append(bare_forward(*forward, num_images, args.batch_size, device, args.precision))
                bare = (baseline_s[-2] + baseline_s[-1]) / 2
                for name, value in build.items():
                    subject[(pipeline, workers, shard_size)][name].append(value)
                subject[(pipeline, workers, shard_size)]["ratio"].append(bare / build["total_s"])
                print(
                    f"repeat {repeat}: {pipeline} pipeline, workers {workers}, shard {shard_size}: build "
                    f"{num_images / build['total_s']:.1f} img/s, bare {num_images / bare:.1f} img/s, "
                    f"ratio {bare / build['total_s']:.3f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    model_ms = 1e3 * median(baseline_s) / num_images
    write_merge_ms = 1e3 * median([median(v["write_merge_s"]) for v in subject.values()]) / num_images
    builds = []
    for (pipeline, workers, shard_size), values in subject.items():
        shards = math.ceil(num_images / shard_size)
        builds.append({
            "pipeline": pipeline,
            "workers": workers,
            "shard_size": shard_size,
            "shards": shards,
            "images_per_s": summarize([num_images / t for t in values["total_s"]], 2),
            "ratio_to_bare": summarize(values["ratio"], 3),
            "total_s": summarize(values["total_s"], 3),
            "compute_s": summarize(values["compute_s"], 3),
            "write_merge_s": summarize(values["write_merge_s"], 3),
        })
    machine["load_average_at_end"] = load_average()
    workers_to_hide_decode = math.ceil(decode_ms / model_ms) if model_ms > 0 else None
    return {
        "command": command_line(),
        "measured_at": timestamp(),
        "machine": machine,
        "settings": {
            "model": args.model,
            "weights": "random (pretrained='none')",
            "model_input_px": side,
            "images": num_images,
            "image_source": image_source,
            "batch_size": args.batch_size,
            "classes": args.classes,
            "repeats": args.repeats,
            "baseline_tensors_in_memory": min(num_images, keep),
            "pipelines": list(args.pipeline),
            "precision_on_cuda": args.precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
        },
        "phases_ms_per_image": {
            pipeline: {**values, "forward": round(model_ms, 4), "write_merge": round(write_merge_ms, 4)}
            for pipeline, values in phases.items()
        },
        "breakdown_ms_per_image": {
            "decode_preprocess_no_workers": round(decode_ms, 3),
            "decode_preprocess_no_workers_mean": round(decode_mean_ms, 3),
            "model_bare_forward": round(model_ms, 3),
            "write_merge": round(write_merge_ms, 4),
        },
        # What the build would reach with decoding done serially in the main process and nothing
        # overlapped: model / (model + mean decode + write/merge). Workers can only beat it with free cores.
        "ratio_estimate_no_overlap": round(model_ms / (model_ms + decode_mean_ms + write_merge_ms), 3),
        "bare_forward_images_per_s": summarize([num_images / t for t in baseline_s], 2),
        "builds": builds,
        "goal_ratio": GOAL_RATIO,
        "workers_needed_to_hide_decode_if_cores_were_free": workers_to_hide_decode,
    }


def setting_name(args: argparse.Namespace, device: torch.device) -> str:
    source = "data" if args.data else f"synthetic{args.source_size}" + (f"j{args.size_jitter:g}" if args.size_jitter
                                                                        else "")
    threads = f"/threads{args.threads}" if args.threads else ""
    model_side = "".join(
        flag for flag, on in (("/channels-last", args.channels_last), ("/compile", args.compile)) if on
    )
    precision = f"/{args.precision}" if device.type == "cuda" else ""
    return f"{args.model}/{device.type}/batch{args.batch_size}/{args.images}x{source}{precision}{model_side}{threads}"


def print_table(result: dict[str, Any]) -> None:
    breakdown = result["breakdown_ms_per_image"]
    print(
        f"\nper image: decode+preprocess {breakdown['decode_preprocess_no_workers']:.2f} ms (no workers), "
        f"model {breakdown['model_bare_forward']:.2f} ms, write+merge {breakdown['write_merge']:.3f} ms; "
        f"bare forward {result['bare_forward_images_per_s']['median']:.1f} img/s"
    )
    print(f"ratio if decoding were serial and nothing overlapped: {result['ratio_estimate_no_overlap']:.3f}")
    for pipeline, phases in result["phases_ms_per_image"].items():
        print(f"  {pipeline} pipeline, ms per image: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    print(f"{'pipeline':>8} {'workers':>7} {'shard':>6} {'build img/s':>12} {'ratio':>6} {'write+merge s':>14}")
    for build in result["builds"]:
        print(
            f"{build['pipeline']:>8} {build['workers']:>7} {build['shard_size']:>6} "
            f"{build['images_per_s']['median']:>12.1f} {build['ratio_to_bare']['median']:>6.3f} "
            f"{build['write_merge_s']['median']:>14.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)  # hides open_clip's "no pretrained weights" warning
    args = parse_args(argv)
    result = run(args)
    setting = setting_name(args, resolve_device(args.device))
    write_results(args.output, "cache_throughput", DESCRIPTION, setting, result)
    print_table(result)
    print(f"\nwrote {args.output} (runs[{setting!r}])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
