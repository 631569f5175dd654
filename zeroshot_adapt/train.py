"""One straight-line Accelerate training loop. It knows nothing about any algorithm.

Per optimizer step: `grad_accum` micro-batches of `out = algorithm.step(batch, student, teacher)`,
`accelerator.backward(out.loss / grad_accum)`, one optimizer and LR-scheduler step, one EMA (EMAN)
teacher update, metrics accumulated. Per epoch: metrics reduced across processes, evaluation of the
student and the EMA teacher, one JSONL line, Accelerate trackers, a checkpoint.

Checkpoints hold student, EMA teacher, optimizer, scheduler, algorithm state (class prior), RNG
states, epoch accumulators, the step (= data position, see data/sampling.py) and the run's resolved
config, so a run killed and resumed ends with the same weights and metrics as an uninterrupted one (on
CPU). They hold tensors and plain containers only and are read with ``torch.load(weights_only=True)``:
a checkpoint carrying any other object is refused unread (unpickling it could run code).

What can go wrong, and what the loop does about it:
- SIGINT / SIGTERM (also sent to the whole process group, DataLoader workers included: the workers
  ignore them) finish the current step, write a checkpoint and return; a second SIGINT aborts at once.
- A non-finite loss or non-finite weights stop the run with a UserError naming the step and the likely
  causes, before anything is saved: the last good checkpoint is never overwritten.
- A finished epoch is checkpointed before it is evaluated (evaluation leaves every RNG as it was).
- ``metrics.jsonl`` is rewritten atomically from the checkpointed history, so a resumed run never
  repeats a line and a crash never leaves half a line.
- A full disk while checkpointing raises ``fileio.DiskFullError`` naming the file; the previous
  checkpoint stays intact and no temp file is left behind.
- Corrupt images met in training are replaced deterministically (data/datasets.py) and counted once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import random
import signal
import time
from collections.abc import Callable, Iterator
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
from zeroshot_adapt.data.datasets import CORRUPT_SKIPPED, POSITION, ignore_stop_signals, unwrap_worker_errors
from zeroshot_adapt.data.device import batch_feed
from zeroshot_adapt.data.sampling import SeededItems, StepBatchSampler
from zeroshot_adapt.data.workers import plan_stream_workers
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.fileio import atomic_write, atomic_write_text
from zeroshot_adapt.pseudo_labels import class_imbalance_ratio
from zeroshot_adapt.schedules import warmup_cosine

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = 2  # 2: tensors and plain containers only (weights_only=True), config inside
LABELED_STREAM, UNLABELED_STREAM = 1, 2
LOG_EVERY_STEPS = 10  # progress-bar loss and the non-finite-loss check: one host sync every this many steps


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
            "masked_hist": None if self.masked_hist is None else self.masked_hist.detach().cpu().clone(),
            "all_hist": None if self.all_hist is None else self.all_hist.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.steps = int(state["steps"])
        self.metric_sums = {
            k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state["metric_sums"].items()
        }
        for name in ("masked_hist", "all_hist"):
            value = state[name]
            setattr(self, name, None if value is None else torch.as_tensor(value, device=device))


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


# ----------------------------------------------------------------------------- RNG states (plain data)


def _rng_state() -> dict[str, Any]:
    """Every global RNG as tensors, lists and numbers (no numpy objects: checkpoints load weights_only)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Leave every global RNG as it was (evaluation must not shift the training's random stream)."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


# ----------------------------------------------------------------------------- checkpoint files


class _WriteErrorRecorder:
    """File-object wrapper that remembers the first OSError of a write. torch.save turns an ENOSPC raised
    inside its zip writer into "RuntimeError: unexpected pos ..."; this keeps the real cause."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through fileio.atomic_write: the old file or the new one, never half of one; a full disk
    is a DiskFullError naming `path`, and the temp file is removed."""
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        recorder = _WriteErrorRecorder(handle)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise
    return path


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A training checkpoint, loaded with weights_only=True (tensors and plain containers only).

    A file holding anything else is refused unread, since unpickling it could run code; a damaged or
    foreign file is a UserError naming it. mmap=True maps the tensors lazily (cheap: reading the config)."""
    path = Path(path)
    start_over = "delete it (or use another --run-dir) to start the run over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "global" in str(error).lower():
            raise UserError(
                f"checkpoint {str(path)!r} was refused unread: it holds objects other than tensors and plain "
                "containers, and loading it could run code (a tampered file, or one written by another program "
                f"or an older version of zeroshot-adapt); {start_over}"
            ) from None
        raise UserError(f"checkpoint {str(path)!r} is damaged or not a checkpoint ({error}); {start_over}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"checkpoint {str(path)!r} is damaged or not a checkpoint ({reason}); {start_over}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {str(path)!r} is not a zeroshot-adapt checkpoint of format {CHECKPOINT_FORMAT} (written by "
            f"another version?); {start_over}"
        )
    return state


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl = one JSON line per finished epoch, rewritten whole and atomically."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history))


# ----------------------------------------------------------------------------- guards


class NonFiniteError(UserError):
    """The loss or the weights became NaN / inf."""


class _FiniteGuard:
    """Remembers, on the training device, the first step whose loss was not finite (no host sync per
    step); `check` reads it back every LOG_EVERY_STEPS steps and before anything is saved or evaluated."""

    def __init__(self, device: torch.device, settings: LoopSettings, mixed_precision: str, checkpoint: Path) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.settings, self.mixed_precision, self.checkpoint = settings, mixed_precision, checkpoint
        self.last_saved_step: int | None = None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """step: the 1-based number of the optimizer step this loss belongs to."""
        bad = ~torch.isfinite(loss.detach()).all() & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, accelerator, step: int, models: tuple[nn.Module, ...] = ()) -> None:
        """Raise NonFiniteError if a loss so far, or (with `models`) a weight, is not finite. Collective."""
        first_bad = self.first_bad
        weights_bad = torch.zeros((), dtype=torch.long, device=first_bad.device)
        if models:
            finite = [torch.isfinite(t).all() for m in models for t in m.state_dict().values() if t.is_floating_point()]
            weights_bad = (~torch.stack(finite).all()).long().to(first_bad.device) if finite else weights_bad
        flags = torch.stack([first_bad, weights_bad])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="max")
        bad_step, bad_weights = int(flags[0].item()), bool(flags[1].item())
        if bad_step >= 0:
            self._fail(f"the loss became NaN or inf at optimizer step {bad_step}", step)
        if bad_weights:
            names = [f"{type(m).__name__}.{n}" for m in models for n, t in m.state_dict().items()
                     if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            self._fail(f"weights became NaN or inf by optimizer step {step} ({', '.join(names[:5])})", step)

    def _fail(self, what: str, step: int) -> None:
        settings = self.settings
        epoch = math.ceil(step / settings.steps_per_epoch)
        causes = [f"the learning rate is too high (optim.lr={settings.lr:g}: try it 10x lower)",
                  "NaN or inf in the input images or the labels"]
        if self.mixed_precision == "fp16":
            causes.append("fp16 overflow (optim.mixed_precision=fp16: try bf16 or no)")
        kept = (f"the last good checkpoint (step {self.last_saved_step}) in {str(self.checkpoint)!r} is kept"
                if self.last_saved_step is not None else "no checkpoint had been written yet")
        raise NonFiniteError(
            f"training stopped: {what} of {settings.total_steps} (epoch {epoch}). Likely causes: "
            f"{'; '.join(causes)}. Nothing from the bad steps was saved: {kept}. Resuming with the same "
            "settings would repeat this: fix the cause and start a new run (another --run-dir)."
        )


class CorruptTally:
    """Distinct training samples (table indices) found corrupt, each logged once (main process)."""

    def __init__(self, indices: list[int] | None = None) -> None:
        self.indices: set[int] = set(indices or ())

    def observe(self, dataset: Dataset, items: dict | None, log_new: bool) -> None:
        if items is None or CORRUPT_SKIPPED not in items:
            return
        skipped = items[CORRUPT_SKIPPED]
        if not bool(skipped.any()):  # a CPU tensor straight from the DataLoader: no device sync
            return
        count = len(dataset)
        for position, k in zip(items[POSITION].tolist(), skipped.tolist(), strict=True):
            for j in range(1, k + 1):
                index = int(dataset.indices[(position - j) % count])
                if index not in self.indices:
                    self.indices.add(index)
                    if log_new:
                        log.warning("corrupt image skipped in training (replaced by the next readable one): %s",
                                    dataset.table.keys[index])


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
        worker_init_fn=ignore_stop_signals if num_workers else None,
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
    run_config: dict[str, Any] | None = None,
    batch_pipeline: Callable[[Any, Any, torch.device], Batch] | None = None,
) -> TrainResult:
    """Train `student` until `settings.total_steps`, resuming from `run_dir/checkpoints/last.pt` if present.

    evaluate(model) -> report dict, called on the student and the EMA teacher at epoch ends (after the
    epoch's checkpoint, with every RNG left as it was); its scalar entries go into the epoch record, and
    the last epoch's full reports are returned in the result.
    stop_after_steps: return (with a checkpoint) once this many optimizer steps ran in this call —
    what a preempted job looks like; used by the resume tests.
    run_config: the resolved run config (plain dict), stored in every checkpoint so the resume guard
    (pipeline.check_resume_config) compares against the checkpoint itself.
    batch_pipeline: (labeled loader batch, unlabeled loader batch, device) -> Batch; None: copy the loaders'
    tensors (the CPU pipeline). The device pipeline passes data.device.DeviceViews (decode + augment on the
    device). Either way the next micro-batch is prepared while the current one computes (data.device.batch_feed).
    """
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoints" / CHECKPOINT_NAME
    metrics_path = run_dir / METRICS_NAME
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    micro_batches = settings.grad_accum
    if settings.batch_size % (micro_batches * world):
        raise UserError(
            f"optim.batch_size={settings.batch_size} must be divisible by optim.grad_accum x processes = "
            f"{micro_batches} x {world}"
        )
    micro_batch = settings.batch_size // micro_batches
    truth_known = has_ground_truth(unlabeled)

    optimizer = torch.optim.SGD(
        [p for p in student.parameters() if p.requires_grad],  # frozen parameters: no update, no weight decay
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
    guard = _FiniteGuard(device, settings, str(accelerator.mixed_precision), checkpoint_path)
    tally = CorruptTally()
    pending: dict[str, Any] | None = None  # an epoch record checkpointed before its evaluation

    if checkpoint_path.is_file():
        state = read_checkpoint(checkpoint_path)
        accelerator.unwrap_model(student).load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        algorithm.load_state_dict(state["algorithm"])
        stats.load_state_dict(state["epoch_stats"], device=device)
        history = list(state["history"])
        pending = state.get("pending_record")
        tally = CorruptTally(list(state.get("corrupt_indices", [])))
        step = int(state["step"])
        guard.last_saved_step = step
        _set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        log.info("resumed from %s at step %d", checkpoint_path, step)
    if main:  # the metrics file is the checkpointed history: drop lines of epochs the checkpoint does not hold
        if history:
            write_history(metrics_path, history)
        elif metrics_path.exists():
            metrics_path.unlink()

    def check_finite() -> None:  # before anything is saved, recorded or evaluated
        guard.check(accelerator, step, (accelerator.unwrap_model(student), ema))

    def save_checkpoint(pending_record: dict[str, Any] | None = None) -> None:
        model = accelerator.unwrap_model(student)
        check_finite()  # never replace the last good checkpoint with NaN weights
        rng_states = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
        if main:
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "config": run_config,
                    "student": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "algorithm": algorithm.state_dict(),
                    "epoch_stats": stats.state_dict(),
                    "history": history,
                    "pending_record": pending_record,
                    "corrupt_indices": sorted(tally.indices),
                    "rng": rng_states,
                },
                checkpoint_path,
            )
        guard.last_saved_step = step
        accelerator.wait_for_everyone()

    def finish_record(record: dict[str, Any], with_evaluation: bool) -> None:
        """Evaluate (RNG-neutral), then append the epoch record to the history and metrics.jsonl."""
        if with_evaluation and evaluate is not None:
            student.eval()
            with _rng_preserved():
                for prefix, model in (("student", student), ("ema", ema)):
                    final_evaluation[prefix] = evaluate(model)
                    for name, value in final_evaluation[prefix].items():
                        if isinstance(value, float):  # scalars only: no counts, lists or matrices
                            record[f"{prefix}/{name}"] = value
            student.train()
        history.append(record)
        if main:
            write_history(metrics_path, history)
            log.info("epoch %d: %s", record["epoch"],
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def wants_evaluation(epoch: int, at_step: int) -> bool:
        return evaluate is not None and (epoch % settings.eval_every_epochs == 0 or at_step == settings.total_steps)

    if pending is not None:  # stopped between an epoch's checkpoint and its evaluation: evaluate it now
        finish_record(pending, wants_evaluation(pending["epoch"], pending["step"]))
        if step == settings.total_steps:
            save_checkpoint()

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
        return unwrap_worker_errors(iter(loader))

    labeled_iter = micro_loader(labeled, micro_batch, LABELED_STREAM, labeled_workers)
    unlabeled_iter = micro_loader(unlabeled, micro_batch * settings.mu, UNLABELED_STREAM, unlabeled_workers)
    if labeled_iter is None and unlabeled_iter is None:
        raise UserError("nothing to train on: both the labeled and the unlabeled set are empty")
    make_batch = batch_pipeline or _to_batch

    def prepare(lab, unl, device: torch.device) -> Batch:
        tally.observe(labeled, lab, log_new=main)  # corrupt images the views replaced (CPU pipeline)
        tally.observe(unlabeled, unl, log_new=main)
        return make_batch(lab, unl, device)

    feed = batch_feed(labeled_iter, unlabeled_iter, prepare, device)

    steps_this_call = 0
    student.train()
    ema.eval()
    progress = tqdm(total=settings.total_steps, initial=step, desc="train", unit="step", disable=not main)
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
                guard.observe(out.loss, step + 1)
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
                guard.check(accelerator, step)
                progress.set_postfix(loss=f"{float(metrics['loss']):.3f}")

            if step % settings.steps_per_epoch == 0 or step == settings.total_steps:
                check_finite()
                epoch = math.ceil(step / settings.steps_per_epoch)
                record = _epoch_record(accelerator, stats, algorithm, epoch, step, optimizer, tally, truth_known)
                record["seconds_per_step"] = (time.perf_counter() - step_start) / max(1, stats.steps)
                stats = EpochStats(num_classes)
                if wants_evaluation(epoch, step):
                    save_checkpoint(pending_record=record)  # the finished epoch is safe before evaluation
                    finish_record(record, with_evaluation=True)
                    if step == settings.total_steps:
                        save_checkpoint()  # the finished run's checkpoint holds its whole history
                else:
                    finish_record(record, with_evaluation=False)
                    save_checkpoint()
                step_start = time.perf_counter()
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


TRUTH_METRICS = ("pseudo_label_acc", "pseudo_label_acc_masked", "pseudo_label_kept_correct")
"""Per-epoch metrics that compare pseudo-labels with the ground truth: null when the unlabeled set has none."""


def has_ground_truth(unlabeled: Any) -> bool:
    """Whether any sample of the unlabeled dataset (UnlabeledViews: `.table`; the device pipeline's
    EncodedUnlabeledViews: `.labels`) has a known label (>= 0); True when it cannot tell."""
    labels = getattr(unlabeled, "labels", None)
    if labels is None and getattr(unlabeled, "table", None) is not None:
        labels = unlabeled.table.labels
    return labels is None or bool((np.asarray(labels) >= 0).any())


def _epoch_record(
    accelerator, stats: EpochStats, algorithm, epoch: int, step: int, optimizer, tally: CorruptTally,
    truth_known: bool = True,
) -> dict[str, Any]:
    """Reduce one epoch's sums across processes into a JSON-able record. Without ground truth (an unlabeled
    folder) the TRUTH_METRICS are null: a 0 would read as "every pseudo-label is wrong"."""
    device = accelerator.device
    names = sorted(stats.metric_sums)
    sums = torch.stack([stats.metric_sums[n].to(device) for n in names]
                       + [torch.tensor(float(stats.steps), dtype=torch.float64, device=device)])
    hists = torch.stack([stats.hist("masked_hist", device), stats.hist("all_hist", device)])
    corrupt = tally.indices
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
        hists = accelerator.reduce(hists, reduction="sum")
        corrupt = set().union(*gather_object([sorted(tally.indices)]))
    steps_total = float(sums[-1].item()) or 1.0
    record: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
    for i, name in enumerate(names):
        record[name] = float(sums[i].item()) / steps_total if truth_known or name not in TRUTH_METRICS else None
    masked, every = hists[0].cpu().numpy(), hists[1].cpu().numpy()
    ratio = class_imbalance_ratio(masked)
    record["pseudo_label_imbalance"] = None if ratio is None or not math.isfinite(ratio) else float(ratio)
    record["pseudo_label_classes_empty"] = int((masked == 0).sum())
    record["pseudo_label_counts"] = masked.astype(int).tolist()
    record["pseudo_label_counts_unmasked"] = every.astype(int).tolist()
    record["corrupt_images_skipped"] = len(corrupt)  # distinct training samples met so far that were corrupt
    prior = getattr(algorithm, "class_prior", None)  # DebiasPL's prior / DA's p_model; None for FixMatch
    if prior is not None:
        record["prior_entropy"] = _entropy(prior)
        record["class_prior"] = [round(float(p), 6) for p in prior]
    return record


def _entropy(prior: torch.Tensor) -> float:
    p = prior.detach().float().clamp_min(1e-12)
    return float(-(p * p.log()).sum().item())
