"""The device input pipeline: workers read encoded bytes, the accelerator decodes and augments whole batches.

CPU pipeline (``data.pipeline: cpu``, the default): DataLoader workers decode every image with PIL and
render each view with the PIL executor (``data/transforms.py``); the main process copies float tensors.

Device pipeline (``data.pipeline: device``): a worker's work per image is a file read, a JPEG header parse
(for the image size) and drawing the views' parameters (``augment_ops.sample_view``, seeded per item
exactly like the CPU pipeline, so both draw identical parameters). The main process then

1. decodes the batch's JPEGs with ``torchvision.io.decode_jpeg`` on the training device (nvJPEG on CUDA,
   libjpeg-turbo on CPU); a JPEG that fails is retried alone, then with PIL, and is otherwise skipped and
   counted (:class:`DecodedImages`); images that are not JPEG files (PNG, in-memory arrays) are decoded by
   the workers as before and arrive as uint8 pixels;
2. renders every view with the batched tensor executor (``augment_ops.render_batch``) and normalizes.

:class:`Prefetcher` prepares the next batch while the current one computes (a side CUDA stream on GPUs),
for the training loop and for the teacher cache build alike.

``auto`` picks ``device`` where the training device is CUDA and ``cpu`` elsewhere (on a CPU the "device"
is the main process, which would decode serially what workers decode in parallel).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from zeroshot_adapt.algorithms.base import Batch, LabeledBatch, UnlabeledBatch
from zeroshot_adapt.data.augment_ops import (
    AugmentRecipe,
    BatchParams,
    ViewParams,
    normalize_batch,
    render_batch,
    sample_view,
)
from zeroshot_adapt.data.base import IndexedLoader, SampleTable
from zeroshot_adapt.data.datasets import aligned_clip_outputs
from zeroshot_adapt.data.sources import (
    ArrayImageLoader,
    CorruptImageError,
    FileImageLoader,
    HFImageLoader,
    decode_image,
)
from zeroshot_adapt.errors import UserError

log = logging.getLogger(__name__)

PIPELINES = ("cpu", "device", "auto")
JPEG_MAGIC = b"\xff\xd8\xff"
PLACEHOLDER_SIDE = 32  # a corrupt image becomes a black placeholder of this size (skipped and counted)
T = TypeVar("T")


def resolve_pipeline(name: str, device: torch.device | str) -> str:
    """``cpu`` | ``device`` | ``auto`` -> ``cpu`` or ``device`` (auto: device on CUDA, cpu elsewhere)."""
    if name not in PIPELINES:
        raise UserError(f"data.pipeline={name!r} is not one of {', '.join(PIPELINES)}")
    if name == "auto":
        return "device" if torch.device(device).type == "cuda" else "cpu"
    return name


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class EncodedImage:
    """What a worker hands over for one image.

    kind "jpeg": ``data`` holds the file's bytes (decoded later on the device); "pixels": ``data`` holds
    decoded uint8 RGB [H, W, 3] (non-JPEG files, in-memory arrays); "corrupt": unreadable (``reason``).
    height / width: the image size (from the JPEG header for "jpeg")."""

    kind: str
    data: bytes | np.ndarray | None
    height: int
    width: int
    name: str
    reason: str = ""


def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def encode_source(source: bytes | str, name: str) -> EncodedImage:
    """Bytes (or a file path) -> an EncodedImage: JPEGs stay encoded (only the header is parsed), anything
    else is decoded here with PIL; unreadable data becomes kind "corrupt"."""
    try:
        data = _file_bytes(source) if isinstance(source, str) else source
    except OSError as error:
        return EncodedImage("corrupt", None, PLACEHOLDER_SIDE, PLACEHOLDER_SIDE, name, str(error))
    if data[: len(JPEG_MAGIC)] == JPEG_MAGIC:
        try:
            with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
                width, height = image.size
            return EncodedImage("jpeg", data, height, width, name)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return EncodedImage("corrupt", None, PLACEHOLDER_SIDE, PLACEHOLDER_SIDE, name, str(error))
    try:
        return _pixels(decode_image(data, name), name)
    except CorruptImageError as error:
        return EncodedImage("corrupt", None, PLACEHOLDER_SIDE, PLACEHOLDER_SIDE, name, error.reason)


def _pixels(image: Image.Image, name: str) -> EncodedImage:
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
    return EncodedImage("pixels", array, array.shape[0], array.shape[1], name)


class EncodedReader:
    """Picklable ``index -> EncodedImage`` for a SampleTable: reads file bytes where the table's loader is a
    file or Hugging Face loader (through any chain of subsets), hands over pixels for in-memory arrays, and
    falls back to the table's own ``load_image`` (decoded by PIL in the worker) for anything else."""

    def __init__(self, table: SampleTable) -> None:
        loader, positions = table.load_image, None
        while isinstance(loader, IndexedLoader):
            positions = loader.positions if positions is None else loader.positions[positions]
            loader = loader.parent
        self.table_loader = table.load_image
        self.base = loader
        self.positions = positions
        self.keys = table.keys

    def __call__(self, index: int) -> EncodedImage:
        name = str(self.keys[index])
        base_index = int(index if self.positions is None else self.positions[index])
        base = self.base
        if isinstance(base, FileImageLoader):
            path = base.paths[base_index]
            return encode_source(path, path)
        if isinstance(base, HFImageLoader):
            cell = base.dataset[base_index][base.column] or {}
            data, path = cell.get("bytes"), cell.get("path")
            if data is None and not path:
                return EncodedImage("corrupt", None, PLACEHOLDER_SIDE, PLACEHOLDER_SIDE, name, "no image")
            return encode_source(data if data is not None else path, name)
        if isinstance(base, ArrayImageLoader):
            return _pixels(base(base_index), name)
        try:
            return _pixels(self.table_loader(index), name)
        except CorruptImageError as error:
            return EncodedImage("corrupt", None, PLACEHOLDER_SIDE, PLACEHOLDER_SIDE, name, error.reason)


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class DecodedImages:
    """images: uint8 RGB [3, H_i, W_i] per input, on the target device (a black placeholder where decoding
    failed); ok: [B] bool; failures: the names of the images that failed, with the reason."""

    images: list[Tensor]
    ok: Tensor
    failures: list[str] = field(default_factory=list)


