"""One straight-line Accelerate training loop. It knows nothing about any algorithm.

Per optimizer step: `grad_accum` micro-batches of `out = algorithm.step(batch, student, teacher)`,
`accelerator.backward(out.loss / grad_accum)`, one optimizer and LR-scheduler step, one EMA (EMAN)
teacher update, metrics accumulated. Per epoch: metrics reduced across processes, evaluation of the
student and the EMA teacher, one JSONL line, Accelerate trackers, a checkpoint.

Checkpoints hold student, EMA teacher, optimizer, scheduler, algorithm state (class prior), RNG
states, epoch accumulators and the step (= data position, see data/sampling.py), so a run killed and
resumed ends with the same weights and metrics as an uninterrupted one (on CPU). SIGINT / SIGTERM
finish the current step, write a checkpoint and return; a second SIGINT aborts at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zeroshot_adapt.algorithms.base import Algorithm, Batch, LabeledBatch, UnlabeledBatch
from zeroshot_adapt.data.device import batch_feed
from zeroshot_adapt.data.sampling import SeededItems, StepBatchSampler
from zeroshot_adapt.data.workers import plan_stream_workers
from zeroshot_adapt.fileio import atomic_write
from zeroshot_adapt.pseudo_labels import class_imbalance_ratio
from zeroshot_adapt.schedules import warmup_cosine

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
LABELED_STREAM, UNLABELED_STREAM = 1, 2
LOG_EVERY_STEPS = 10


@dataclass(frozen=True)
class LoopSettings:
    """Everything the loop needs, resolved from the run config by the pipeline."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    batch_size: int  # labeled images per optimizer step, all processes together
    mu: int  # unlabeled batch = mu * batch_size
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    grad_accum: int = 1
    ema_momentum: float = 0.999
    checkpoint_every_steps: int = 200
    eval_every_epochs: int = 1
    num_workers: int = 2
    seed: int = 0


