"""Training-step throughput of ``zeroshot_adapt.train.train`` against a bare forward/backward loop.

Subject: the real loop, unmodified: two DataLoaders (labeled weak views; unlabeled weak + strong views
with RandAugment) over JPEG files through ``SeededItems``/``StepBatchSampler``, with either input pipeline:
``cpu`` (workers decode with PIL and render every view) or ``device`` (workers read the files; the
training device decodes the batch and renders the views with batched tensor ops, the next batch prepared
while the current one computes), the DebiasPL step (student on labeled + strong in one pass, EMAN teacher on
weak under no_grad, class prior, masked CE), backward, SGD + LR schedule, EMAN update, metrics. Its step
time is measured from outside: the algorithm is wrapped so every ``step()`` call records its start time;
the steady-state step time is the mean interval between consecutive starts after ``--warmup-steps``
(this excludes worker start-up and the end-of-run epoch record and checkpoint).

Baseline, same process: the same student and teacher architectures on tensors already in memory (on
the device) with the same batch shapes, memory format and precision: student forward on labeled + strong,
teacher forward on weak under no_grad, cross-entropy (labeled targets + teacher argmax), backward, SGD step.
No data loading, no EMA, no metrics: the most the model itself can do.

ratio = baseline seconds/step / real seconds/step; every real run is bracketed by two baseline runs
and paired with their mean; the median over ``--repeats`` is reported, per (pipeline, workers).

Breakdown, two parts:
- worker side (ms per step if one process did it all; W workers share it): read (file read), decode
  (PIL; device pipeline: none, only the JPEG header), augment (rendering every view + ToTensor/normalize;
  device pipeline: drawing the parameters), from a worker-less pass over the datasets' own code;
- main process, from an instrumented copy of the loop body (``train.py``'s own helpers ``_loader``,
  ``_to_batch``, ``_as_tensor``, ``EpochStats``, the same sampler streams, no prefetch): data wait,
  decode and augment (device pipeline, on the device), transfer (host to device), student forward, teacher
  forward (forward hooks), the rest of the algorithm step, backward, metrics, SGD + schedule, EMAN update;
  the device is synchronized after each phase (only in this copy).

CPU-sized default (about 15 minutes on 2 busy cores: resnet10t at 32 px, small recipe)::

    python benchmarks/train_throughput.py --threads 1

GPU, the paper's setting (ResNet-50 at 224 px, batch 64, mu 5, multi-view, bf16; see gpu.sh)::

    python benchmarks/train_throughput.py --arch resnet50 --image-size 224 --source-size 400 --size-jitter 0.25 \
        --batch-size 64 --mu 5 --multiview --workers 15 --pipeline cpu device --images 4096 --steps 10 \
        --mixed-precision bf16 --channels-last

Writes ``benchmarks/results/train_throughput.json`` (``runs[<setting>]``; other settings are kept).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
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
from torch import nn

from zeroshot_adapt.algorithms import ALGORITHMS
from zeroshot_adapt.config import AlgorithmConfig, OptimConfig, StudentConfig
from zeroshot_adapt.data.augment_ops import sample_view
from zeroshot_adapt.data.datasets import LabeledViews, UnlabeledViews
from zeroshot_adapt.data.device import (
    DeviceViews,
    EncodedLabeledViews,
    EncodedReader,
    EncodedUnlabeledViews,
    decode_images,
)
from zeroshot_adapt.data.sampling import StepBatchSampler
from zeroshot_adapt.data.sources import decode_image
from zeroshot_adapt.models.acceleration import prepare_module
from zeroshot_adapt.models.student import EmanTeacher, create_student
from zeroshot_adapt.schedules import warmup_cosine
from zeroshot_adapt.train import (
    LABELED_STREAM,
    UNLABELED_STREAM,
    EpochStats,
    LoopSettings,
    _as_tensor,
    _loader,
    _to_batch,
)
from zeroshot_adapt.train import train as train_loop

RESULTS_PATH = RESULTS_DIR / "train_throughput.json"
DESCRIPTION = (
    "optimizer steps/s of zeroshot_adapt.train.train (weak/strong views from the CPU pipeline (workers decode and "
    "augment) or the device pipeline (the device decodes and augments batches), DebiasPL step, backward, SGD, "
    "EMAN, metrics) vs a bare forward/backward loop of the same models and batch shapes on in-memory tensors, "
    "same process, interleaved; ratio = real / bare, median of paired repeats; per-phase breakdown from a "
    "worker-less pass (worker side) and an instrumented copy of the loop (main process)"
)
GOAL_RATIO = 0.9
LABELED_FRACTION = 0.5  # share of the images in the labeled (CLIP-confident) set
NO_CHECKPOINTS = 10**9  # checkpoint_every_steps: only the end-of-run checkpoint (outside the timed steps)
MODEL_PHASES = ("student_forward", "teacher_forward", "backward", "optimizer")  # the work the bare loop does too
PHASES = (
    "data_wait", "decode", "augment", "to_device", "student_forward", "teacher_forward", "algorithm_rest",
    "backward", "metrics", "optimizer", "ema_update",
)
WORKER_PHASES = ("read", "decode", "augment")
WORKER_SAMPLE = 8  # items per stream in the worker-less pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    optim = OptimConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet10t", help="timm student architecture (random init)")
    parser.add_argument("--image-size", type=int, default=32, help="student input size (px)")
    parser.add_argument("--source-size", type=int, default=64, help="side of the synthetic JPEGs (px)")
    parser.add_argument("--data", default=None, help="use the first --images files of this image folder instead")
    parser.add_argument("--images", type=int, default=512, help="images in the (unlabeled) training set")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="labeled images per step")
    parser.add_argument("--mu", type=int, default=2, help="unlabeled batch = mu * batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to sweep")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first in every run")
    parser.add_argument("--repeats", type=int, default=5, help="bracketed real runs per --workers value")
    parser.add_argument("--size-jitter", type=float, default=0.0,
                        help="synthetic JPEG sides drawn from size * [1 - j, 1 + j] (ImageNet-like variety)")
    parser.add_argument("--pipeline", nargs="+", default=["cpu", "device"], choices=("cpu", "device"),
                        help="input pipelines to sweep (data.pipeline)")
    parser.add_argument("--multiview", action="store_true", help="two weak + two strong views per image")
    parser.add_argument("--channels-last", action="store_true", help="student.channels_last")
    parser.add_argument("--compile", action="store_true", help="student.compile (slow first steps)")
    parser.add_argument("--algorithm", default="debiaspl", help="registered algorithm name")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--lr", type=float, default=optim.lr)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    parser.add_argument("--tmp-dir", default=None, help="where images and run folders go (default: $TMPDIR)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    for name in ("image_size", "source_size", "images", "classes", "batch_size", "mu", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 1 or min(args.workers) < 0:
        parser.error("--warmup-steps must be >= 1 and --workers >= 0")
    return args


# ------------------------------------------------------------------------------------------ set-up


def make_transforms(image_size: int) -> tuple[Any, str]:
    """The project's weak/strong views, and a description of them for the results file."""
    from zeroshot_adapt.data.transforms import build_transforms

    views = build_transforms(image_size, recipe="auto", hflip=True)
    return views, f"zeroshot_adapt.data.transforms.build_transforms(recipe={views.recipe!r})"


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    accelerator: Any
    datasets: dict[str, tuple[Any, Any]]  # pipeline -> (labeled, unlabeled)
    views: Any  # the Transforms of the recipe
    workdir: Path

    @property
    def num_views(self) -> int:
        return 2 if self.args.multiview else 1

    @property
    def total_steps(self) -> int:
        # +1: the real loop's last step ends with an epoch record and a checkpoint; the timed interval
        # before it ends at that step's start.
        return self.args.warmup_steps + self.args.steps + 1

    def batch_pipeline(self, pipeline: str) -> DeviceViews | None:
        if pipeline == "cpu":
            return None
        return DeviceViews(self.views.spec, self.views.mean, self.views.std, channels_last=self.args.channels_last)

    def models(self) -> tuple[nn.Module, EmanTeacher]:
        torch.manual_seed(0)
        student = create_student(self.args.arch, self.args.classes, image_size=self.args.image_size)
        prepare_module(student, channels_last=self.args.channels_last)
        ema = EmanTeacher(student)
        for model in (student, ema.module):
            prepare_module(model, compile=self.args.compile)
        return student, ema

    def algorithm(self):
        config = AlgorithmConfig(name=self.args.algorithm, multiview=self.args.multiview)
        return ALGORITHMS.get(self.args.algorithm)(self.args.classes, config)

    def optimizer(self, student: nn.Module) -> torch.optim.Optimizer:
        optim = OptimConfig()
        return torch.optim.SGD(
            student.parameters(), lr=self.args.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
            nesterov=optim.nesterov,
        )


