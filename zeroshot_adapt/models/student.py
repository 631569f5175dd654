"""The student network (any timm model) and its EMAN teacher (Cai et al., "Exponential Moving Average
Normalization for Self-supervised and Semi-supervised Learning", CVPR 2021).

Weights for the student, by ``pretrained``:

- ``None``: random initialization;
- ``"timm"``: timm's default pretrained weights for ``arch``; ``"timm:<tag>"`` or a bare tag such as
  ``"a1_in1k"``: that pretrained tag (needs network access or a filled Hugging Face cache);
- a local file (``.pth`` / ``.pt`` / ``.tar`` / ``.bin`` / ``.safetensors``) in one of the published
  self-supervised formats of :data:`CHECKPOINT_FORMATS` (MoCo v1/v2, MoCo-EMAN, MoCo v3, BYOL-EMAN, DINO,
  SwAV), a DDP checkpoint (``module.*``) or a plain timm / torchvision state dict: only the backbone is
  loaded, renamed onto timm's names (torchvision's ResNet names equal timm's), and a :class:`LoadReport`
  lists what was loaded, missing, unexpected, dropped (projection heads) and ignored (momentum encoders,
  queues, predictors). The classifier head is never taken from a self-supervised checkpoint: it keeps its
  fresh initialization.

:func:`check_student_initialisation` guards a run's choice: for transductive zero-shot on a dataset of
ImageNet classes it refuses weights trained with ImageNet labels (label leakage), and it warns once when a
paper-recipe ResNet-50 starts from random weights (the paper used a MoCo v2 + EMAN checkpoint).
"""

from __future__ import annotations

import copy
import difflib
import logging
import re
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
DDP_PREFIX = "module."
# Where a checkpoint file keeps its tensors; DINO's full checkpoint holds "teacher" and "student" (the teacher,
# which DINO evaluates, first).
CHECKPOINT_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "teacher", "student")
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
    """What :func:`load_checkpoint` did. Key lists use the model's names, except ``ignored`` (the file's)."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (kept as initialized)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint's backbone, not in the model (ignored)
    mismatched: list[str] = field(default_factory=list)  # present in both, different shapes (ignored)
    dropped_head: list[str] = field(default_factory=list)  # projection / classifier head keys not loaded
    ignored: list[str] = field(default_factory=list)  # not the backbone: momentum encoder, queue, predictor ...
    container: str | None = None  # the checkpoint entry the tensors came from ("state_dict", "teacher", ...)


@dataclass(frozen=True)
class CheckpointFormat:
    """A published self-supervised checkpoint layout.

    backbone_prefixes: the backbone's keys start with one of these (stripped to get torchvision / timm names).
    head_prefixes: after stripping, keys that are a projection head (dropped, never loaded).
    marker_prefixes: the format is recognised only if some key starts with one of these (default: the
        backbone prefixes).
    """

    name: str
    backbone_prefixes: tuple[str, ...]
    head_prefixes: tuple[str, ...] = ()
    marker_prefixes: tuple[str, ...] = ()

    def matches(self, keys: list[str]) -> bool:
        markers = self.marker_prefixes or self.backbone_prefixes
        return any(k.startswith(markers) for k in keys)


CHECKPOINT_FORMATS: tuple[CheckpointFormat, ...] = (
    # MoCo v1/v2 (facebookresearch/moco) and MoCo-EMAN (amazon-science/exponential-moving-average-normalization,
    # res50_moco_eman_800ep.pth.tar, the paper's init): checkpoint["state_dict"] holds module.encoder_q.* (query
    # encoder, torchvision names; fc.0 / fc.2 the MLP projection), module.encoder_k.* (momentum copy),
    # module.queue, module.queue_ptr. The official DebiasPL and EMAN code load encoder_q without its fc.
    CheckpointFormat("moco", ("module.encoder_q.", "encoder_q."), ("fc.",)),
    # MoCo v3 (facebookresearch/moco-v3): module.base_encoder.* (fc.* the projection MLP of a ResNet, head.*
    # of a ViT), module.momentum_encoder.*, module.predictor.*.
    CheckpointFormat("moco_v3", ("module.base_encoder.", "base_encoder."), ("fc.", "head.")),
    # BYOL-EMAN (same EMAN repository, its --model-prefix online_net.backbone).
    CheckpointFormat("byol_eman", ("module.online_net.backbone.", "online_net.backbone.")),
    # DINO (facebookresearch/dino) full checkpoints: "teacher" {backbone.*, head.*} and "student"
    # {module.backbone.*, module.head.*}; its backbone-only release is a plain torchvision dict ("plain").
    CheckpointFormat("dino", ("module.backbone.", "backbone.")),
    # SwAV (facebookresearch/swav): module.* with the torchvision trunk, module.projection_head.*, module.prototypes.*.
    CheckpointFormat("swav", ("module.",), ("projection_head.", "prototypes."),
                     marker_prefixes=("module.prototypes.", "module.projection_head.")),
)
"""Recognised in this order, first match wins; then ``ddp`` (every key ``module.*``) and ``plain``."""


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """(tensors, the container entry they came from or None) of a checkpoint file; UserError if unreadable.

    Loaded with ``weights_only=True`` (no code runs); ``argparse.Namespace`` is allowed, because DINO and
    other research checkpoints store their command-line arguments in one."""
    import argparse

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"student checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), None
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with arbitrary objects, corrupt files
        raise UserError(f"could not read student checkpoint {str(path)!r}: {error}") from None
    return extract_state_dict_from(checkpoint, str(path))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (see :func:`read_checkpoint`): .safetensors, or a torch file read with
    weights_only=True (a file holding other objects is refused unread); UserError for a missing, damaged or
    unsafe file."""
    return read_checkpoint(path)[0]