@dataclass
class EpochStats:
    """Sums over the optimizer steps of the current epoch (checkpointed, so resume mid-epoch is exact).

    Kept as tensors on the training device and read back once per epoch: no host sync per step."""

    num_classes: int
    steps: int = 0
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    masked_hist: torch.Tensor | None = None  # pseudo-labels that passed the mask, per class
    all_hist: torch.Tensor | None = None  # every pseudo-label (argmax), per class

    def add(self, metrics: dict[str, torch.Tensor], labels: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        for name, value in metrics.items():
            value = value.detach().double()
            self.metric_sums[name] = self.metric_sums[name] + value if name in self.metric_sums else value
        if labels is None:
            return
        labels = labels.detach().long()
        every = torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        self.all_hist = every if self.all_hist is None else self.all_hist + every
        if mask is not None:
            kept = torch.bincount(labels[mask.detach() > 0], minlength=self.num_classes)[: self.num_classes]
            self.masked_hist = kept if self.masked_hist is None else self.masked_hist + kept

    def hist(self, which: str, device: torch.device) -> torch.Tensor:
        value = getattr(self, which)
        return torch.zeros(self.num_classes, dtype=torch.long, device=device) if value is None else value.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "metric_sums": {k: float(v) for k, v in self.metric_sums.items()},
            "masked_hist": None if self.masked_hist is None else self.masked_hist.cpu().numpy(),
            "all_hist": None if self.all_hist is None else self.all_hist.cpu().numpy(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.steps = int(state["steps"])
        self.metric_sums = {
            k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state["metric_sums"].items()
        }
        for name in ("masked_hist", "all_hist"):
            value = state[name]
            setattr(self, name, None if value is None else torch.as_tensor(np.asarray(value), device=device))


@dataclass
class TrainResult:
    step: int
    completed: bool
    history: list[dict[str, Any]]
    final_evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)  # "student"/"ema" -> full report


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    return torch.tensor(float(value), device=device)


def _to_batch(labeled: dict | None, unlabeled: dict | None, device: torch.device) -> Batch:
    lab = None
    if labeled is not None:
        lab = LabeledBatch(images=labeled["image"].to(device, non_blocking=True),
                           targets=labeled["target"].to(device, non_blocking=True))
    unl = None
    if unlabeled is not None:
        unl = UnlabeledBatch(
            weak=[v.to(device, non_blocking=True) for v in unlabeled["weak"]],
            strong=[v.to(device, non_blocking=True) for v in unlabeled["strong"]],
            index=unlabeled["index"].to(device, non_blocking=True),
            true_label=unlabeled["true_label"].to(device, non_blocking=True),
            clip_label=unlabeled["clip_label"].to(device, non_blocking=True),
            clip_confidence=unlabeled["clip_confidence"].to(device, non_blocking=True).float(),
        )
    return Batch(labeled=lab, unlabeled=unl)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def _entropy(prior: torch.Tensor) -> float:
    p = prior.detach().float().clamp_min(1e-12)
    return float(-(p * p.log()).sum().item())


class _StopFlag:
    """SIGINT/SIGTERM -> finish the step, checkpoint, return. A second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): finishing this step and writing a checkpoint", signum)

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _loader(dataset: Dataset, sampler: StepBatchSampler, num_workers: int, seed: int, pin: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)  # worker base seeds never touch the global RNG
    return DataLoader(
        SeededItems(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin,
        generator=generator,
        persistent_workers=False,
        collate_fn=getattr(dataset, "collate_fn", None),  # the device pipeline's encoded items bring their own
    )


def train(
    *,
    accelerator,
    student: nn.Module,
    ema,
    algorithm: Algorithm,
    labeled: Dataset | None,
    unlabeled: Dataset | None,
    settings: LoopSettings,
    num_classes: int,
    run_dir: str | Path,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    stop_after_steps: int | None = None,
    batch_pipeline: Callable[[Any, Any, torch.device], Batch] | None = None,
) -> TrainResult:
    """Train `student` until `settings.total_steps`, resuming from `run_dir/checkpoints/last.pt` if present.

    evaluate(model) -> report dict, called on the student and the EMA teacher at epoch ends; its scalar
    entries go into the epoch record, and the last epoch's full reports are returned in the result.
    stop_after_steps: return (with a checkpoint) once this many optimizer steps ran in this call —
    what a preempted job looks like; used by the resume tests.
    batch_pipeline: (labeled loader batch, unlabeled loader batch, device) -> Batch; None: copy the loaders'
    tensors (the CPU pipeline). The device pipeline passes data.device.DeviceViews (decode + augment on the
    device). Either way the next micro-batch is prepared while the current one computes (data.device.batch_feed).
    """
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoints" / CHECKPOINT_NAME
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    micro_batches = settings.grad_accum
    if settings.batch_size % (micro_batches * world):
        raise ValueError(
            f"batch_size {settings.batch_size} must be divisible by grad_accum x processes = {micro_batches * world}"
        )
    micro_batch = settings.batch_size // micro_batches

    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=settings.nesterov,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, total_steps=settings.total_steps, warmup_steps=settings.warmup_steps),
    )
    # The scheduler is stepped by hand: a prepared scheduler would step once per process.
    student, optimizer = accelerator.prepare(student, optimizer)
    ema.to(device)
    if hasattr(algorithm, "to"):
        algorithm.to(device)
    stats = EpochStats(num_classes)
    history: list[dict[str, Any]] = []
    final_evaluation: dict[str, dict[str, Any]] = {}
    step = 0

    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        accelerator.unwrap_model(student).load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        algorithm.load_state_dict(state["algorithm"])
        stats.load_state_dict(state["epoch_stats"], device=device)
        history = list(state["history"])
        step = int(state["step"])
        _set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at step %d", checkpoint_path, step)

    def save_checkpoint() -> None:
        rng_states = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
        if accelerator.is_main_process:
            _atomic_save(
                {
                    "step": step,
                    "student": accelerator.unwrap_model(student).state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "algorithm": algorithm.state_dict(),
                    "epoch_stats": stats.state_dict(),
                    "history": history,
                    "rng": rng_states,
                },
                checkpoint_path,
            )
        accelerator.wait_for_everyone()

    # Workers split between the two streams by their measured cost per step (data/workers.py).
    labeled_workers, unlabeled_workers = plan_stream_workers(
        settings.num_workers, [(labeled, micro_batch), (unlabeled, micro_batch * settings.mu)]
    )

    def micro_loader(dataset: Dataset | None, per_step: int, stream: int, workers: int):
        if dataset is None or len(dataset) == 0 or per_step == 0:
            return None
        sampler = StepBatchSampler(
            len(dataset),
            per_step,
            seed=settings.seed,
            stream=stream,
            total_steps=settings.total_steps * micro_batches,
            start_step=step * micro_batches,
            rank=rank,
            world_size=world,
        )
        loader = _loader(dataset, sampler, workers, settings.seed * 7919 + stream + step, pin=device.type == "cuda")
        return iter(loader)

    labeled_iter = micro_loader(labeled, micro_batch, LABELED_STREAM, labeled_workers)
    unlabeled_iter = micro_loader(unlabeled, micro_batch * settings.mu, UNLABELED_STREAM, unlabeled_workers)
    if labeled_iter is None and unlabeled_iter is None:
        raise ValueError("nothing to train on: both the labeled and the unlabeled set are empty")
    feed = batch_feed(labeled_iter, unlabeled_iter, batch_pipeline or _to_batch, device)

    steps_this_call = 0
    student.train()
    ema.eval()
    progress = tqdm(
        total=settings.total_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process
    )
    step_start = time.perf_counter()
    with _StopFlag() as stop:
        while step < settings.total_steps:
            for micro in range(micro_batches):
                batch = next(feed)
                sync = micro == micro_batches - 1
                context = contextlib.nullcontext() if sync else accelerator.no_sync(student)
                with context:
                    with accelerator.autocast():
                        out = algorithm.step(batch, student=student, teacher=ema)
                    accelerator.backward(out.loss / micro_batches)
                metrics = {name: _as_tensor(value, device) for name, value in out.metrics.items()}
                metrics["loss"] = out.loss.detach().float()
                stats.add({k: v / micro_batches for k, v in metrics.items()}, out.pseudo_labels, out.mask)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(accelerator.unwrap_model(student), settings.ema_momentum)
            step += 1
            steps_this_call += 1
            stats.steps += 1
            progress.update(1)
            if step % LOG_EVERY_STEPS == 0:  # one host sync now and then, not per step
                progress.set_postfix(loss=f"{float(metrics['loss']):.3f}")

            if step % settings.steps_per_epoch == 0 or step == settings.total_steps:
                epoch = math.ceil(step / settings.steps_per_epoch)
                record = _epoch_record(accelerator, stats, algorithm, epoch, step, optimizer)
                record["seconds_per_step"] = (time.perf_counter() - step_start) / max(1, stats.steps)
                if evaluate is not None and (
                    epoch % settings.eval_every_epochs == 0 or step == settings.total_steps
                ):
                    student.eval()
                    for prefix, model in (("student", student), ("ema", ema)):
                        final_evaluation[prefix] = evaluate(model)
                        for name, value in final_evaluation[prefix].items():
                            if isinstance(value, float):  # scalars only: no counts, lists or matrices
                                record[f"{prefix}/{name}"] = value
                    student.train()
                history.append(record)
                if accelerator.is_main_process:
                    with metrics_path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    log.info(
                        "epoch %d: %s",
                        epoch,
                        ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)),
                    )
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
                stats = EpochStats(num_classes)
                step_start = time.perf_counter()
                save_checkpoint()
            elif step % settings.checkpoint_every_steps == 0:
                save_checkpoint()

            stop_requested = stop.requested or (stop_after_steps is not None and steps_this_call >= stop_after_steps)
            # (multi-process: a request is acted on at the next vote, at most LOG_EVERY_STEPS - 1 steps later)
            if world > 1:  # every process must agree to stop at the same step: vote every few steps
                if step % LOG_EVERY_STEPS:
                    stop_requested = False
                else:
                    flag = torch.tensor([float(stop_requested)], device=device)
                    stop_requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            if stop_requested and step < settings.total_steps:
                save_checkpoint()
                progress.close()
                return TrainResult(step=step, completed=False, history=history)
    progress.close()
    return TrainResult(step=step, completed=True, history=history, final_evaluation=final_evaluation)


def _epoch_record(accelerator, stats: EpochStats, algorithm, epoch: int, step: int, optimizer) -> dict[str, Any]:
    """Reduce one epoch's sums across processes into a JSON-able record."""
    device = accelerator.device
    names = sorted(stats.metric_sums)
    sums = torch.stack([stats.metric_sums[n].to(device) for n in names]
                       + [torch.tensor(float(stats.steps), dtype=torch.float64, device=device)])
    hists = torch.stack([stats.hist("masked_hist", device), stats.hist("all_hist", device)])
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
        hists = accelerator.reduce(hists, reduction="sum")
    steps_total = float(sums[-1].item()) or 1.0
    record: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
    for i, name in enumerate(names):
        record[name] = float(sums[i].item()) / steps_total
    masked, every = hists[0].cpu().numpy(), hists[1].cpu().numpy()
    ratio = class_imbalance_ratio(masked)
    record["pseudo_label_imbalance"] = None if ratio is None or not math.isfinite(ratio) else float(ratio)
    record["pseudo_label_classes_empty"] = int((masked == 0).sum())
    record["pseudo_label_counts"] = masked.astype(int).tolist()
    record["pseudo_label_counts_unmasked"] = every.astype(int).tolist()
    prior = getattr(algorithm, "class_prior", None)  # DebiasPL's prior / DA's p_model; None for FixMatch
    if prior is not None:
        record["prior_entropy"] = _entropy(prior)
        record["class_prior"] = [round(float(p), 6) for p in prior]
    return record
