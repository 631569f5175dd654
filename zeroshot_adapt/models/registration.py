"""What this package's own timm architectures (`zsa_cnn_small`, `wrn28_2`, `wrn28_8`) share: they have no
published weights, so ``pretrained=True`` means "load the weights that the pretrained_cfg names", which is
what ``timm.create_model("local-dir:DIR" / "hf-hub:ID", pretrained=True)`` passes for a `zsa export` folder."""

from __future__ import annotations

from typing import Any

WEIGHT_SOURCE_KEYS = ("file", "url", "hf_hub_id", "state_dict")  # where timm's load_pretrained finds weights


def has_weight_source(pretrained_cfg: Any) -> bool:
    """Whether a pretrained_cfg (dict or timm PretrainedCfg) names weights to load."""
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg
    return isinstance(cfg, dict) and any(cfg.get(key) for key in WEIGHT_SOURCE_KEYS)
