"""The student network (any timm model) and its EMAN teacher (Cai et al., "Exponential Moving Average
Normalization for Self-supervised and Semi-supervised Learning", CVPR 2021).

Weights for the student, by ``pretrained``:

- ``None``: random initialization;
- ``"timm"``: timm's default pretrained weights for ``arch``; ``"timm:<tag>"`` or a bare tag such as
  ``"a1_in1k"``: that pretrained tag (needs network access or a filled Hugging Face cache);
- a local file (``.pth`` / ``.pt`` / ``.tar`` / ``.bin`` / ``.safetensors``): loaded with the key
  remapping of :func:`remap_checkpoint_keys`, which understands MoCo v1/v2 checkpoints
  (``module.encoder_q.*``), DDP checkpoints (``module.*``) and plain timm / torchvision state dicts.
  The classifier head is never taken from a self-supervised checkpoint (MoCo's ``fc.*`` is an MLP
  projection head): it keeps its fresh initialization.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

import zeroshot_adapt.models.cnn  # noqa: F401  (registers zsa_cnn_small, the demo student)
import zeroshot_adapt.models.wrn  # noqa: F401  (registers wrn28_2 / wrn28_8 with timm, so they are valid `arch` names)
from zeroshot_adapt.config import StudentConfig
from zeroshot_adapt.errors import UserError

logger = logging.getLogger(__name__)

TIMM_DEFAULT_WEIGHTS = "timm"
TIMM_TAG_PREFIX = "timm:"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt", ".safetensors")
MOCO_QUERY_PREFIX = "module.encoder_q."  # MoCo v1/v2 (facebookresearch/moco) query encoder
DDP_PREFIX = "module."
CHECKPOINT_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
MAX_SUGGESTIONS = 10


# --- model creation ---------------------------------------------------------------------------------


def _unknown_arch_error(arch: str) -> UserError:
    all_models = timm.list_models()
    pattern_matches = timm.list_models(f"*{arch}*")
    close = pattern_matches[:MAX_SUGGESTIONS] or difflib.get_close_matches(arch, all_models, n=MAX_SUGGESTIONS)
    hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
    return UserError(f"unknown timm architecture {arch!r}; {hint}")


def _create(arch: str, num_classes: int, image_size: int | None, pretrained: bool) -> nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if image_size is not None:
        try:  # transformers need their input size; convolutional networks do not take one
            return timm.create_model(arch, pretrained=pretrained, img_size=image_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
    return timm.create_model(arch, pretrained=pretrained, **kwargs)


def _timm_tag(pretrained: str) -> str | None:
    """The timm pretrained tag named by `pretrained` ('' for the default), or None for a file path."""
    if pretrained == TIMM_DEFAULT_WEIGHTS:
        return ""
    if pretrained.startswith(TIMM_TAG_PREFIX):
        return pretrained[len(TIMM_TAG_PREFIX) :]
    looks_like_path = any(sep in pretrained for sep in "/\\") or pretrained.endswith(CHECKPOINT_SUFFIXES)
    if looks_like_path or Path(pretrained).exists():
        return None
    return pretrained


def create_student(
    arch: str, num_classes: int, pretrained: str | None = None, image_size: int | None = None
) -> nn.Module:
    """A timm classifier with `num_classes` outputs.

    arch: any timm model name (``timm.list_models()``). pretrained: None (random init), ``"timm"``,
    ``"timm:<tag>"`` or a bare timm tag, or a local checkpoint path (see the module docstring).
    image_size: input size, passed to models that need it (ViTs); ignored by convolutional networks.
    """
    base, _, arch_tag = arch.partition(".")
    if not timm.is_model(base):
        raise _unknown_arch_error(arch)
    if pretrained is None:
        return _create(base, num_classes, image_size, pretrained=False)

    tag = _timm_tag(pretrained)
    if tag is None:
        model = _create(base, num_classes, image_size, pretrained=False)
        load_checkpoint(model, pretrained)
        return model

    tag = tag or arch_tag
    valid = timm.list_pretrained(f"{base}.*")
    name = f"{base}.{tag}" if tag else base
    if not valid or (tag and name not in valid):
        listing = ", ".join(v.partition(".")[2] for v in valid) if valid else "none"
        raise UserError(f"timm has no pretrained weights {name!r}; valid tags for {base!r}: {listing}")
    try:
        return _create(name, num_classes, image_size, pretrained=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(
            f"could not fetch timm weights {name!r} (no network access or no local Hugging Face cache?): "
            f"{error}. Download them on a connected machine first, or pass a local checkpoint path."
        ) from None


def create_student_from_config(config: StudentConfig, num_classes: int, image_size: int | None = None) -> nn.Module:
    return create_student(config.arch, num_classes, pretrained=config.pretrained, image_size=image_size)


# --- checkpoints --------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did. Key lists use the model's names."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (kept as initialized)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model (ignored)
    mismatched: list[str] = field(default_factory=list)  # present in both, different shapes (ignored)
    dropped_head: list[str] = field(default_factory=list)  # checkpoint classifier keys not loaded


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (.safetensors, or a torch file read with weights_only=True: a file
    holding other objects is refused unread); a UserError names a missing, damaged or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"student checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with arbitrary objects, corrupt files
        raise UserError(f"could not read student checkpoint {str(path)!r}: {error}") from None
    return extract_state_dict(checkpoint, str(path))


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The tensor mapping inside a training checkpoint (``state_dict`` / ``model`` entries), or itself."""
    if isinstance(checkpoint, Mapping):
        for key in CHECKPOINT_CONTAINER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not any(isinstance(v, Tensor) for v in checkpoint.values()):
        raise UserError(f"{source} holds no state dict (looked for the keys {list(CHECKPOINT_CONTAINER_KEYS)})")
    return {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}