def _decode_jpeg_cpu_pil(data: bytes, name: str) -> Tensor:
    array = np.asarray(decode_image(data, name), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_images(encoded: Sequence[EncodedImage], device: torch.device | str) -> DecodedImages:
    """Decode a batch on ``device``: all JPEGs in one ``torchvision.io.decode_jpeg`` call (batched nvJPEG on
    CUDA); if that call fails, each JPEG alone, then PIL on the CPU; an image no decoder can read is skipped
    and counted (ok False, black placeholder), never fatal."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    images: list[Tensor | None] = [None] * len(encoded)
    ok = [True] * len(encoded)
    failures: list[str] = []
    jpeg_positions = [i for i, item in enumerate(encoded) if item.kind == "jpeg"]
    buffers = [torch.frombuffer(bytearray(encoded[i].data), dtype=torch.uint8) for i in jpeg_positions]  # type: ignore[arg-type]
    decoded: list[Tensor] | None = None
    if buffers:
        try:
            decoded = decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = None  # one bad file fails the whole call: decode one by one below
    for k, i in enumerate(jpeg_positions):
        item = encoded[i]
        if decoded is not None:
            images[i] = decoded[k]
            continue
        try:
            images[i] = decode_jpeg(buffers[k], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            try:  # e.g. a CMYK or progressive file the device decoder refuses
                images[i] = _decode_jpeg_cpu_pil(item.data, item.name).to(device)  # type: ignore[arg-type]
            except CorruptImageError as error:
                ok[i] = False
                failures.append(f"{item.name} ({error.reason})")
    for i, item in enumerate(encoded):
        if item.kind == "pixels":
            images[i] = torch.from_numpy(np.ascontiguousarray(item.data)).permute(2, 0, 1).to(device, non_blocking=True)
        elif item.kind == "corrupt":
            ok[i] = False
            failures.append(f"{item.name} ({item.reason})")
        if images[i] is None:
            images[i] = torch.zeros(3, item.height, item.width, dtype=torch.uint8, device=device)
    if failures:
        log.warning("skipped %d corrupt image(s): %s", len(failures), "; ".join(failures[:10]))
    return DecodedImages(images=images, ok=torch.tensor(ok, dtype=torch.bool), failures=failures)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ datasets


def _collate_value(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, EncodedImage):
        return list(values)
    if isinstance(first, ViewParams):
        return BatchParams.stack(values)
    if isinstance(first, list):  # one entry per view
        return [_collate_value([v[k] for v in values]) for k in range(len(first))]
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float32)
    if isinstance(first, (bool, int, np.integer)):
        return torch.tensor(values)
    return values


def collate_encoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate for the encoded datasets: EncodedImages stay a list, view parameters become
    BatchParams, numbers become tensors."""
    return {key: _collate_value([item[key] for item in items]) for key in items[0]}


class EncodedItems(Dataset):
    """{"position": int, "image": EncodedImage} for ``table[indices]`` (the teacher cache build)."""

    collate_fn = staticmethod(collate_encoded)

    def __init__(self, table: SampleTable, indices: np.ndarray | None = None) -> None:
        self.read = EncodedReader(table)
        self.indices = np.arange(len(table), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {"position": position, "image": self.read(int(self.indices[position]))}


class EncodedLabeledViews(Dataset):
    """The device pipeline's LabeledViews: {"image": EncodedImage, "weak": ViewParams, "target": int}."""

    collate_fn = staticmethod(collate_encoded)

    def __init__(self, table: SampleTable, indices: Sequence[int], targets: Sequence[int], recipe: AugmentRecipe):
        if len(indices) != len(targets):
            raise ValueError(f"{len(indices)} indices but {len(targets)} targets")
        self.read, self.recipe = EncodedReader(table), recipe
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        image = self.read(int(self.indices[position]))
        weak = sample_view(self.recipe, image.height, image.width, strong=False)
        return {"image": image, "weak": weak, "target": int(self.targets[position])}


class EncodedUnlabeledViews(Dataset):
    """The device pipeline's UnlabeledViews: the encoded image, the parameters of its weak and strong
    views (drawn in the CPU pipeline's order: every weak view, then every strong view) and the same
    labels and cached CLIP outputs as ``datasets.UnlabeledViews``."""

    collate_fn = staticmethod(collate_encoded)

    def __init__(
        self,
        table: SampleTable,
        indices: Sequence[int],
        recipe: AugmentRecipe,
        *,
        num_views: int = 1,
        clip_label: np.ndarray | None = None,
        clip_confidence: np.ndarray | None = None,
    ) -> None:
        self.read, self.recipe, self.num_views = EncodedReader(table), recipe, num_views
        self.labels = np.asarray(table.labels)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.clip_label, self.clip_confidence = aligned_clip_outputs(len(self.indices), clip_label, clip_confidence)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = int(self.indices[position])
        image = self.read(index)
        h, w = image.height, image.width
        return {
            "image": image,
            "weak": [sample_view(self.recipe, h, w, strong=False) for _ in range(self.num_views)],
            "strong": [sample_view(self.recipe, h, w, strong=True) for _ in range(self.num_views)],
            "index": position,
            "true_label": int(self.labels[index]),
            "clip_label": int(self.clip_label[position]),
            "clip_confidence": float(self.clip_confidence[position]),
        }


# ------------------------------------------------------------------------------------------ batches


class DeviceViews:
    """The training loop's batch preparation for the device pipeline:
    ``(labeled item batch | None, unlabeled item batch | None, device) -> Batch``.

    Each image is decoded once (all images of the step in one decode call), then every view is rendered
    from it with its own parameters. ``decode_failures`` counts images skipped as corrupt (they stay in the
    batch as black placeholders, so shapes never change; the CLIP cache already drops the images it could
    not read, so in T-ZSL training this stays 0)."""

    def __init__(self, recipe: AugmentRecipe, mean: Sequence[float], std: Sequence[float], *,
                 channels_last: bool = False) -> None:
        self.recipe, self.mean, self.std, self.channels_last = recipe, tuple(mean), tuple(std), channels_last
        self.decode_failures = 0

    def decode(self, encoded: list[EncodedImage], device: torch.device) -> DecodedImages:
        return decode_images(encoded, device)

    def _views(self, images: list[Tensor], params: BatchParams) -> Tensor:
        rendered = render_batch(images, params, self.recipe)
        return normalize_batch(rendered, self.mean, self.std, channels_last=self.channels_last)

    def __call__(self, labeled: dict | None, unlabeled: dict | None, device: torch.device) -> Batch:
        encoded = (labeled["image"] if labeled is not None else []) + (unlabeled["image"] if unlabeled else [])
        decoded = self.decode(encoded, device)
        self.decode_failures += len(decoded.failures)
        split = len(labeled["image"]) if labeled is not None else 0
        lab = unl = None
        if labeled is not None:
            lab = LabeledBatch(images=self._views(decoded.images[:split], labeled["weak"]),
                               targets=labeled["target"].to(device, non_blocking=True))
        if unlabeled is not None:
            images = decoded.images[split:]
            unl = UnlabeledBatch(
                weak=[self._views(images, params) for params in unlabeled["weak"]],
                strong=[self._views(images, params) for params in unlabeled["strong"]],
                index=unlabeled["index"].to(device, non_blocking=True),
                true_label=unlabeled["true_label"].to(device, non_blocking=True),
                clip_label=unlabeled["clip_label"].to(device, non_blocking=True),
                clip_confidence=unlabeled["clip_confidence"].to(device, non_blocking=True).float(),
            )
        return Batch(labeled=lab, unlabeled=unl)


# ------------------------------------------------------------------------------------------ overlap


_END = object()


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif is_dataclass(value) and not isinstance(value, type):
        for item in fields(value):
            yield from _tensors(getattr(value, item.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class Prefetcher:
    """``prepare(item)`` for each item of ``source``, one item ahead.

    On CUDA the next item is prepared (read from the loader, copied, decoded, augmented) on a side stream
    right after the current one is handed out, so its kernels run while the caller's forward/backward of the
    current one runs; the consumer's stream waits for the side stream before using an item, and every tensor
    is marked as used by the consumer's stream so the allocator does not recycle it early. Elsewhere an item
    is prepared when asked for (without a second stream there is nothing to overlap with). ``prepare`` must
    not draw random numbers (the augmentation parameters come from the items), so the lookahead changes
    nothing but timing."""

    def __init__(self, source: Iterator[Any], prepare: Callable[[Any], T], device: torch.device | str) -> None:
        self.source, self.prepare = source, prepare
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: Any = None
        self._primed = False

    def __iter__(self) -> Prefetcher:
        return self

    def _load(self) -> Any:
        try:
            item = next(self.source)
        except StopIteration:
            return _END
        with torch.cuda.stream(self.stream):  # type: ignore[arg-type]
            return self.prepare(item)

    def __next__(self) -> T:
        if self.stream is None:
            return self.prepare(next(self.source))
        if not self._primed:
            self._ahead, self._primed = self._load(), True
        current = self._ahead
        if current is _END:
            raise StopIteration
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.stream)
        for tensor in _tensors(current):
            if tensor.device.type == "cuda":
                tensor.record_stream(consumer)
        self._ahead = self._load()
        return current


class StepItems:
    """Iterator of (labeled item batch | None, unlabeled item batch | None), one per micro-step; stops when a
    stream that exists is exhausted."""

    def __init__(self, labeled: Iterator | None, unlabeled: Iterator | None) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled

    def __iter__(self) -> StepItems:
        return self

    def __next__(self) -> tuple[Any, Any]:
        lab = next(self.labeled) if self.labeled is not None else None
        unl = next(self.unlabeled) if self.unlabeled is not None else None
        return lab, unl


def batch_feed(
    labeled: Iterator | None,
    unlabeled: Iterator | None,
    prepare: Callable[[Any, Any, torch.device], Batch],
    device: torch.device,
) -> Prefetcher:
    """The loop's source of Batches: each micro-step's loader outputs through ``prepare`` (``train._to_batch``
    for the CPU pipeline, :class:`DeviceViews` for the device pipeline), one step ahead on CUDA."""
    return Prefetcher(StepItems(labeled, unlabeled), lambda pair: prepare(pair[0], pair[1], device), device)


# ------------------------------------------------------------------------------------------ eval preprocessing


@dataclass(frozen=True)
class TensorPreprocess:
    """A Resize -> CenterCrop -> ToTensor -> Normalize eval pipeline (what open_clip's ``preprocess`` is) on
    uint8 tensors: images [3, H_i, W_i] -> float32 [B, 3, S, S] on their device. Images of equal size are
    resized in one call. ``resize``: the shorter side (int) or (height, width)."""

    resize: int | tuple[int, int]
    interpolation: Any
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Sequence[Tensor], *, channels_last: bool = False) -> Tensor:
        import torchvision.transforms.v2.functional as TF

        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        out = images[0].new_empty((len(images), 3, *self.crop))
        for members in groups.values():
            batch = torch.stack([images[i] for i in members])
            resized = TF.resize(batch, size, self.interpolation, antialias=True)
            out[torch.as_tensor(members, device=out.device)] = TF.center_crop(resized, list(self.crop))
        return normalize_batch(out, self.mean, self.std, channels_last=channels_last)

    @classmethod
    def from_transform(cls, transform: Any) -> TensorPreprocess | None:
        """The tensor form of a torchvision ``Compose`` of Resize, CenterCrop, ToTensor-like steps and Normalize
        (open_clip's eval ``preprocess``); None if it holds anything else (the caller then keeps the CPU path)."""
        steps = getattr(transform, "transforms", None)
        if steps is None:
            return None
        resize = crop = mean = std = interpolation = None
        passive = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb", "ConvertImageDtype"}
        for step in steps:
            kind = type(step).__name__ if type(step).__name__ != "function" else step.__name__
            if kind == "Resize" and resize is None and getattr(step, "max_size", None) is None:
                resize = step.size if isinstance(step.size, int) else tuple(step.size)
                if isinstance(resize, tuple) and len(resize) == 1:
                    resize = resize[0]
                interpolation = step.interpolation
            elif kind == "CenterCrop" and crop is None and resize is not None:
                crop = tuple(step.size) if not isinstance(step.size, int) else (step.size, step.size)
            elif kind == "Normalize" and mean is None:
                mean, std = tuple(step.mean), tuple(step.std)
            elif kind not in passive:
                return None
        if resize is None or crop is None or mean is None:
            return None
        return cls(resize=resize, interpolation=interpolation, crop=crop, mean=mean, std=std)  # type: ignore[arg-type]
