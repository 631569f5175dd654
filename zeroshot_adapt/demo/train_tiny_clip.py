"""Train the offline demo teacher: a tiny CLIP (`zsa-tiny-digits`) on rendered font digits and captions.

    zsa train-teacher --out zeroshot_adapt/assets/zsa-tiny-digits.safetensors --seed 0 --steps 1000

Contrastive training as in CLIP (Radford et al. 2021): symmetric InfoNCE over the image-caption pairs
of a batch, with open_clip's learned temperature (`logit_scale`, initialised to log(1/0.07) and clamped
to <= log(100) after each step). Same-digit pairs in a batch count as negatives, as duplicates do in web
data; this keeps the learned scale small (~14) and the teacher imperfect. Only rendered images and
captions are used for training; the target data (scikit-learn digits, MNIST) is read once, at the end,
for the report written to the JSON sidecar.

Reproducible on CPU: seeded model init (torch) and data (numpy Generator), a fixed torch thread count,
deterministic algorithms. The same seed, steps and thread count give bit-identical weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zeroshot_adapt.data.sources import read_idx
from zeroshot_adapt.demo.render import NUM_DIGITS, RenderConfig, all_captions, render_batch, sample_caption_ids
from zeroshot_adapt.demo.tiny_clip import (
    TINY_CLIP_MEAN,
    TINY_CLIP_MODEL,
    TINY_CLIP_STD,
    digits_images,
    digits_pil,
    digits_split,
    register_tiny_clip,
)
from zeroshot_adapt.fileio import atomic_write_bytes, atomic_write_text
from zeroshot_adapt.reports.metrics import class_imbalance_ratio
from zeroshot_adapt.teacher.classifier import zeroshot_classifier, zeroshot_logits
from zeroshot_adapt.teacher.clip import file_sha256
from zeroshot_adapt.teacher.prompts import load_prompts

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learned log-temperature to [0, log(100)]
EVAL_BATCH_SIZE = 256  # fixed, so recorded accuracies are reproduced bit for bit
SOURCE_VAL_IMAGES = 1000  # rendered held-out images, for a source-domain sanity check
DIGITS_PROMPTS = "digits"
_SEED_STREAM_TRAIN_DATA = 1
_SEED_STREAM_SOURCE_VAL = 2


@dataclass(frozen=True)
class TinyClipTrainConfig:
    """Everything that changes the trained weights."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    num_threads: int = 2  # part of the result: CPU reductions split differently with other counts
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.num_threads < 1:
            raise ValueError(
                f"need steps >= 1, batch_size >= 2, num_threads >= 1; got {self.steps}, "
                f"{self.batch_size}, {self.num_threads}"
            )


def cosine_lr(step: int, *, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warmup from base_lr / warmup_steps to base_lr, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def clip_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): features [B, D] L2-normalized, logit_scale = exp(learned log-temperature)."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    targets = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W], normalized as open_clip's preprocess does (ToTensor + mean/std)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(TINY_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TINY_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _seeded_generator(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


