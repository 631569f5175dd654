"""CLIP itself as the student (``student.arch=clip``): the teacher's own image encoder plus a linear head
initialised from the zero-shot text classifier.

    logits = head(normalize(visual(x))),  head.weight = logit_scale * text_classifier [C, D],  head.bias = 0

so at step 0 the student's logits equal CLIP's cached zero-shot logits (same weights, same preprocessing:
:func:`clip_preprocess` reads open_clip's input size, mean / std and interpolation for the teacher). The text
classifier and logit scale come from the prediction cache (``TeacherPredictions.text_classifier`` /
``.logit_scale``): no text embedding is computed again. Only the image tower is kept; the text tower is dropped.

What trains (``student.clip_train``, :data:`CLIP_TRAIN_MODES`):

- ``all``: every parameter;
- ``last-blocks``: the last ``student.clip_train_blocks`` residual blocks of the image tower, every layer after
  them (ViT: ``ln_post`` / ``proj`` / attention pooling; ResNet: ``attnpool``), every normalization layer and
  the head; everything else is frozen (``requires_grad=False``: not in the optimizer, no weight decay).

LoRA is not offered: ``peft`` needs ``transformers``, which this package does not depend on; ``lora`` is refused
like any unknown mode, with a message saying so.

The module has timm's classifier interface (``forward_features``, ``forward_head(pre_logits=...)``,
``get_classifier``, ``reset_classifier``, ``num_classes``, ``pretrained_cfg``), so the training loop, the EMAN
teacher and every algorithm use it unchanged. :meth:`ClipStudent.export_config` /
:meth:`ClipStudent.from_export_config` rebuild the architecture offline (no weights are downloaded); the
weights then come from a saved state dict.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroshot_adapt.config import CLIP_TRAIN_MODES
from zeroshot_adapt.errors import UserError

CLIP_ARCH = "clip"
"""The ``student.arch`` value that selects this student (other code relies on the name)."""
EXPORT_FORMAT = "zsa-clip-student/1"
HEAD_PREFIX = "head."
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def is_clip_arch(arch: str) -> bool:
    return arch == CLIP_ARCH


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ClipPreprocess:
    """open_clip's eval preprocessing for a model: square input `size`, mean / std, resize interpolation and
    resize mode (``shortest``: resize the shorter side to `size`, then centre-crop)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str

    def eval_transform(self):
        """PIL image -> float tensor [3, size, size]: exactly the teacher's ``preprocess``."""
        from open_clip.transform import image_transform

        return image_transform(self.size, is_train=False, mean=self.mean, std=self.std,
                               resize_mode=self.resize_mode, interpolation=self.interpolation)


def clip_preprocess(model_name: str, pretrained: str | None) -> ClipPreprocess:
    """The teacher's preprocessing (teacher.clip.preprocess_description), from configs alone (offline)."""
    from zeroshot_adapt.teacher.clip import preprocess_description, resolve_weights

    description = preprocess_description(resolve_weights(model_name, pretrained))
    size = description["size"]
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise UserError(f"open_clip model {model_name!r} takes non-square inputs {size}; the CLIP student needs "
                            "square ones")
        size = int(size[0])
    return ClipPreprocess(size=int(size), mean=tuple(description["mean"]), std=tuple(description["std"]),
                          interpolation=str(description["interpolation"]),
                          resize_mode=str(description["resize_mode"]))


def clip_student_transforms(config: Any, *, recipe: str, hflip: bool):
    """Weak / strong / eval views for a CLIP student of `config` (a RunConfig): the augmentation recipe at
    CLIP's own input size and mean / std, and CLIP's own eval preprocessing (``data.image_size`` is not used:
    the encoder's input size is fixed by its weights)."""
    from dataclasses import replace

    from zeroshot_adapt.data.transforms import build_transforms

    pre = clip_preprocess(config.teacher.model, config.teacher.pretrained)
    transforms = build_transforms(pre.size, recipe=recipe, hflip=hflip, mean=pre.mean, std=pre.std)
    return replace(transforms, eval=pre.eval_transform())


# ----------------------------------------------------------------------------- the model


def _model_config(model_name: str) -> dict[str, Any]:
    import open_clip

    from zeroshot_adapt.teacher.clip import _register_packaged_models

    _register_packaged_models()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise UserError(f"unknown open_clip model {model_name!r} for the CLIP student (teacher.model)")
    return config


