"""The prompt-ensemble zero-shot classifier (CLIP, Radford et al. 2021, section 3.1.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroshot_adapt.teacher.prompts import PromptSet


@torch.no_grad()
def zeroshot_classifier(model: torch.nn.Module, tokenizer, prompts: PromptSet, device: torch.device | str) -> Tensor:
    """Class embeddings [D, C]: for each class, encode every template filled with its name,
    L2-normalize each embedding, average over templates, L2-normalize again."""
    columns = []
    for index in range(len(prompts.classes)):
        tokens = tokenizer(prompts.class_texts(index)).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)  # [T, D]
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


def zeroshot_logits(image_features: Tensor, classifier: Tensor, logit_scale: float) -> Tensor:
    """logits [B, C] = logit_scale * normalize(image_features [B, D]) @ classifier [D, C].

    `logit_scale` is the model's own exp(logit_scale) (100 for OpenAI weights; a small CLIP trained
    from scratch learns its own — forcing 100 makes it over-confident, REFERENCE.md section 2)."""
    return logit_scale * F.normalize(image_features.float(), dim=-1) @ classifier.float()