def extract_state_dict_from(checkpoint: Any, source: str = "checkpoint") -> tuple[dict[str, Tensor], str | None]:
    """(the tensor mapping inside a training checkpoint, or itself; the entry it was found under or None)."""
    container = None
    if isinstance(checkpoint, Mapping):
        for key in CHECKPOINT_CONTAINER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint, container = checkpoint[key], key
                break
    if not isinstance(checkpoint, Mapping) or not any(isinstance(v, Tensor) for v in checkpoint.values()):
        raise UserError(f"{source} holds no state dict (looked for the keys {list(CHECKPOINT_CONTAINER_KEYS)})")
    return {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}, container


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The tensor mapping inside a training checkpoint (``state_dict`` / ``model`` / ``teacher`` ...), or itself."""
    return extract_state_dict_from(checkpoint, source)[0]


def classifier_prefix(model: nn.Module) -> str:
    """Key prefix of the model's classifier head, e.g. ``"fc."`` (ResNet) or ``"head."`` (ViT)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    return f"{name}."


@dataclass
class Remapped:
    """:func:`remap_checkpoint_keys`'s result: backbone tensors under the model's names, and what was left out."""

    state: dict[str, Tensor]
    source_format: str
    dropped_head: list[str]  # projection heads (and the model's classifier prefix), stripped names
    ignored: list[str]  # everything outside the backbone, the file's names


def remap_checkpoint_keys(state: Mapping[str, Tensor], head_prefix: str = "fc.") -> Remapped:
    """Rename checkpoint keys to timm's names (formats: :data:`CHECKPOINT_FORMATS`).

    A self-supervised format keeps only its backbone (its prefix stripped), drops its projection heads and the
    model's classifier prefix `head_prefix` (a self-supervised ``fc`` is never a classifier), and ignores every
    other key (momentum encoders, queues, predictors, DINO's head). ``ddp``: every key starts with
    ``module.``: strip it. ``plain``: unchanged. torchvision's ResNet names equal timm's (``conv1``, ``bn1``,
    ``layerN.M.convK``, ``downsample.0/1``), so no further renaming is needed.
    """
    keys = list(state)
    for fmt in CHECKPOINT_FORMATS:
        if not fmt.matches(keys):
            continue
        backbone: dict[str, Tensor] = {}
        dropped, ignored = [], []
        heads = (*fmt.head_prefixes, head_prefix)
        for key, value in state.items():
            prefix = next((p for p in fmt.backbone_prefixes if key.startswith(p)), None)
            if prefix is None:
                ignored.append(key)
            elif key[len(prefix) :].startswith(heads):
                dropped.append(key[len(prefix) :])
            else:
                backbone[key[len(prefix) :]] = value
        return Remapped(backbone, fmt.name, sorted(dropped), sorted(ignored))
    if keys and all(k.startswith(DDP_PREFIX) for k in keys):
        return Remapped({k[len(DDP_PREFIX) :]: v for k, v in state.items()}, "ddp", [], [])
    return Remapped(dict(state), "plain", [], [])


