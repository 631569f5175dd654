"""Predict with an exported model (a folder written by `zsa export`): top-k classes and confidences.

``zsa predict --model DIR --data-dir images/ --out predictions.csv`` and, in Python,

    >>> import zeroshot_adapt
    >>> result = zeroshot_adapt.predict_folder("exported/", "images/", top_k=5)
    >>> result.keys[0], result.labels()[0], result.probs[0]        # path, top-5 names, top-5 probabilities
    >>> result = zeroshot_adapt.predict_images("exported/", [pil_image, "a.png"], top_k=1)

Images: every image file under the folder (flat or nested, links followed once: the project's FolderWalker),
decoded like training images (`data.sources.decode_image`: RGB). A file that cannot be decoded (corrupt,
truncated, not an image) or read is skipped and reported (``PredictionResult.skipped``: key and reason), never
fatal. Preprocessing is timm's eval transform built from the folder's config.json (input size, mean, std,
interpolation, crop_pct), which `zsa export` checked equals the run's eval transform. Probabilities are the
softmax of the model's logits (float32); ``indices`` / ``probs`` are sorted most probable first.
"""

from __future__ import annotations

import csv
import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from zeroshot_adapt.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 64
SHOWN_SKIPPED = 5  # skipped files named in the log line


@dataclass
class PredictionResult:
    """Top-k predictions of N images (rows in input order; skipped inputs have no row).

    keys: [N] the inputs' names (a folder's paths relative to it, as posix); indices: [N, k] int64 class ids,
    most probable first; probs: [N, k] float32 softmax probabilities of those classes; class_names: [C];
    skipped: {"key", "reason"} per input that could not be decoded or read."""

    keys: list[str]
    indices: np.ndarray
    probs: np.ndarray
    class_names: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def top_k(self) -> int:
        return int(self.indices.shape[1])

    def labels(self) -> list[list[str]]:
        """[N][k] class names of ``indices``."""
        return [[self.class_names[int(i)] for i in row] for row in self.indices]

    def summary(self) -> dict[str, Any]:
        return {"num_predicted": len(self.keys), "num_skipped": len(self.skipped), "top_k": self.top_k,
                "class_names": list(self.class_names), "skipped": list(self.skipped)}


def csv_header(top_k: int) -> list[str]:
    """key, then top1_class, top1_confidence, ..., top{k}_class, top{k}_confidence."""
    return ["key", *[f"top{i}_{what}" for i in range(1, top_k + 1) for what in ("class", "confidence")]]


def write_predictions_csv(result: PredictionResult, path: str | Path) -> Path:
    """One row per predicted image (csv_header columns; confidences with 6 decimals), written atomically."""
    from zeroshot_adapt.fileio import atomic_write

    path = Path(path)
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)  # quotes keys holding commas, quotes or newlines
        writer.writerow(csv_header(result.top_k))
        for key, names, probs in zip(result.keys, result.labels(), result.probs, strict=True):
            writer.writerow([key, *[v for name, p in zip(names, probs, strict=True) for v in (name, f"{p:.6f}")]])
    return path


def summary_path(csv_path: str | Path) -> Path:
    """The sidecar JSON next to a predictions CSV: predictions.csv -> predictions.summary.json."""
    path = Path(csv_path)
    return path.with_name(f"{path.stem}.summary.json")


class _Inputs(torch.utils.data.Dataset):
    """(tensor, ok, reason) per input: a path decoded with decode_image, or a PIL image; failures are reported."""

    def __init__(self, items: Sequence[Any], keys: Sequence[str], transform, input_size: tuple[int, int, int]):
        self.items, self.keys, self.transform, self.input_size = list(items), list(keys), transform, input_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        from zeroshot_adapt.data.sources import CorruptImageError, ImageReadError, decode_image

        item = self.items[index]
        try:
            image = item.convert("RGB") if isinstance(item, Image.Image) else decode_image(str(item), self.keys[index])
            return self.transform(image), True, ""
        except CorruptImageError as error:
            return torch.zeros(self.input_size), False, f"corrupt: {error.reason or error}"
        except ImageReadError as error:
            return torch.zeros(self.input_size), False, f"unreadable: {error.reason or error}"
        except (OSError, ValueError, SyntaxError) as error:  # a lazily loaded, truncated PIL image given by the caller
            return torch.zeros(self.input_size), False, f"corrupt: {error}"


def _collate(batch):
    images, ok, reasons = zip(*batch, strict=True)
    return torch.stack(images), torch.tensor(ok), list(reasons)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, default cuda when available else cpu; UserError for a name torch does not know or cannot use."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    return resolved