class StepClock:
    """Wraps an algorithm and records when each ``step()`` starts (the loop is otherwise untouched)."""

    def __init__(self, algorithm) -> None:
        self.algorithm = algorithm
        self.starts: list[float] = []

    def step(self, batch, *, student, teacher):
        self.starts.append(time.perf_counter())
        return self.algorithm.step(batch, student=student, teacher=teacher)

    def state_dict(self) -> dict[str, Any]:
        return self.algorithm.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state)

    def to(self, device):
        self.algorithm.to(device)
        return self


# ------------------------------------------------------------------------------------------ the three loops


def real_loop(ctx: Context, pipeline: str, workers: int) -> dict[str, float]:
    """Seconds per step of zeroshot_adapt.train.train in steady state (mean over the timed steps)."""
    args = ctx.args
    student, ema = ctx.models()
    clock = StepClock(ctx.algorithm())
    total = ctx.total_steps
    settings = LoopSettings(
        total_steps=total, steps_per_epoch=total, warmup_steps=0, batch_size=args.batch_size, mu=args.mu,
        lr=args.lr, checkpoint_every_steps=NO_CHECKPOINTS, ema_momentum=StudentConfig().ema_momentum,
        num_workers=workers, seed=0,
    )
    run_dir = ctx.workdir / f"run-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    labeled, unlabeled = ctx.datasets[pipeline]
    result = train_loop(
        accelerator=ctx.accelerator, student=student, ema=ema, algorithm=clock, labeled=labeled,
        unlabeled=unlabeled, settings=settings, num_classes=args.classes, run_dir=run_dir,
        batch_pipeline=ctx.batch_pipeline(pipeline),
    )
    call_seconds = time.perf_counter() - start
    ctx.accelerator.free_memory()
    shutil.rmtree(run_dir, ignore_errors=True)
    intervals = np.diff(clock.starts)[args.warmup_steps :]
    return {
        "step_s": float(intervals.mean()),
        "call_s": call_seconds,  # whole train() call: worker start-up, warm-up, end-of-run record + checkpoint
        "loop_reported_seconds_per_step": float(result.history[-1]["seconds_per_step"]),
    }