def classifier_prefix(model: nn.Module) -> str:
    """Key prefix of the model's classifier head, e.g. ``"fc."`` (ResNet) or ``"head."`` (ViT)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    return f"{name}."


def remap_checkpoint_keys(
    state: Mapping[str, Tensor], head_prefix: str = "fc."
) -> tuple[dict[str, Tensor], str, list[str]]:
    """Rename checkpoint keys to timm's names. Returns ``(state, source_format, dropped_head_keys)``.

    Rules, first match wins:

    - ``moco``: any key starts with ``module.encoder_q.`` (MoCo v1/v2, EMAN's MoCo): keep only the query
      encoder and strip the prefix (drops ``encoder_k.*``, ``queue``, ``queue_ptr``), then drop the
      MLP projection head ``fc.*`` (``fc.0``, ``fc.2``). torchvision's ResNet names equal timm's
      (``conv1``, ``bn1``, ``layerN.M.convK``, ``downsample.0/1``), so no further renaming is needed;
    - ``ddp``: every key starts with ``module.``: strip it;
    - ``plain``: unchanged.

    head_prefix: the model's classifier prefix; for MoCo it is dropped whatever its shape.
    """
    if any(k.startswith(MOCO_QUERY_PREFIX) for k in state):
        encoder = {k[len(MOCO_QUERY_PREFIX) :]: v for k, v in state.items() if k.startswith(MOCO_QUERY_PREFIX)}
        dropped = sorted(k for k in encoder if k.startswith(head_prefix))
        return {k: v for k, v in encoder.items() if k not in dropped}, "moco", dropped
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX) :]: v for k, v in state.items()}, "ddp", []
    return dict(state), "plain", []


def load_state_dict_into(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> LoadReport:
    """Remap `state` (:func:`remap_checkpoint_keys`) and load every key whose name and shape match.

    Keys that do not match are reported (and logged), not loaded; a checkpoint sharing no key with the
    model is a UserError. A classifier head whose shape differs (another class count) is skipped too,
    so the head keeps its fresh initialization.
    """
    head = classifier_prefix(model)
    remapped, source_format, dropped_head = remap_checkpoint_keys(state, head_prefix=head)
    own = model.state_dict()
    report = LoadReport(source_format=source_format, dropped_head=dropped_head)
    to_load: dict[str, Tensor] = {}
    for key, value in remapped.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            (report.dropped_head if key.startswith(head) else report.mismatched).append(key)
        else:
            to_load[key] = value
    if not to_load:
        raise UserError(
            f"{source} shares no parameter with {type(model).__name__} (format {source_format!r}; first keys: "
            f"{list(state)[:5]}); is it a checkpoint of this architecture?"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load)
    backbone_missing = [k for k in report.missing if not k.startswith(head)]
    head_fresh = any(k.startswith(head) for k in report.missing)
    logger.info(
        "loaded %d tensors from %s (format %s)%s",
        len(report.loaded),
        source,
        source_format,
        f"; classifier {head}* re-initialized" if head_fresh else "",
    )
    if backbone_missing or report.unexpected or report.mismatched:
        logger.warning(
            "checkpoint %s: missing %s; unexpected %s; shape-mismatched %s",
            source,
            backbone_missing,
            report.unexpected,
            report.mismatched,
        )
    return report


def load_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local checkpoint file into `model` (see :func:`load_state_dict_into`)."""
    path = Path(path).expanduser()
    return load_state_dict_into(model, read_state_dict(path), source=str(path))


# --- EMAN teacher -------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        for attribute in ("module", "_orig_mod"):
            inner = getattr(model, attribute, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


class EmanTeacher(nn.Module):
    """Exponential moving average of the student over EVERY state entry (EMAN, Cai et al. 2021).

    Floating-point entries (parameters AND BatchNorm running_mean / running_var) follow
    ``teacher = m * teacher + (1 - m) * student``; integer buffers (``num_batches_tracked``) are copied.
    The teacher never trains: its parameters do not require gradients and it always stays in eval
    mode (``train()`` is a no-op), so its BatchNorm normalizes with its own running statistics.
    The averaged network is ``teacher.module`` (what algorithms receive as ``teacher``); state_dict keys
    are therefore prefixed ``module.`` (:func:`remap_checkpoint_keys` strips it when loading one as a student).
    Move it to the student's device (``teacher.to(accelerator.device)``) if it was built before.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(unwrap_model(student))
        self.module.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> EmanTeacher:
        """Ignored: the teacher always stays in eval mode."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.module(images)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """One EMAN step toward `student` (wrapped or not); momentum m in [0, 1] (0.999 by default)."""
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"EMA momentum {momentum!r} must lie in [0, 1] (EMAN uses 0.999)")
        source = unwrap_model(student).state_dict()
        target = self.module.state_dict()
        if source.keys() != target.keys():
            differing = sorted(set(source) ^ set(target))[:MAX_SUGGESTIONS]
            raise ValueError(f"student and teacher state entries differ: {differing}")
        averaged: list[Tensor] = []
        averaged_source: list[Tensor] = []
        for name, tensor in target.items():
            value = source[name].detach()
            if tensor.is_floating_point():
                averaged.append(tensor)
                averaged_source.append(value.to(dtype=tensor.dtype, device=tensor.device))
            else:
                tensor.copy_(value)
        if averaged:
            # lerp: t + (1 - m) * (s - t) == m * t + (1 - m) * s
            torch._foreach_lerp_(averaged, averaged_source, 1.0 - momentum)