class Predictor:
    """An exported model ready to predict: ``Predictor.load(DIR)``, then `predict_folder` / `predict_images`."""

    def __init__(self, model: nn.Module, info, device: torch.device):
        self.model, self.info, self.device = model, info, device
        self.transform = info.transform

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str | torch.device | None = None) -> Predictor:
        from zeroshot_adapt.export import load_exported

        resolved = resolve_device(device)
        model, info = load_exported(model_dir, device=resolved)
        return cls(model, info, resolved)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    def _check_top_k(self, top_k: int | None) -> int:
        """None: min(DEFAULT_TOP_K, classes), so a 3-class model works with the defaults; an explicit value must
        be in 1..classes."""
        num_classes = len(self.info.class_names)
        if top_k is None:
            return min(DEFAULT_TOP_K, num_classes)
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= num_classes:
            raise UserError(f"--top-k {top_k!r} must be an integer in 1..{num_classes} (the model's classes)")
        return int(top_k)

    @torch.no_grad()
    def predict(
        self,
        items: Sequence[Any],
        keys: Sequence[str],
        *,
        top_k: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_workers: int = 0,
        progress: bool = True,
    ) -> PredictionResult:
        """Top-k of each item (a path or a PIL image), named by `keys`; undecodable items are skipped."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        top_k = self._check_top_k(top_k)
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size} must be >= 1")
        if num_workers < 0:
            raise UserError(f"--num-workers {num_workers} must be >= 0")
        dataset = _Inputs(items, keys, self.transform, tuple(self.info.data_config["input_size"]))
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
        kept: list[str] = []
        skipped: list[dict[str, str]] = []
        indices, probs = [], []
        position = 0
        with tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress) as bar:
            for images, ok, reasons in loader:
                batch_keys = dataset.keys[position:position + len(ok)]
                position += len(ok)
                bar.update(len(ok))
                for key, good, reason in zip(batch_keys, ok.tolist(), reasons, strict=True):
                    (kept.append(key) if good else skipped.append({"key": key, "reason": reason}))
                if not ok.any():
                    continue
                logits = self.model(images[ok].to(self.device)).float()
                top = torch.softmax(logits, dim=1).topk(top_k, dim=1)  # sorted, most probable first
                indices.append(top.indices.cpu().numpy().astype(np.int64))
                probs.append(top.values.cpu().numpy().astype(np.float32))
        if skipped:
            shown = ", ".join(s["key"] for s in skipped[:SHOWN_SKIPPED]) + (" ..." if len(skipped) > SHOWN_SKIPPED
                                                                            else "")
            log.warning("%d of %d image(s) could not be decoded and were skipped: %s", len(skipped), len(dataset),
                        shown)
        return PredictionResult(
            keys=kept,
            indices=np.concatenate(indices) if indices else np.zeros((0, top_k), np.int64),
            probs=np.concatenate(probs) if probs else np.zeros((0, top_k), np.float32),
            class_names=self.class_names,
            skipped=skipped,
        )

    def predict_folder(self, data_dir: str | Path, **kwargs: Any) -> PredictionResult:
        """Every image file under `data_dir` (flat or nested), keyed by its path relative to `data_dir`."""
        from zeroshot_adapt.data.sources import list_image_files

        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--data-dir {str(root)!r} is not a folder of images")
        files, keys = list_image_files(root, f"--data-dir {str(root)!r}")
        return self.predict(files, keys, **kwargs)

    def predict_images(self, images: Sequence[Image.Image | str | Path], *, keys: Sequence[str] | None = None,
                       **kwargs: Any) -> PredictionResult:
        """PIL images and / or image paths; keys default to the paths, and ``"image-<index>"`` (the position in
        `images`) for PIL images."""
        images = list(images)
        if keys is None:
            keys = [str(item) if isinstance(item, (str, Path)) else f"image-{i}" for i, item in enumerate(images)]
        if len(keys) != len(images):
            raise UserError(f"{len(keys)} keys for {len(images)} images")
        return self.predict(images, keys, **kwargs)


def predict_folder(model_dir: str | Path, data_dir: str | Path, *, top_k: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
                   num_workers: int = 0, progress: bool = True) -> PredictionResult:
    """Top-k predictions of the exported model in `model_dir` on every image under `data_dir`."""
    predictor = Predictor.load(model_dir, device=device)
    return predictor.predict_folder(data_dir, top_k=top_k, batch_size=batch_size, num_workers=num_workers,
                                    progress=progress)


def predict_images(model_dir: str | Path, images: Sequence[Image.Image | str | Path], *, top_k: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
                   keys: Sequence[str] | None = None, progress: bool = False) -> PredictionResult:
    """Top-k predictions of the exported model in `model_dir` on PIL images and / or image paths."""
    predictor = Predictor.load(model_dir, device=device)
    return predictor.predict_images(images, keys=keys, top_k=top_k, batch_size=batch_size, progress=progress)
