"""Batched CLIP inference over a SampleTable: DataLoader workers decode, autocast on GPU, progress per image.

Every batch is run at the full batch size (the last one of a call is padded with blank images whose outputs
are dropped), so each sample's result does not depend on how many samples happened to share its call: a
cache that re-predicts only new samples gets the same numbers as a full build. The worker count, when not
given, is chosen from the measured cost of decoding vs the forward pass on the first batch.

Two input pipelines: ``cpu`` (workers decode and preprocess with PIL) and ``device`` (workers read the encoded
bytes, the device decodes each batch, nvJPEG on CUDA, and applies CLIP's eval preprocessing as tensor ops;
data/device.py). Their pixels differ slightly (decoder and resize implementation), so the pipeline is part of
the cache identity (`compute_settings`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zeroshot_adapt.data.base import SampleTable
from zeroshot_adapt.data.datasets import ignore_stop_signals, unwrap_worker_errors
from zeroshot_adapt.data.sources import CorruptImageError
from zeroshot_adapt.models.acceleration import inference_autocast
from zeroshot_adapt.teacher.classifier import zeroshot_logits
from zeroshot_adapt.teacher.clip import ClipModel

log = logging.getLogger(__name__)

INVALID = -1
PREDICTION_FIELDS = ("logits", "features", "confidence", "prediction", "valid")
_PLACEHOLDER_SIZE = (32, 32)  # what a corrupt image becomes before preprocessing (its outputs are zeroed)

MIN_BATCHES_TO_MEASURE = 3
"""Calls with fewer batches run without DataLoader workers (starting them would cost more than they save)."""

MIN_WORKER_GAIN = 0.1
"""A worker count is chosen only if the cost model predicts it at least this much faster than one fewer."""


def compute_settings(
    device: torch.device | str,
    batch_size: int,
    *,
    precision: str = "fp16",
    pipeline: str = "cpu",
    channels_last: bool = False,
    compiled: bool = False,
) -> dict[str, Any]:
    """What, besides the model and the data, changes the numbers `predict_shards` produces (for the cache
    identity): the device type, its precision (`precision` autocast on CUDA, fp32 elsewhere), the batch size
    (kernels are chosen per batch shape), and, only where they differ from the defaults (so caches built
    before these options still match), the input pipeline, channels-last layout and torch.compile."""
    device = torch.device(device)
    settings: dict[str, Any] = {"device": device.type, "precision": _precision(device, precision),
                                "batch_size": int(batch_size)}
    if pipeline != "cpu":
        settings["input_pipeline"] = pipeline  # nvJPEG / tensor resize: pixels differ slightly from PIL's
    if channels_last:
        settings["channels_last"] = True
    if compiled:
        settings["compiled"] = True
    return settings


_PRECISION_NAMES = {"fp16": "float16-autocast", "bf16": "bfloat16-autocast", "fp32": "float32"}


def _precision(device: torch.device, precision: str = "fp16") -> str:
    return _PRECISION_NAMES[precision] if device.type == "cuda" else "float32"


def choose_num_workers(decode_s: float, forward_s: float, *, cores: int, forward_on_host: bool) -> int:
    """DataLoader workers for a build whose per-image decode+preprocess costs `decode_s` and forward `forward_s`.

    Cost model per image: without workers the main process does both, `decode_s + forward_s`. With w workers
    decoding overlaps the forward: `max(decode_s / w, forward)`, where on a CPU device the forward loses the
    w cores the workers take (`forward_s * cores / (cores - w)`), and on an accelerator it does not. One core
    stays with the main process. A worker is added only while it cuts the predicted time by MIN_WORKER_GAIN
    (worker start-up and inter-process copies are not free). On 2 cores with a CPU forward this picks 0
    unless decoding costs more than the forward: the fastest setting measured in issue 13 (0.91 of the bare
    model at 0 workers vs 0.46 at 2).
    """
    best_workers, best_time = 0, decode_s + forward_s
    for workers in range(1, max(cores, 1)):
        forward = forward_s * cores / (cores - workers) if forward_on_host else forward_s
        predicted = max(decode_s / workers, forward)
        if predicted > best_time * (1 - MIN_WORKER_GAIN):
            break
        best_workers, best_time = workers, predicted
    return best_workers


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Items(Dataset):
    """Items {"image": Tensor, "ok": bool, "error": str} for `table[indices]`; a corrupt image becomes a
    blank placeholder with ok False and its error message (logged once, by the main process)."""

    def __init__(self, table: SampleTable, transform, indices: np.ndarray) -> None:
        self.table, self.transform, self.indices = table, transform, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        try:
            image, ok, error = self.table.load_image(int(self.indices[position])), True, ""
        except CorruptImageError as problem:
            image, ok, error = Image.new("RGB", _PLACEHOLDER_SIZE), False, str(problem)
        return {"image": self.transform(image), "ok": ok, "error": error}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([item["image"] for item in items]),
        "ok": torch.tensor([item["ok"] for item in items], dtype=torch.bool),
        "error": [item["error"] for item in items],
    }


class _Forward:
    """The forward pass of one batch, padded to the full batch size; numpy outputs of the real rows."""

    def __init__(self, clip: ClipModel, classifier: Tensor, batch_size: int, device: torch.device,
                 precision: str = "fp16") -> None:
        self.clip, self.batch_size, self.device, self.precision = clip, batch_size, device, precision
        self.classifier = classifier.to(device)
        self.scale = clip.logit_scale
        self.channels_last = _is_channels_last(clip.model)

    def __call__(self, images: Tensor, ok: Tensor) -> dict[str, np.ndarray]:
        n = images.shape[0]
        if n < self.batch_size:  # same shape for every batch: results do not depend on the batch's fill
            pad = images.new_zeros((self.batch_size - n, *images.shape[1:]))
            images = torch.cat([images, pad])
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with inference_autocast(self.device, self.precision):
            features = self.clip.model.encode_image(images)
        features = F.normalize(features[:n].float(), dim=-1)
        logits = zeroshot_logits(features, self.classifier, self.scale)
        confidence, prediction = logits.softmax(dim=-1).max(dim=-1)
        valid = ok.to(self.device)
        logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
        features = torch.where(valid[:, None], features, torch.zeros_like(features))
        confidence = torch.where(valid, confidence, torch.zeros_like(confidence))
        prediction = torch.where(valid, prediction, torch.full_like(prediction, INVALID))
        return {
            "logits": logits.half().cpu().numpy(),
            "features": features.half().cpu().numpy(),
            "confidence": confidence.float().cpu().numpy(),
            "prediction": prediction.long().cpu().numpy(),
            "valid": valid.cpu().numpy().astype(np.uint8),
        }

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@torch.no_grad()
def predict_shards(
    clip: ClipModel,
    classifier: Tensor,
    table: SampleTable,
    shards: Sequence[np.ndarray],
    *,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    precision: str = "fp16",
    pipeline: str = "cpu",
) -> Iterator[dict[str, np.ndarray]]:
    """CLIP predictions for each shard of `table` indices, yielded one shard at a time, in order.

    One DataLoader serves every shard (workers start once; batches never straddle shards: each shard is cut
    into batches of `batch_size` from its first index). num_workers None: chosen by `choose_num_workers`
    from timings of the first batch (decoded in this process), and logged. Yields {"logits": float16
    [n, C], "features": float16 [n, D] (L2-normalized), "confidence": float32 [n] (max softmax),
    "prediction": int64 [n] (argmax), "valid": uint8 [n]} per shard. Corrupt images are skipped and
    counted: valid 0, prediction -1, confidence 0, zero logits and features; each is logged once.
    precision: autocast on CUDA (fp16 | bf16 | fp32); a CPU runs in fp32. pipeline: "cpu" or "device" (see
    the module docstring); "device" falls back to "cpu" if CLIP's preprocess holds steps the tensor version
    does not know.
    """
    device = torch.device(device)
    preprocess = None
    if pipeline == "device":
        from zeroshot_adapt.data.device import TensorPreprocess

        preprocess = TensorPreprocess.from_transform(clip.preprocess)
        if preprocess is None:
            log.warning("CLIP preprocess %s has steps the device pipeline does not support: decoding on the CPU",
                        clip.preprocess)
    elif pipeline != "cpu":
        raise ValueError(f"pipeline {pipeline!r} is not one of cpu, device")
    shards = [np.asarray(shard, dtype=np.int64) for shard in shards]
    if any(len(shard) == 0 for shard in shards):
        raise ValueError("every shard must hold at least one index")
    batches = [shard[a : a + batch_size] for shard in shards for a in range(0, len(shard), batch_size)]
    forward = _Forward(clip, classifier, batch_size, device, precision)
    pending: dict[str, list[np.ndarray]] = {name: [] for name in PREDICTION_FIELDS}
    current, done_in_shard, bad = 0, 0, 0

    def finish(output: dict[str, np.ndarray], errors: Sequence[str], logged: bool = False
               ) -> Iterator[dict[str, np.ndarray]]:
        nonlocal current, done_in_shard, bad
        for error in errors:
            if error:
                if not logged:
                    log.warning("corrupt image skipped: %s", error)
                bad += 1
        for name in PREDICTION_FIELDS:
            pending[name].append(output[name])
        done_in_shard += len(output["valid"])
        bar.update(len(output["valid"]))
        while current < len(shards) and done_in_shard == len(shards[current]):
            yield {name: np.concatenate(parts, axis=0) for name, parts in pending.items()}
            for parts in pending.values():
                parts.clear()
            current, done_in_shard = current + 1, 0

    with tqdm(total=sum(len(s) for s in shards), desc="CLIP", unit="img", disable=not progress) as bar:
        rest = batches
        if preprocess is not None:
            yield from _device_batches(forward, preprocess, table, batches, num_workers, finish)
            rest = []
        elif num_workers is None:
            num_workers, first = _measure_and_choose(forward, table, clip, batches, device)
            yield from finish(*first)
            rest = batches[1:]
        if rest:
            flat = np.concatenate(rest)
            offsets = np.cumsum([0] + [len(indices) for indices in rest])
            loader = DataLoader(
                _Items(table, clip.preprocess, flat),
                batch_sampler=[range(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)],
                num_workers=num_workers,
                collate_fn=_collate,
                pin_memory=device.type == "cuda",
                worker_init_fn=ignore_stop_signals if num_workers else None,
            )
            # The loader is iterated directly: wrapping it in tqdm.auto (tqdm.asyncio) called iter() on it in
            # the bar's constructor, starting a second set of workers that decoded (and logged) every
            # prefetched image a second time.
            for batch in unwrap_worker_errors(iter(loader)):
                yield from finish(forward(batch["image"], batch["ok"]), batch["error"])
    if bad:
        log.warning("skipped %d corrupt image(s) of %s/%s (named above)", bad, table.dataset, table.split)


def _device_batches(forward: _Forward, preprocess, table: SampleTable, batches, num_workers: int | None, finish):
    """The device pipeline: workers read the encoded files, each batch is decoded and preprocessed on the
    forward's device, the next batch prepared while the current one is encoded (data.device.Prefetcher).
    num_workers None: reading bytes is cheap, so one worker per spare core, at most 4."""
    from zeroshot_adapt.data.device import EncodedItems, Prefetcher, decode_images

    if num_workers is None:
        num_workers = min(4, max(0, available_cores() - 1)) if len(batches) >= MIN_BATCHES_TO_MEASURE else 0
        log.info("cache build (device pipeline): %d DataLoader worker(s) reading files", num_workers)
    flat = np.concatenate(batches)
    offsets = np.cumsum([0] + [len(indices) for indices in batches])
    dataset = EncodedItems(table, flat)
    loader = DataLoader(
        dataset,
        batch_sampler=[range(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)],
        num_workers=num_workers,
        collate_fn=dataset.collate_fn,
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )

    def prepare(batch: dict) -> tuple[Tensor, Tensor, list[str]]:
        decoded = decode_images(batch["image"], forward.device)  # logs the images it could not decode
        images = preprocess(decoded.images, channels_last=forward.channels_last)
        return images, decoded.ok.to(forward.device, non_blocking=True), decoded.failures

    for images, ok, failures in Prefetcher(unwrap_worker_errors(iter(loader)), prepare, forward.device):
        yield from finish(forward(images, ok), failures, logged=True)


def _is_channels_last(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _measure_and_choose(forward: _Forward, table: SampleTable, clip: ClipModel, batches, device: torch.device):
    """Decode + forward the first batch in this process, timing both; choose the worker count for the rest.
    Returns (num_workers, (output of the first batch, its error messages))."""
    indices = batches[0]
    started = time.perf_counter()
    items = _collate([_Items(table, clip.preprocess, indices)[i] for i in range(len(indices))])
    decode_s = (time.perf_counter() - started) / len(indices)
    output = forward(items["image"], items["ok"])  # (the first call pays one-off set-up costs)
    forward.synchronize()
    if len(batches) < MIN_BATCHES_TO_MEASURE:
        log.info("cache build: %d batch(es) only, decoding in the main process (0 DataLoader workers)", len(batches))
        return 0, (output, items["error"])
    started = time.perf_counter()
    forward(items["image"], items["ok"])
    forward.synchronize()
    forward_s = (time.perf_counter() - started) / len(indices)
    cores = available_cores()
    workers = choose_num_workers(decode_s, forward_s, cores=cores, forward_on_host=device.type == "cpu")
    log.info(
        "cache build: decode+preprocess %.2f ms/img, forward %.2f ms/img on %s, %d cores: %d DataLoader worker(s) "
        "(set teacher.num_workers to override)",
        1e3 * decode_s, 1e3 * forward_s, device.type, cores, workers,
    )
    return workers, (output, items["error"])


@torch.no_grad()
def predict_indices(
    clip: ClipModel,
    classifier: Tensor,
    table: SampleTable,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 256,
    num_workers: int | None = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
    precision: str = "fp16",
    pipeline: str = "cpu",
) -> dict[str, np.ndarray]:
    """CLIP predictions for `table[indices]` (one shard of `predict_shards`; num_workers None: measured).

    Returns {"logits": float16 [n, C], "features": float16 [n, D] (L2-normalized),
    "confidence": float32 [n] (max softmax), "prediction": int64 [n] (argmax), "valid": uint8 [n]}.
    Corrupt images are skipped and counted: valid 0, prediction -1, confidence 0, zero logits.
    precision: autocast on CUDA (fp16 | bf16 | fp32); a CPU runs in fp32. pipeline: cpu | device.
    """
    shard = np.asarray(indices, dtype=np.int64)
    (result,) = predict_shards(clip, classifier, table, [shard], batch_size=batch_size, num_workers=num_workers,
                               device=device, progress=progress, precision=precision, pipeline=pipeline)
    return result


def predict_indices_device(clip: ClipModel, classifier: Tensor, table: SampleTable,
                           indices: Sequence[int] | np.ndarray, **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`predict_indices` with the device pipeline (decode and preprocess on the device)."""
    return predict_indices(clip, classifier, table, indices, pipeline="device", **kwargs)