@contextlib.contextmanager
def reproducible_torch(num_threads: int) -> Iterator[None]:
    """Fixed thread count + deterministic algorithms for the block; the previous settings come back after.

    `fill_uninitialized_memory` is switched off: filling every new tensor with NaN made CPU training
    ~7x slower and changes no result (nothing here reads uninitialized memory).
    """
    previous = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def train_tiny_clip(config: TinyClipTrainConfig, *, log_every: int = 100) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train from scratch on rendered digits. Returns the fp32 model (eval mode) and training stats."""
    with reproducible_torch(config.num_threads):
        return _train(config, log_every=log_every)


def _train(config: TinyClipTrainConfig, *, log_every: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    import open_clip

    register_tiny_clip()
    torch.manual_seed(config.seed)
    model = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)
    model.train()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_MODEL)
    captions = all_captions()
    caption_tokens = torch.stack([tokenizer(per_digit) for per_digit in captions])  # [10, K, ctx]

    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps
    )
    rng = _seeded_generator(config.seed, _SEED_STREAM_TRAIN_DATA)
    start = time.perf_counter()
    running = 0.0
    for step in range(config.steps):
        images, labels = render_batch(config.batch_size, rng, config.render)
        text = caption_tokens[torch.from_numpy(labels), torch.from_numpy(sample_caption_ids(labels, rng))]
        lr = cosine_lr(step, total_steps=config.steps, warmup_steps=config.warmup_steps, base_lr=config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        image_features, text_features, logit_scale = model(images_to_tensor(images), text)
        loss = clip_contrastive_loss(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

        running += loss.item()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == config.steps):
            count = (step % log_every) + 1
            logger.info(
                "step %d/%d  loss %.4f  logit_scale %.2f  lr %.2e  %.1fs",
                step + 1, config.steps, running / count, model.logit_scale.exp().item(), lr,
                time.perf_counter() - start,
            )
            running = 0.0
    model.eval()
    stats = {"train_seconds": round(time.perf_counter() - start, 1), "final_loss": round(loss.item(), 4)}
    return model, stats


def fp16_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict in fp16 (the shipped format; open_clip casts it back into fp32 parameters)."""
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: torch.nn.Module, path: Path) -> str:
    """Write fp16 safetensors atomically; return the file's sha256."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(fp16_state_dict(model), metadata={"model": TINY_CLIP_MODEL, "format": "open_clip"}))
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    return file_sha256(path)


# --- zero-shot evaluation (the demo's own; the project-wide one lives in zeroshot_adapt/teacher) -----------


@torch.no_grad()
def zero_shot_predict(
    model: torch.nn.Module, preprocess: Any, images: Sequence[Any], classifier: torch.Tensor
) -> np.ndarray:
    """Argmax class of `logit_scale.exp() * normalize(image_features) @ classifier` per PIL image: int64 [N]."""
    scale = model.logit_scale.exp()
    predictions = []
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        batch = torch.stack([preprocess(im) for im in images[start : start + EVAL_BATCH_SIZE]])
        logits = zeroshot_logits(model.encode_image(batch), classifier, float(scale))
        predictions.append(logits.argmax(dim=-1))
    return torch.cat(predictions).numpy().astype(np.int64)


def imbalance_ratio(predictions: np.ndarray, num_classes: int) -> float:
    """Most-predicted class count / least-predicted (inf when a class is never predicted)."""
    return class_imbalance_ratio(np.bincount(predictions, minlength=num_classes))


def load_mnist_test(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST t10k from the original IDX .gz files: (uint8 [N, 28, 28], int64 [N])."""
    images = read_idx(Path(folder) / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(Path(folder) / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def load_teacher(checkpoint: Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model, preprocess, tokenizer) through open_clip's normal loading path, in eval mode."""
    import open_clip

    register_tiny_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_MODEL, pretrained=str(checkpoint))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(TINY_CLIP_MODEL)


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())


def digits_test_accuracy(checkpoint: Path, *, num_threads: int = 2) -> float:
    """Zero-shot accuracy of a checkpoint on the test part of `digits_split()` (the number the sidecar records)."""
    with reproducible_torch(num_threads):
        model, preprocess, tokenizer = load_teacher(checkpoint)
        classifier = zeroshot_classifier(model, tokenizer, load_prompts(DIGITS_PROMPTS), "cpu")
        images, labels = digits_images()
        _, test_idx = digits_split()
        predictions = zero_shot_predict(model, preprocess, [digits_pil(images[i]) for i in test_idx], classifier)
        return _accuracy(predictions, labels[test_idx])