def bare_loop(ctx: Context) -> float:
    """Seconds per step of forward/backward/SGD on in-memory tensors of the real batch shapes."""
    args, device, accelerator = ctx.args, ctx.device, ctx.accelerator
    student, teacher = ctx.models()
    optimizer = ctx.optimizer(student)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(device)
    student.train()
    generator = torch.Generator().manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    unlabeled = args.batch_size * args.mu
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def images(count: int) -> torch.Tensor:
        return torch.randn(count, *shape, generator=generator).to(device).contiguous(memory_format=memory_format)

    labeled_images = images(args.batch_size)
    strong = images(unlabeled * ctx.num_views)
    weak = images(unlabeled * ctx.num_views)
    targets = torch.randint(0, args.classes, (args.batch_size,), generator=generator).to(device)
    lambda_u = AlgorithmConfig().lambda_u
    start = 0.0
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            synchronize(device)
            start = time.perf_counter()
        with accelerator.autocast():
            logits = student(torch.cat([labeled_images, strong]))
            with torch.no_grad():
                pseudo = teacher(weak).argmax(dim=1)
            loss = F.cross_entropy(logits[: args.batch_size], targets) + lambda_u * F.cross_entropy(
                logits[args.batch_size :], pseudo
            )  # (multi-view: both views' logits against both views' labels, same shapes as the real step)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    accelerator.free_memory()
    return seconds