def _build_visual(model_config: dict[str, Any]) -> nn.Module:
    """open_clip's image tower for a model config (random weights, nothing downloaded)."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(model_config["embed_dim"], model_config["vision_cfg"],
                               quick_gelu=bool(model_config.get("quick_gelu", False)))


class ClipStudent(nn.Module):
    """CLIP's image encoder + a linear head on L2-normalised image embeddings (see the module docstring).

    visual: open_clip's image tower (``CLIP.visual``), images [B, 3, S, S] -> embeddings [B, D].
    spec: what :meth:`export_config` records (model name and config, input size, mean / std, ...).
    """

    def __init__(self, visual: nn.Module, *, num_classes: int, embed_dim: int, spec: dict[str, Any]):
        super().__init__()
        self.visual = visual
        self.embed_dim = int(embed_dim)
        self.num_features = self.embed_dim  # timm's name for the pre-logit width
        self.head = nn.Linear(self.embed_dim, num_classes)
        self._spec = dict(spec)
        size = int(spec["image_size"])
        self.pretrained_cfg = {  # timm-style: what classifier_prefix() and input-size readers look at
            "classifier": "head", "input_size": (3, size, size), "mean": tuple(spec["mean"]),
            "std": tuple(spec["std"]), "interpolation": spec["interpolation"],
        }

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    # --- timm's classifier interface ---

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, 3, S, S] -> CLIP image embeddings [B, D] (not normalised)."""
        return self.visual(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """embeddings [B, D] -> logits [B, C]; pre_logits: the L2-normalised embeddings (the head's input)."""
        x = F.normalize(x, dim=-1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh (timm-default initialised) head with `num_classes` outputs, on the old head's device."""
        old = self.head
        self.head = nn.Linear(self.embed_dim, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
        self.head.requires_grad_(old.weight.requires_grad)
        self._spec["num_classes"] = int(num_classes)

    @torch.no_grad()
    def init_head_from_text(self, text_classifier: np.ndarray | Tensor, logit_scale: float) -> None:
        """head.weight = logit_scale * text_classifier ([C, D], rows L2-normalised), bias 0: the zero-shot
        classifier, so logits = logit_scale * normalize(embedding) @ text_classifier.T (CLIP's)."""
        weight = torch.tensor(np.array(text_classifier), dtype=torch.float32)
        if tuple(weight.shape) != (self.num_classes, self.embed_dim):
            raise UserError(
                f"the cached text classifier has shape {tuple(weight.shape)}; the CLIP student needs "
                f"[{self.num_classes} classes, {self.embed_dim} dims]: was the cache built with another teacher?"
            )
        self.head.weight.copy_(float(logit_scale) * weight)
        self.head.bias.zero_()

    # --- what trains ---

    def set_trainable(self, mode: str, *, last_blocks: int = 1) -> None:
        """Freeze per :data:`CLIP_TRAIN_MODES` (see the module docstring); UserError for a bad mode."""
        check_train_mode(mode)
        self._spec["train"], self._spec["train_blocks"] = mode, int(last_blocks)
        if mode == "all":
            self.requires_grad_(True)
            return
        blocks, tail = _blocks_and_tail(self.visual)
        if not 1 <= last_blocks <= len(blocks):
            raise UserError(f"student.clip_train_blocks={last_blocks} must lie in 1..{len(blocks)} (the image "
                            f"tower of {self._spec.get('model_name')!r} has {len(blocks)} blocks)")
        self.requires_grad_(False)
        trainable = [*blocks[-last_blocks:], *tail, self.head]
        trainable += [m for m in self.visual.modules() if isinstance(m, NORM_TYPES)]
        for module in trainable:
            module.requires_grad_(True)
        for name, param in self.visual.named_parameters(recurse=False):  # ViT's bare `proj` parameter
            if name in TAIL_PARAMETERS:
                param.requires_grad_(True)

    # --- export ---

    def export_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this architecture without downloading weights (JSON-serialisable):
        format, open_clip model name and its model config (the bundled tiny model's too), embedding dim,
        num_classes, input size, mean / std, interpolation, resize mode, trainable mode."""
        return copy.deepcopy({**self._spec, "format": EXPORT_FORMAT, "embed_dim": self.embed_dim,
                              "num_classes": self.num_classes})

    @classmethod
    def from_export_config(cls, cfg: dict[str, Any]) -> ClipStudent:
        """The architecture :meth:`export_config` describes, random weights (load a state dict afterwards)."""
        if cfg.get("format") != EXPORT_FORMAT:
            raise UserError(f"not a CLIP student export config (format {cfg.get('format')!r}, expected "
                            f"{EXPORT_FORMAT!r})")
        model_config = cfg.get("model_config") or _model_config(cfg["model_name"])
        model = cls(_build_visual(model_config), num_classes=int(cfg["num_classes"]), embed_dim=int(cfg["embed_dim"]),
                    spec={k: v for k, v in cfg.items() if k not in ("format", "embed_dim", "num_classes")})
        model.set_trainable(cfg.get("train", "all"), last_blocks=int(cfg.get("train_blocks", 1)))
        return model


# Layers after the residual blocks of open_clip's image towers: trained in `last-blocks` mode.
TAIL_MODULES = ("ln_post", "attn_pool", "attn_pool_contrastive", "ln_pool", "attnpool", "head")
TAIL_PARAMETERS = ("proj",)
TRUNK_TAIL_MODULES = ("norm", "fc_norm", "head", "attn_pool", "head_drop")


def _blocks_and_tail(visual: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the image tower's residual blocks in order, the modules after them) for open_clip's VisionTransformer
    (``transformer.resblocks``), ModifiedResNet (``layer1..4``) and TimmModel (``trunk.blocks`` / stages)."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        blocks = list(visual.transformer.resblocks)
        tail = [getattr(visual, n) for n in TAIL_MODULES if isinstance(getattr(visual, n, None), nn.Module)]
    elif all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        blocks = [block for i in range(1, 5) for block in getattr(visual, f"layer{i}")]
        tail = [getattr(visual, n) for n in TAIL_MODULES if isinstance(getattr(visual, n, None), nn.Module)]
    elif hasattr(visual, "trunk"):
        trunk = visual.trunk
        if hasattr(trunk, "blocks"):
            blocks = list(trunk.blocks)
        elif hasattr(trunk, "stages"):
            blocks = [block for stage in trunk.stages for block in getattr(stage, "blocks", [stage])]
        else:
            raise UserError(f"student.clip_train=last-blocks: no blocks found in the timm trunk "
                            f"{type(trunk).__name__}; use student.clip_train=all")
        tail = [getattr(trunk, n) for n in TRUNK_TAIL_MODULES if isinstance(getattr(trunk, n, None), nn.Module)]
        tail += [getattr(visual, n) for n in ("head",) if isinstance(getattr(visual, n, None), nn.Module)]
    else:
        raise UserError(f"student.clip_train=last-blocks does not know the image tower {type(visual).__name__} "
                        "(known: open_clip VisionTransformer, ModifiedResNet, TimmModel); use student.clip_train=all")
    return blocks, tail


def check_train_mode(mode: str) -> None:
    if mode not in CLIP_TRAIN_MODES:
        why = " (LoRA is not offered: peft needs transformers, not a dependency here)" if mode == "lora" else ""
        raise UserError(f"unknown student.clip_train {mode!r}{why}; valid: {', '.join(CLIP_TRAIN_MODES)}")


# ----------------------------------------------------------------------------- building it for a run


def check_clip_student_config(config: Any) -> None:
    """Refuse options that make no sense for ``student.arch=clip`` (`config`: a RunConfig): a timm pretrained
    tag (the weights are the teacher's, teacher.model / teacher.pretrained), an unknown training mode."""
    student = config.student
    check_train_mode(student.clip_train)
    pretrained = student.pretrained
    if pretrained is None:
        return
    looks_like_path = any(sep in pretrained for sep in "/\\") or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".tar", ".ckpt")) or os.path.exists(pretrained)
    if not looks_like_path:
        raise UserError(
            f"student.pretrained={pretrained!r} makes no sense with student.arch=clip: the CLIP student starts from "
            f"the teacher's weights (teacher.model={config.teacher.model!r}, teacher.pretrained="
            f"{config.teacher.pretrained!r}). Leave student.pretrained unset, or pass the student.pt of an earlier "
            "student.arch=clip run"
        )


def clip_student_spec(config: Any, num_classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(open_clip model config, ClipStudent spec) for a RunConfig: offline, from configs alone."""
    model_config = _model_config(config.teacher.model)
    pre = clip_preprocess(config.teacher.model, config.teacher.pretrained)
    spec = {
        "model_name": config.teacher.model, "model_config": copy.deepcopy(model_config),
        "pretrained": config.teacher.pretrained, "image_size": pre.size, "mean": list(pre.mean),
        "std": list(pre.std), "interpolation": pre.interpolation, "resize_mode": pre.resize_mode,
        "train": config.student.clip_train, "train_blocks": int(config.student.clip_train_blocks),
        "num_classes": int(num_classes),
    }
    return model_config, spec


def clip_student_architecture(config: Any, num_classes: int) -> ClipStudent:
    """The CLIP student of a RunConfig with random weights (to load a trained student's state dict into)."""
    model_config, spec = clip_student_spec(config, num_classes)
    model = ClipStudent(_build_visual(model_config), num_classes=num_classes, embed_dim=model_config["embed_dim"],
                        spec=spec)
    model.set_trainable(config.student.clip_train, last_blocks=config.student.clip_train_blocks)
    return model


def create_clip_student(config: Any, num_classes: int, text_classifier: np.ndarray, logit_scale: float) -> ClipStudent:
    """The CLIP student for training: the teacher's image tower (its weights) + the zero-shot head, or the
    weights of student.pretrained (an earlier CLIP student's state dict) when set; trainable per clip_train."""
    from zeroshot_adapt.models.student import read_state_dict
    from zeroshot_adapt.teacher.clip import load_clip

    check_clip_student_config(config)
    model_config, spec = clip_student_spec(config, num_classes)
    if config.student.pretrained is not None:
        model = clip_student_architecture(config, num_classes)
        state = read_state_dict(config.student.pretrained)
        own = model.state_dict()
        if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
            raise UserError(f"student.pretrained={config.student.pretrained!r} is not a state dict of this CLIP "
                            f"student ({config.teacher.model}, {num_classes} classes)")
        model.load_state_dict(state)
        return model
    clip = load_clip(config.teacher.model, config.teacher.pretrained)
    visual = clip.model.visual
    del clip
    visual.float().requires_grad_(True)
    model = ClipStudent(visual, num_classes=num_classes, embed_dim=model_config["embed_dim"], spec=spec)
    model.init_head_from_text(text_classifier, logit_scale)
    model.set_trainable(config.student.clip_train, last_blocks=config.student.clip_train_blocks)
    return model.train()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
