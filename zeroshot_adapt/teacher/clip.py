"""Load an open_clip model by name with a pretrained tag or a local checkpoint, with clear offline errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroshot_adapt.errors import UserError

log = logging.getLogger(__name__)

NO_WEIGHTS = ("", "none", "random")
BUNDLED = "bundled"  # the checkpoint shipped inside this package (the digits demo teacher)


@dataclass
class ClipModel:
    """A frozen open_clip model with its eval preprocessing and tokenizer.

    weights_id: what identifies the weights in a cache key — the tag, or sha256 of a local file.
    preprocess_id: a description of the eval preprocessing (resize, crop, mean/std), also for the key.
    """

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str
    pretrained: str
    weights_id: str
    preprocess_id: str

    @property
    def logit_scale(self) -> float:
        """The model's own learned temperature exp(logit_scale): exactly 100 for OpenAI checkpoints."""
        return float(self.model.logit_scale.exp().item())


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (real path, size, mtime_ns, inode) -> sha256


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes, remembered per (real path, size, mtime, inode) in this process: the weights id
    is asked for several times per run (cache identity, the CLIP student's preprocessing), and a ViT-L
    checkpoint takes seconds to hash."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _register_packaged_models() -> None:
    """Make model configs shipped with this package (the tiny digits teacher) known to open_clip."""
    from zeroshot_adapt.demo.tiny_clip import register_tiny_clip

    register_tiny_clip()


def bundled_models() -> tuple[str, ...]:
    """Models whose weights ship inside this package (pretrained tag `bundled`, their default)."""
    from zeroshot_adapt.demo.tiny_clip import TINY_CLIP_MODEL

    return (TINY_CLIP_MODEL,)


@dataclass(frozen=True)
class WeightsSpec:
    """Resolved `pretrained` argument: what to pass open_clip, and what identifies the weights."""

    model_name: str
    tag: str  # "none", an open_clip tag, or the checkpoint path
    load_arg: str | None  # passed as open_clip's `pretrained`
    weights_id: str  # "random-init", "tag:openai", "sha256:<hex>"


def resolve_weights(model_name: str, pretrained: str | None) -> WeightsSpec:
    """Validate the model name and `pretrained` (tag, local path, or none) without loading anything."""
    import open_clip

    _register_packaged_models()
    if model_name not in open_clip.list_models():
        raise UserError(
            f"unknown open_clip model {model_name!r}; e.g. RN50-quickgelu, ViT-B-32-quickgelu, ViT-L-14 "
            f"(all: python -c 'import open_clip; print(open_clip.list_models())')"
        )
    if model_name == "RN50" and pretrained == "openai":
        log.warning("RN50 with OpenAI weights needs QuickGELU: use RN50-quickgelu (plain RN50 loses accuracy)")
    tag = (pretrained or "").strip()
    if tag.lower() in NO_WEIGHTS:
        return WeightsSpec(model_name, "none", None, "random-init")
    if tag == BUNDLED:
        from zeroshot_adapt.demo.tiny_clip import TINY_CLIP_MODEL, tiny_clip_checkpoint

        if model_name != TINY_CLIP_MODEL:
            raise UserError(f"pretrained='bundled' exists only for {TINY_CLIP_MODEL}, not {model_name!r}")
        tag = str(tiny_clip_checkpoint())
    if os.path.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not os.path.isfile(tag):
            raise UserError(f"CLIP checkpoint {tag!r} does not exist")
        return WeightsSpec(model_name, tag, tag, f"sha256:{file_sha256(tag)}")
    known = open_clip.list_pretrained_tags_by_model(model_name)
    if model_name in bundled_models():
        known = [BUNDLED, *known]
    if tag not in known:
        raise UserError(
            f"unknown pretrained tag {tag!r} for {model_name}; valid: {', '.join(known) or '(none)'}"
            " — or pass a local checkpoint path"
        )
    return WeightsSpec(model_name, tag, tag, f"tag:{tag}")


def preprocess_description(weights: WeightsSpec) -> dict[str, Any]:
    """The eval preprocessing open_clip will use (size, mean/std, interpolation, resize mode), derived
    from configs alone, so a cache can be found offline without loading (or downloading) weights."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config = open_clip.get_model_config(weights.model_name) or {}
    description = merge_preprocess_dict(asdict(PreprocessCfg()), config.get("preprocess_cfg", {}))
    if weights.load_arg and not os.path.isfile(weights.load_arg):  # a tag: its pretrained config applies
        description = merge_preprocess_dict(description, open_clip.get_pretrained_cfg(weights.model_name, weights.tag))
    image_size = config.get("vision_cfg", {}).get("image_size")
    if image_size is not None:
        description["size"] = image_size
    return {k: list(v) if isinstance(v, tuple) else v for k, v in description.items()}


def load_clip(model_name: str, pretrained: str | None, device: str | torch.device = "cpu") -> ClipModel:
    """Create `model_name` with weights from an open_clip tag, a local checkpoint path, or none (random).

    Raises UserError for an unknown model, an unknown tag, a missing file, or weights that cannot be
    downloaded (offline), saying what to pass instead.
    """
    import open_clip

    weights = resolve_weights(model_name, pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights.load_arg, device=device
        )
    except (RuntimeError, OSError) as error:
        if weights.load_arg is not None and not os.path.isfile(weights.load_arg):
            raise UserError(
                f"could not download CLIP weights {model_name}/{weights.tag} (offline or blocked: {error}). "
                "Download them on a connected machine and pass the file with --pretrained /path/to/weights"
                " (e.g. open_clip_pytorch_model.bin), or set HF_HOME to a cache that holds them."
            ) from None
        raise
    model.eval().requires_grad_(False)
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        model_name=model_name,
        pretrained=weights.tag,
        weights_id=weights.weights_id,
        preprocess_id=json.dumps(preprocess_description(weights), sort_keys=True),
    )