def load_state_dict_into(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> LoadReport:
    """Remap `state` (:func:`remap_checkpoint_keys`) and load every key whose name and shape match.

    Keys that do not match are reported (and logged), not loaded; a checkpoint sharing no key with the
    model is a UserError. A classifier head whose shape differs (another class count) is skipped too,
    so the head keeps its fresh initialization.
    """
    head = classifier_prefix(model)
    remapped = remap_checkpoint_keys(state, head_prefix=head)
    source_format = remapped.source_format
    own = model.state_dict()
    report = LoadReport(source_format=source_format, dropped_head=remapped.dropped_head, ignored=remapped.ignored)
    to_load: dict[str, Tensor] = {}
    for key, value in remapped.state.items():
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
        "loaded %d tensors from %s (format %s)%s; %d head tensors dropped, %d non-backbone tensors ignored",
        len(report.loaded),
        source,
        source_format,
        f"; classifier {head}* re-initialized" if head_fresh else "",
        len(report.dropped_head),
        len(report.ignored),
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
    state, container = read_checkpoint(path)
    report = load_state_dict_into(model, state, source=str(path) + (f" [{container}]" if container else ""))
    report.container = container
    return report


# --- the run's choice of initialisation -------------------------------------------------------------------

PAPER_CHECKPOINT = "res50_moco_eman_800ep.pth.tar"
"""The paper's student init (REFERENCE.md section 1): ResNet-50, MoCo v2 + EMAN, 800 epochs, released with EMAN
(github.com/amazon-science/exponential-moving-average-normalization)."""
IMAGENET_LABEL_TAG = re.compile(r"in(1|12|21|22)k")
"""timm tags trained (or fine-tuned) with ImageNet labels: in1k, in12k, in21k, in22k (e.g. a1_in1k, tv_in1k,
fb_swsl_ig1b_ft_in1k). Self-supervised tags (dino, mae, ...) do not match."""
IMAGENET_NUM_CLASSES = 1000
_warned: set[str] = set()


def _resolved_timm_name(arch: str, pretrained: str) -> str | None:
    """'<arch>.<tag>' that `pretrained` names through timm (the default tag resolved), or None for a file."""
    tag = _timm_tag(pretrained)
    if tag is None:
        return None
    base, _, arch_tag = arch.partition(".")
    tag = tag or arch_tag
    if not tag:  # timm's default tag: the first one it lists
        valid = timm.list_pretrained(f"{base}.*")
        return valid[0] if valid else base
    return f"{base}.{tag}"


def _imagenet_classifier_in_file(path: str) -> tuple[bool, str]:
    """(whether the file holds a 1000-way classifier with a non-self-supervised backbone, what was found)."""
    state, _ = read_checkpoint(path)
    remapped = remap_checkpoint_keys(state)
    if remapped.source_format not in ("plain", "ddp"):
        return False, f"a {remapped.source_format} self-supervised checkpoint"
    for key, value in remapped.state.items():
        if key.endswith("weight") and value.ndim == 2 and value.shape[0] == IMAGENET_NUM_CLASSES:
            return True, f"a checkpoint with a {IMAGENET_NUM_CLASSES}-way classifier ({key}, {tuple(value.shape)})"
    return False, "no ImageNet classifier"


def check_student_initialisation(config: Any) -> None:
    """Refuse label leakage, warn about a random-init paper run. `config`: a resolved RunConfig.

    - Transductive zero-shot (not SSL) on a dataset of ImageNet classes (DatasetSpec.imagenet_classes) from
      weights trained with ImageNet labels — a timm tag with in1k / in12k / in21k / in22k (``timm`` means the
      arch's default tag), or a local plain / DDP checkpoint holding a 1000-way classifier (a supervised model
      or a linear probe) — is a UserError: the "zero-shot" result would have seen the target labels.
      ``student.allow_label_leakage=true`` overrides it on purpose.
    - A paper-recipe ResNet-50 run without ``student.pretrained`` warns once per process, naming the paper's
      checkpoint and how to pass it.
    """
    from zeroshot_adapt.config import run_mode
    from zeroshot_adapt.data.registry import get_spec

    student = config.student
    if student.arch == "clip":  # the CLIP student starts from the teacher's own weights (models/clip_student.py)
        from zeroshot_adapt.models.clip_student import check_clip_student_config

        check_clip_student_config(config)
        return
    mode = run_mode(config)
    if student.pretrained is None:
        if config.recipe == "paper" and student.arch.partition(".")[0] == "resnet50" and "random" not in _warned:
            _warned.add("random")
            banner = "!" * 100
            logger.warning(
                "\n%s\nThe paper recipe's ResNet-50 starts from RANDOM weights. The paper (%s) initialised it from the "
                "self-supervised MoCo v2 + EMAN checkpoint %s (800 epochs, released at github.com/amazon-science/"
                "exponential-moving-average-normalization); without it expect far lower accuracy. Pass it with\n"
                "  --student-init /path/to/%s   (or --set student.pretrained=/path/to/%s)\n%s",
                banner, "T-ZSL" if mode == "tzsl" else "SSL", PAPER_CHECKPOINT, PAPER_CHECKPOINT, PAPER_CHECKPOINT,
                banner,
            )
        return
    if mode != "tzsl" or student.allow_label_leakage or not get_spec(config.data.dataset).imagenet_classes:
        return
    timm_name = _resolved_timm_name(student.arch, student.pretrained)
    if timm_name is not None:
        leaks = IMAGENET_LABEL_TAG.search(timm_name.partition(".")[2]) is not None
        found = f"timm weights {timm_name!r}, trained with ImageNet labels"
    else:
        leaks, found = _imagenet_classifier_in_file(student.pretrained)
    if leaks:
        raise UserError(
            f"student.pretrained={student.pretrained!r} is {found}, and dataset {config.data.dataset!r} has ImageNet "
            "classes: a transductive zero-shot result from this init would have seen the target labels (label "
            f"leakage). Use a self-supervised checkpoint (the paper's: {PAPER_CHECKPOINT}, MoCo v2 + EMAN; MoCo v3, "
            "DINO, SwAV load too), or set student.allow_label_leakage=true to run it on purpose (and do not report "
            "the result as zero-shot)"
        )


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