def evaluate_checkpoint(checkpoint: Path, *, mnist_dir: Path | None, seed: int) -> dict[str, Any]:
    """The report: zero-shot accuracy on rendered held-out digits, sklearn digits (test part, full), MNIST."""
    from PIL import Image

    model, preprocess, tokenizer = load_teacher(checkpoint)
    classifier = zeroshot_classifier(model, tokenizer, load_prompts(DIGITS_PROMPTS), "cpu")
    report: dict[str, Any] = {"logit_scale": round(model.logit_scale.exp().item(), 4)}

    source_images, source_labels = render_batch(SOURCE_VAL_IMAGES, _seeded_generator(seed, _SEED_STREAM_SOURCE_VAL))
    source_pred = zero_shot_predict(model, preprocess, [Image.fromarray(im) for im in source_images], classifier)
    report["source_val_accuracy"] = _accuracy(source_pred, source_labels)

    images, labels = digits_images()
    _, test_idx = digits_split()
    predictions = zero_shot_predict(model, preprocess, [digits_pil(im) for im in images], classifier)
    counts = np.bincount(predictions, minlength=NUM_DIGITS)
    report["digits_test_accuracy"] = _accuracy(predictions[test_idx], labels[test_idx])
    report["digits_full_accuracy"] = _accuracy(predictions, labels)
    report["digits_imbalance_ratio"] = imbalance_ratio(predictions, NUM_DIGITS)
    report["digits_predicted_counts"] = counts.tolist()
    if mnist_dir is not None and Path(mnist_dir).is_dir():
        mnist_images, mnist_labels = load_mnist_test(Path(mnist_dir))
        pil = [Image.fromarray(im, mode="L").convert("RGB") for im in mnist_images]
        mnist_pred = zero_shot_predict(model, preprocess, pil, classifier)
        report["mnist_test_accuracy"] = _accuracy(mnist_pred, mnist_labels)
        report["mnist_imbalance_ratio"] = imbalance_ratio(mnist_pred, NUM_DIGITS)
    return report


def _json_safe(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 4)


def build_and_report(config: TinyClipTrainConfig, out: Path, *, mnist_dir: Path | None) -> dict[str, Any]:
    """Train, save the fp16 checkpoint, reload it through open_clip, evaluate, write the meta sidecar."""
    import open_clip
    import PIL

    model, stats = train_tiny_clip(config)
    digest = save_checkpoint(model, out)
    with reproducible_torch(config.num_threads):
        report = evaluate_checkpoint(out, mnist_dir=mnist_dir, seed=config.seed)
    prompts = load_prompts(DIGITS_PROMPTS)
    meta = {
        "model": TINY_CLIP_MODEL,
        "weights": out.name,
        "sha256": digest,
        "size_bytes": out.stat().st_size,
        "seed": config.seed,
        "steps": config.steps,
        "train_config": asdict(config),
        "train_seconds": stats["train_seconds"],
        "final_train_loss": stats["final_loss"],
        "logit_scale": report["logit_scale"],
        "preprocess": {"image_size": config.render.image_size, "mean": TINY_CLIP_MEAN, "std": TINY_CLIP_STD,
                       "interpolation": "bicubic"},
        "prompts": {"classes": list(prompts.classes), "templates": list(prompts.templates)},
        "source_val_accuracy": report["source_val_accuracy"],
        "digits_test_accuracy": report["digits_test_accuracy"],
        "digits_full_accuracy": report["digits_full_accuracy"],
        "digits_imbalance_ratio": _json_safe(report["digits_imbalance_ratio"]),
        "digits_predicted_counts": report["digits_predicted_counts"],
        "mnist_test_accuracy": report.get("mnist_test_accuracy"),
        "mnist_imbalance_ratio": _json_safe(report["mnist_imbalance_ratio"]) if "mnist_imbalance_ratio" in report
        else None,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__},  # Pillow/FreeType rasterize the training glyphs
        "note": "Trained on rendered font digits only; target accuracies are a report, not used for selection.",
    }
    meta_path = out.with_name(out.name.removesuffix(".safetensors") + ".meta.json")
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return meta


def default_mnist_dir() -> Path | None:
    """The repository's sibling ../shared/data/mnist_test when present (only for the optional MNIST report)."""
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist_test"
    return candidate if candidate.is_dir() else None