class PhaseTimer:
    """Forward hooks that add a module's forward time (device-synchronized) to `totals[name]`."""

    def __init__(self, device: torch.device, totals: dict[str, float]) -> None:
        self.device, self.totals = device, totals
        self._started: dict[str, float] = {}
        self.handles: list[Any] = []

    def watch(self, module: nn.Module, name: str) -> None:
        def before(_module, _inputs):
            synchronize(self.device)
            self._started[name] = time.perf_counter()

        def after(_module, _inputs, _output):
            synchronize(self.device)
            self.totals[name] += time.perf_counter() - self._started.pop(name)

        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class TimedDeviceViews(DeviceViews):
    """DeviceViews that add their decode and render (+ normalize) seconds to `totals` (device synchronized)."""

    def __init__(self, views: DeviceViews, totals: dict[str, float]) -> None:
        super().__init__(views.recipe, views.mean, views.std, channels_last=views.channels_last)
        self.totals = totals

    def decode(self, encoded, device):
        synchronize(device)
        start = time.perf_counter()
        decoded = decode_images(encoded, device)
        synchronize(device)
        self.totals["decode"] += time.perf_counter() - start
        return decoded

    def __call__(self, labeled, unlabeled, device):
        synchronize(device)
        start = time.perf_counter()
        batch = super().__call__(labeled, unlabeled, device)  # decode (timed above) + render + normalize
        synchronize(device)
        self.totals["augment"] += time.perf_counter() - start - self.totals["decode"]
        return batch


