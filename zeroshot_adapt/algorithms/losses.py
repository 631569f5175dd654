"""Pure tensor functions for pseudo-label training: debiased targets, adaptive margin, masked losses.

Notation (REFERENCE.md section 1): ``B`` batch size, ``C`` number of classes, ``z_w`` weak-view logits,
``z_s`` strong-view logits, ``class_prior`` a length-C probability vector, ``tau`` the debias factor.
Equation numbers refer to Wang et al., "Debiased Learning from Naturally Imbalanced Pseudo-Labels",
CVPR 2022 (DebiasPL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def log_prior_offset(class_prior: Tensor, tau: float) -> Tensor:
    """``tau * log(class_prior)``: the per-class offset shared by eq. 3 (subtracted) and eq. 5 (added).

    class_prior: [C] probabilities (> 0; zeros are clamped to the smallest positive float so the
    offset stays finite). Returns [C] in the prior's dtype.
    """
    tiny = torch.finfo(class_prior.dtype).tiny
    return tau * torch.log(class_prior.clamp_min(tiny))


def debiased_logits(logits: Tensor, class_prior: Tensor, tau: float) -> Tensor:
    """DebiasPL eq. 3 (counterfactual reasoning): ``z - tau * log(class_prior)``.

    logits: [B, C]; class_prior: [C]. Returns [B, C]. The pseudo-label distribution is the softmax
    of the result. A uniform prior shifts every class by the same constant (no change after softmax);
    ``tau = 0`` returns values equal to ``logits``.
    """
    return logits - log_prior_offset(class_prior, tau)


def adaptive_margin_logits(logits: Tensor, class_prior: Tensor, tau: float) -> Tensor:
    """DebiasPL eq. 5 (adaptive marginal loss): ``z + tau * log(class_prior)``.

    logits: [B, C] strong-view logits; class_prior: [C]. Returns [B, C], fed to the cross-entropy:
    frequent classes get their logit raised, so the student must beat them by a larger margin.
    """
    return logits + log_prior_offset(class_prior, tau)


def pseudo_labels_from_probs(probs: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Hard pseudo-labels and the confidence mask (FixMatch; DebiasPL section 3.2).

    probs: [B, C]. Returns ``(label [B] int64, confidence [B], mask [B] float in {0, 1})`` with
    ``confidence, label = max(probs)`` and ``mask = confidence >= threshold``.
    """
    confidence, label = probs.max(dim=1)
    mask = (confidence >= threshold).to(probs.dtype)
    return label, confidence, mask


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``mean_over_batch(cross_entropy(logits, targets) * mask)``: scalar.

    logits: [B, C]; targets: [B] int64 (any valid class where ``mask == 0``); mask: [B] float.
    The mean runs over ALL B samples, masked ones included (FixMatch eq. 4), so the loss shrinks when
    few samples pass the threshold instead of being renormalized by the kept count.
    """
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    return (per_sample * mask).mean()


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """Temperature sharpening ``p^(1/T) / sum_c p_c^(1/T)`` (UDA section 3.2; equals ``softmax(z / T)``
    when ``p = softmax(z)``). probs: [B, C] -> [B, C]. Computed in log space for stability."""
    return torch.softmax(torch.log(probs) / temperature, dim=1)


def masked_soft_cross_entropy(logits: Tensor, target_probs: Tensor, mask: Tensor) -> Tensor:
    """``mean_over_batch(-sum_c target_c * log_softmax(logits)_c * mask)``: scalar.

    logits: [B, C]; target_probs: [B, C] (no gradient flows into them); mask: [B] float.
    """
    per_sample = -(target_probs.detach() * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (per_sample * mask).mean()


def masked_kl_divergence(logits: Tensor, target_probs: Tensor, mask: Tensor) -> Tensor:
    """UDA's consistency loss ``mean_over_batch(KL(target || softmax(logits)) * mask)``: scalar.

    Equals :func:`masked_soft_cross_entropy` minus the (constant) target entropy, so the gradients are
    identical; the value is 0 when the student matches the target. logits / target_probs: [B, C]; mask: [B].
    """
    target = target_probs.detach()
    per_sample = (torch.xlogy(target, target) - target * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (per_sample * mask).mean()


CLD_TEMPERATURE = 0.07  # the official DebiasPL code's CLD temperature (REFERENCE.md section 1)
CLD_GROUPINGS = ("argmax", "argmin")


def cld_groups(weak_probs: Tensor, grouping: str = "argmax") -> Tensor:
    """The CLD group of each sample: ``argmax(p_w)`` (ours, the predicted class), or ``argmin(p_w)`` as the
    official DebiasPL code computes it (REFERENCE.md section 1: almost surely a slip, kept as an option so a
    reported number can say which grouping it used). weak_probs: [B, C] -> [B] int64."""
    if grouping == "argmax":
        return weak_probs.argmax(dim=1)
    if grouping == "argmin":
        return weak_probs.argmin(dim=1)
    raise ValueError(f"unknown CLD grouping {grouping!r}; valid: {', '.join(CLD_GROUPINGS)}")


def cld_loss(
    strong_logits: Tensor, weak_logits: Tensor, *, grouping: str = "argmax", temperature: float = CLD_TEMPERATURE
) -> Tensor:
    """Cross-level instance-group discrimination (CLD, Wang, Liu, Yu, CVPR 2021) as the official DebiasPL code
    applies it to the unlabeled batch (REFERENCE.md section 1): scalar.

    ``p_w = softmax(z_w)`` (no gradient), ``p_s = softmax(z_s)``; group ``g_i`` of sample i from ``p_w``
    (:func:`cld_groups`); centroid ``c_k = sum_{i: g_i = k} p_w[i] / max(1, |{i: g_i = k}|)`` (an empty group
    divides by 1, so its centroid is zero); affinity ``A = p_s @ c.T``; ``loss = CE(A / temperature, g)``.

    strong_logits: [B, C] (gradient flows through them); weak_logits: [B, C] (detached here).
    """
    num_classes = weak_logits.shape[1]
    weak_probs = torch.softmax(weak_logits.detach().float(), dim=1)
    strong_probs = torch.softmax(strong_logits.float(), dim=1)
    groups = cld_groups(weak_probs, grouping)
    members = F.one_hot(groups, num_classes).to(weak_probs.dtype)  # [B, K], K = C groups
    centroids = (members.T @ weak_probs) / members.sum(dim=0).clamp_min(1.0)[:, None]  # [K, C]
    affinity = strong_probs @ centroids.T  # [B, K]
    return F.cross_entropy(affinity / temperature, groups)
