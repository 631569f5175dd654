"""Batched CLIP inference over a SampleTable, with the CPU pipeline (workers decode with PIL) or the device
pipeline (workers read bytes, the device decodes and preprocesses); autocast on GPU, progress bar."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from zeroshot_adapt.data.base import SampleTable
from zeroshot_adapt.data.datasets import TableDataset
from zeroshot_adapt.models.acceleration import inference_autocast
from zeroshot_adapt.teacher.classifier import zeroshot_logits
from zeroshot_adapt.teacher.clip import ClipModel

log = logging.getLogger(__name__)

INVALID = -1


FIELDS = ("logits", "features", "confidence", "prediction", "valid")


class _Outputs:
    """Per-batch CLIP outputs -> the cache's arrays; invalid (corrupt) rows are zeroed and get prediction -1."""

    def __init__(self, classifier: Tensor, scale: float) -> None:
        self.classifier, self.scale = classifier, scale
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}

    def add(self, features: Tensor, valid: Tensor) -> None:
        """features: [B, D] image embeddings (any dtype); valid: [B] bool on the same device."""
        features = F.normalize(features.float(), dim=-1)
        logits = zeroshot_logits(features, self.classifier, self.scale)
        confidence, prediction = logits.softmax(dim=-1).max(dim=-1)
        logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
        features = torch.where(valid[:, None], features, torch.zeros_like(features))
        confidence = torch.where(valid, confidence, torch.zeros_like(confidence))
        prediction = torch.where(valid, prediction, torch.full_like(prediction, INVALID))
        self.parts["logits"].append(logits.half().cpu().numpy())
        self.parts["features"].append(features.half().cpu().numpy())
        self.parts["confidence"].append(confidence.float().cpu().numpy())
        self.parts["prediction"].append(prediction.long().cpu().numpy())
        self.parts["valid"].append(valid.cpu().numpy().astype(np.uint8))

    def result(self, table: SampleTable, indices: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {name: np.concatenate(parts, axis=0) for name, parts in self.parts.items()}
        bad = [table.keys[i] for i, ok in zip(indices, arrays["valid"], strict=True) if not ok]
        if bad:
            log.warning("skipped %d corrupt image(s): %s%s", len(bad), ", ".join(bad[:10]),
                        " ..." if len(bad) > 10 else "")
        return arrays


@torch.no_grad()
def predict_indices(
    clip: ClipModel,
    classifier: Tensor,
    table: SampleTable,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
    precision: str = "fp16",
) -> dict[str, np.ndarray]:
    """CLIP predictions for `table[indices]` (the CPU pipeline: workers decode and preprocess with PIL).

    Returns {"logits": float16 [n, C], "features": float16 [n, D] (L2-normalized),
    "confidence": float32 [n] (max softmax), "prediction": int64 [n] (argmax), "valid": uint8 [n]}.
    Corrupt images are skipped and counted: valid 0, prediction -1, confidence 0, zero logits.
    precision: autocast on CUDA (fp16 | bf16 | fp32); CPU runs in fp32.
    """
    device = torch.device(device)
    dataset = TableDataset(table, clip.preprocess, indices=np.asarray(indices, dtype=np.int64))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    outputs = _Outputs(classifier.to(device), clip.logit_scale)
    channels_last = _is_channels_last(clip.model)
    for batch in tqdm(loader, desc="CLIP", unit="batch", disable=not progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with inference_autocast(device, precision):
            features = clip.model.encode_image(images)
        outputs.add(features, batch["ok"].to(device))
    return outputs.result(table, dataset.indices)


@torch.no_grad()
def predict_indices_device(
    clip: ClipModel,
    classifier: Tensor,
    table: SampleTable,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
    precision: str = "fp16",
) -> dict[str, np.ndarray]:
    """:func:`predict_indices` with the device pipeline (data/device.py): workers read the encoded files,
    the device decodes each batch (nvJPEG on CUDA) and applies CLIP's eval preprocessing as tensor ops,
    the next batch is prepared while the model encodes the current one. Same outputs and skip-and-count
    rule; the pixels differ slightly from PIL's (decoder and resize implementation), which is why the
    cache identity records the pipeline. Falls back to :func:`predict_indices` if CLIP's preprocess holds
    steps the tensor version does not know."""
    from zeroshot_adapt.data.device import EncodedItems, Prefetcher, TensorPreprocess, decode_images

    preprocess = TensorPreprocess.from_transform(clip.preprocess)
    if preprocess is None:
        log.warning("CLIP preprocess %s has steps the device pipeline does not support: decoding on the CPU",
                    clip.preprocess)
        return predict_indices(clip, classifier, table, indices, batch_size=batch_size, num_workers=num_workers,
                               device=device, progress=progress, precision=precision)
    device = torch.device(device)
    dataset = EncodedItems(table, np.asarray(indices, dtype=np.int64))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=dataset.collate_fn, persistent_workers=False)
    channels_last = _is_channels_last(clip.model)

    def prepare(batch: dict) -> tuple[Tensor, Tensor]:
        decoded = decode_images(batch["image"], device)
        return preprocess(decoded.images, channels_last=channels_last), decoded.ok.to(device, non_blocking=True)

    outputs = _Outputs(classifier.to(device), clip.logit_scale)
    batches = Prefetcher(iter(loader), prepare, device)
    for images, valid in tqdm(batches, total=len(loader), desc="CLIP", unit="batch", disable=not progress,
                              leave=False):
        with inference_autocast(device, precision):
            features = clip.model.encode_image(images)
        outputs.add(features, valid)
    return outputs.result(table, dataset.indices)


def _is_channels_last(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