def instrumented_loop(ctx: Context, pipeline: str, workers: int) -> dict[str, list[float]]:
    """The body of train.train's step loop (grad_accum 1), timed per phase. Returns seconds per timed step
    for each phase in PHASES and their sum ("total")."""
    args, device, accelerator = ctx.args, ctx.device, ctx.accelerator
    student, ema = ctx.models()
    algorithm = ctx.algorithm()
    total = ctx.total_steps
    optimizer = ctx.optimizer(student)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps=total, warmup_steps=0)
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    ema.to(device)
    algorithm.to(device)
    stats = EpochStats(args.classes)
    ema_momentum = StudentConfig().ema_momentum

    def stream(dataset, per_step: int, stream_id: int):
        sampler = StepBatchSampler(len(dataset), per_step, seed=0, stream=stream_id, total_steps=total)
        return iter(_loader(dataset, sampler, workers, stream_id, pin=device.type == "cuda"))

    labeled, unlabeled = ctx.datasets[pipeline]
    labeled_iter = stream(labeled, args.batch_size, LABELED_STREAM)
    unlabeled_iter = stream(unlabeled, args.batch_size * args.mu, UNLABELED_STREAM)
    prepared = {"decode": 0.0, "augment": 0.0}
    device_views = ctx.batch_pipeline(pipeline)
    prepare = _to_batch if device_views is None else TimedDeviceViews(device_views, prepared)
    forward_seconds = {"student_forward": 0.0, "teacher_forward": 0.0}
    hooks = PhaseTimer(device, forward_seconds)
    hooks.watch(accelerator.unwrap_model(student), "student_forward")
    hooks.watch(ema, "teacher_forward")
    phases: dict[str, list[float]] = {name: [] for name in (*PHASES, "total")}
    student.train()
    ema.eval()
    try:
        for step in range(total - 1):
            forward_seconds.update(student_forward=0.0, teacher_forward=0.0)
            prepared.update(decode=0.0, augment=0.0)
            t0 = time.perf_counter()
            lab = next(labeled_iter)
            unl = next(unlabeled_iter)
            t1 = time.perf_counter()
            batch = prepare(lab, unl, device)
            synchronize(device)
            t2 = time.perf_counter()
            with accelerator.autocast():
                out = algorithm.step(batch, student=student, teacher=ema)
            synchronize(device)
            t3 = time.perf_counter()
            accelerator.backward(out.loss)
            synchronize(device)
            t4 = time.perf_counter()
            metrics = {name: _as_tensor(value, device) for name, value in out.metrics.items()}
            metrics["loss"] = out.loss.detach().float()
            stats.add(metrics, out.pseudo_labels, out.mask)
            t5 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            synchronize(device)
            t6 = time.perf_counter()
            ema.update(accelerator.unwrap_model(student), ema_momentum)
            synchronize(device)
            t7 = time.perf_counter()
            if step < args.warmup_steps:
                continue
            forward = forward_seconds["student_forward"] + forward_seconds["teacher_forward"]
            measured = {
                "data_wait": t1 - t0, "decode": prepared["decode"], "augment": prepared["augment"],
                "to_device": (t2 - t1) - prepared["decode"] - prepared["augment"],
                "student_forward": forward_seconds["student_forward"],
                "teacher_forward": forward_seconds["teacher_forward"], "algorithm_rest": (t3 - t2) - forward,
                "backward": t4 - t3, "metrics": t5 - t4, "optimizer": t6 - t5, "ema_update": t7 - t6,
                "total": t7 - t0,
            }
            for name, value in measured.items():
                phases[name].append(value)
    finally:
        hooks.remove()
        del labeled_iter, unlabeled_iter
        accelerator.free_memory()
    return phases


def worker_side(ctx: Context, table, pipeline: str) -> dict[str, float]:
    """ms per step of the work the DataLoader workers do (if one process did all of it), from a worker-less
    pass over WORKER_SAMPLE items of each stream, split into read / decode / augment."""
    args = ctx.args
    read = EncodedReader(table)
    per_step = {"labeled": args.batch_size, "unlabeled": args.batch_size * args.mu}
    labeled, unlabeled = ctx.datasets[pipeline]
    totals = dict.fromkeys(WORKER_PHASES, 0.0)
    for name, dataset in (("labeled", labeled), ("unlabeled", unlabeled)):
        seconds = dict.fromkeys(WORKER_PHASES, 0.0)
        for position in range(WORKER_SAMPLE):
            index = int(dataset.indices[position % len(dataset)])
            t0 = time.perf_counter()
            encoded = read(index)  # file read (+ the JPEG header parse)
            t1 = time.perf_counter()
            seconds["read"] += t1 - t0
            if pipeline == "cpu":
                image = decode_image(encoded.data, encoded.name) if encoded.kind == "jpeg" else table.load_image(index)
                t2 = time.perf_counter()
                views = [ctx.views.weak] if name == "labeled" else [ctx.views.weak, ctx.views.strong] * ctx.num_views
                for view in views:
                    view(image)
                seconds["decode"] += t2 - t1
                seconds["augment"] += time.perf_counter() - t2
            else:  # the worker's remaining job: drawing every view's parameters
                spec, views = ctx.views.spec, (1 if name == "labeled" else 2 * ctx.num_views)
                for view in range(views):
                    sample_view(spec, encoded.height, encoded.width, strong=view % 2 == 1)
                seconds["augment"] += time.perf_counter() - t1
        for phase in WORKER_PHASES:
            totals[phase] += seconds[phase] / WORKER_SAMPLE * per_step[name]
    return {phase: round(1e3 * value, 2) for phase, value in totals.items()}


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    device = resolve_device(args.device)
    set_threads(args.threads)
    machine = machine_info(device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.mixed_precision)
    workdir = scratch_dir(args.tmp_dir)
    try:
        paths, image_source = benchmark_images(args.data, args.images, args.source_size, args.classes, workdir,
                                               jitter=args.size_jitter, processes=default_processes())
        num_images = len(paths)
        rng = np.random.default_rng(0)
        clip_label = rng.integers(0, args.classes, num_images)
        table = table_from_paths(paths, clip_label, args.classes)
        views, transforms_source = make_transforms(args.image_size)
        labeled_indices = np.flatnonzero(rng.random(num_images) < LABELED_FRACTION)
        confidence = rng.random(num_images).astype(np.float32)
        num_views = 2 if args.multiview else 1
        datasets = {
            "cpu": (
                LabeledViews(table, labeled_indices, clip_label[labeled_indices], views.weak),
                UnlabeledViews(table, np.arange(num_images), views.weak, views.strong, num_views=num_views,
                               clip_label=clip_label, clip_confidence=confidence),
            ),
            "device": (
                EncodedLabeledViews(table, labeled_indices, clip_label[labeled_indices], views.spec),
                EncodedUnlabeledViews(table, np.arange(num_images), views.spec, num_views=num_views,
                                      clip_label=clip_label, clip_confidence=confidence),
            ),
        }
        ctx = Context(args=args, device=device, accelerator=accelerator, datasets=datasets, views=views,
                      workdir=workdir)
        images_per_step = args.batch_size * (1 + args.mu)
        print(
            f"{args.arch} at {args.image_size}px on {device}; batch {args.batch_size} + {args.batch_size * args.mu} "
            f"unlabeled ({num_views} weak + {num_views} strong views); {image_source}; {transforms_source}",
            flush=True,
        )
        worker_phases = {pipeline: worker_side(ctx, table, pipeline) for pipeline in args.pipeline}
        print(f"worker-side ms per step (one process): {worker_phases}", flush=True)

        settings = [(p, w) for p in args.pipeline for w in args.workers]
        bare_s = [bare_loop(ctx)]
        real: dict[tuple[str, int], dict[str, list[float]]] = {
            key: {"step_s": [], "call_s": [], "ratio": [], "loop_reported_seconds_per_step": []} for key in settings
        }
        breakdown: dict[tuple[str, int], dict[str, list[float]]] = {
            key: {n: [] for n in (*PHASES, "total")} for key in settings
        }
        for repeat in range(args.repeats):
            for pipeline, workers in settings:
                measured = real_loop(ctx, pipeline, workers)
                bare_s.append(bare_loop(ctx))
                bare = (bare_s[-2] + bare_s[-1]) / 2
                for name, value in measured.items():
                    real[(pipeline, workers)][name].append(value)
                real[(pipeline, workers)]["ratio"].append(bare / measured["step_s"])
                phases = instrumented_loop(ctx, pipeline, workers)
                for name, values in phases.items():
                    breakdown[(pipeline, workers)][name].extend(values)
                print(
                    f"repeat {repeat}, {pipeline} pipeline, workers {workers}: real {1e3 * measured['step_s']:.0f} "
                    f"ms/step, bare {1e3 * bare:.0f} ms/step, ratio {bare / measured['step_s']:.3f}; instrumented "
                    f"{1e3 * float(np.mean(phases['total'])):.0f} ms/step "
                    f"(data wait {1e3 * float(np.mean(phases['data_wait'])):.0f})",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    machine["load_average_at_end"] = load_average()
    results = []
    for pipeline, workers in settings:
        steps = real[(pipeline, workers)]["step_s"]
        phases = breakdown[(pipeline, workers)]
        reported = real[(pipeline, workers)]["loop_reported_seconds_per_step"]
        results.append({
            "pipeline": pipeline,
            "workers": workers,
            "real_ms_per_step": summarize([1e3 * s for s in steps], 1),
            "real_images_per_s": summarize([images_per_step / s for s in steps], 1),
            "ratio_to_bare": summarize(real[(pipeline, workers)]["ratio"], 3),
            "train_call_s": summarize(real[(pipeline, workers)]["call_s"], 2),
            "worker_side_ms_per_step_one_process": worker_phases[pipeline],
            "loop_reported_ms_per_step": summarize([1e3 * s for s in reported], 1),
            "breakdown_ms_per_step_median": {name: round(1e3 * median(v), 2) for name, v in phases.items()},
            "breakdown_ms_per_step_mean": {name: round(1e3 * float(np.mean(v)), 2) for name, v in phases.items()},
            "breakdown_steps": len(phases["total"]),
            # Per instrumented step: (student fwd + teacher fwd + backward + SGD) / whole step. Numerator and
            # denominator come from the same step, so machine-load drift cancels; it is the ratio the loop
            # would reach if nothing slowed the model down (workers competing for cores do, on small CPUs).
            "model_share_of_step": summarize(
                [sum(phases[p][i] for p in MODEL_PHASES) / phases["total"][i] for i in range(len(phases["total"]))],
                3,
            ),
        })
    return {
        "command": command_line(),
        "measured_at": timestamp(),
        "machine": machine,
        "settings": {
            "arch": args.arch,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "mu": args.mu,
            "images_per_step": images_per_step,
            "decoded_images_per_step": args.batch_size * (1 + args.mu),
            "transforms_per_step": args.batch_size * (1 + 2 * num_views * args.mu),
            "multiview": args.multiview,
            "pipelines": list(args.pipeline),
            "channels_last": args.channels_last,
            "compile": args.compile,
            "algorithm": args.algorithm,
            "mixed_precision": args.mixed_precision,
            "images": num_images,
            "image_source": image_source,
            "transforms": transforms_source,
            "timed_steps_per_run": args.steps,
            "warmup_steps_per_run": args.warmup_steps,
            "repeats": args.repeats,
        },
        "bare_ms_per_step": summarize([1e3 * s for s in bare_s], 1),
        "bare_images_per_s": summarize([images_per_step / s for s in bare_s], 1),
        "real": results,
        "goal_ratio": GOAL_RATIO,
    }


def setting_name(args: argparse.Namespace) -> str:
    device = resolve_device(args.device)
    threads = f"/threads{args.threads}" if args.threads else ""
    precision = args.mixed_precision
    extras = "".join(flag for flag, on in (("/multiview", args.multiview), ("/channels-last", args.channels_last),
                                           ("/compile", args.compile)) if on)
    return (f"{args.arch}/{args.image_size}px/{device.type}/batch{args.batch_size}-mu{args.mu}/{precision}{extras}"
            f"{threads}")


def print_table(result: dict[str, Any]) -> None:
    print(f"\nbare loop: {result['bare_ms_per_step']['median']:.0f} ms/step")
    header = (f"{'pipeline':>8} {'workers':>7} {'ms/step':>8} {'ratio':>6} {'share':>6} "
              + " ".join(f"{p[:10]:>10}" for p in PHASES))
    print(header)
    for row in result["real"]:
        parts = row["breakdown_ms_per_step_mean"]
        print(
            f"{row['pipeline']:>8} {row['workers']:>7} {row['real_ms_per_step']['median']:>8.0f} "
            f"{row['ratio_to_bare']['median']:>6.3f} {row['model_share_of_step']['median']:>6.3f} "
            + " ".join(f"{parts[p]:>10.1f}" for p in PHASES)
        )
    for row in result["real"]:
        if row["workers"] == result["real"][0]["workers"]:
            print(f"worker side, {row['pipeline']} pipeline (ms per step, one process): "
                  f"{row['worker_side_ms_per_step_one_process']}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    setting = setting_name(args)
    write_results(args.output, "train_throughput", DESCRIPTION, setting, result)
    print_table(result)
    print(f"\nwrote {args.output} (runs[{setting!r}])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
