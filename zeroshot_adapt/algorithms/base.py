"""The contract between the training loop and an algorithm.

The loop builds batches, calls ``out = algorithm.step(batch, student=..., teacher=...)``, runs
``accelerator.backward(out.loss)``, steps the optimizer, updates the EMA teacher and logs
``out.metrics``. Algorithms never build loaders, models or optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from zeroshot_adapt.registry import Registry


@dataclass
class LabeledBatch:
    """images: [B, 3, H, W] (weakly augmented); targets: [B] int64 class ids (CLIP's or human labels)."""

    images: Tensor
    targets: Tensor


@dataclass
class UnlabeledBatch:
    """A batch of unlabeled samples, mu times the labeled batch.

    weak / strong: one tensor [B_u, 3, H, W] per view (1 view each normally, 2 each for multi-view).
    index:           [B_u] int64 positions in the unlabeled SampleTable.
    true_label:      [B_u] int64 ground truth or -1; used ONLY for metrics (pseudo-label accuracy).
    clip_label:      [B_u] int64 cached CLIP argmax, -1 where no CLIP cache is used.
    clip_confidence: [B_u] float cached CLIP max-probability, 0 where no CLIP cache is used.
    """

    weak: list[Tensor]
    strong: list[Tensor]
    index: Tensor
    true_label: Tensor
    clip_label: Tensor
    clip_confidence: Tensor


@dataclass
class Batch:
    labeled: LabeledBatch | None
    unlabeled: UnlabeledBatch | None


@dataclass
class StepOutput:
    """loss: scalar to backpropagate. metrics: detached scalars (floats or 0-d tensors) to log.

    pseudo_labels / mask: [B_u] the unlabeled targets and float {0,1} mask actually used, for the
    loop's pseudo-label statistics (class histogram over training, accuracy vs ground truth).
    """

    loss: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    pseudo_labels: Tensor | None = None
    mask: Tensor | None = None


class Algorithm(Protocol):
    """What the loop needs from an algorithm. Stateful parts (class prior) live in state_dict()."""

    def step(self, batch: Batch, *, student: nn.Module, teacher: nn.Module) -> StepOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ALGORITHMS: Registry[Any] = Registry("algorithm")
"""name -> factory(num_classes: int, config: AlgorithmConfig, all_reduce_mean, *, micro_batches=1) -> Algorithm
(micro_batches: the loop's gradient accumulation, so running statistics move once per optimizer step)."""


def identity_mean(tensor: Tensor) -> Tensor:
    """Single-process stand-in for an all-reduce mean across processes."""
    return tensor


def forward_in_one_pass(model: nn.Module, chunks: list[Tensor]) -> list[Tensor]:
    """Run `model` once on the concatenation of `chunks` and split the logits back (one BN pass)."""
    sizes = [c.shape[0] for c in chunks]
    logits = model(torch.cat(chunks, dim=0))
    return list(torch.split(logits, sizes, dim=0))


class PseudoLabelAdjuster(Protocol):
    """A pluggable change to how pseudo-labels are made from the weak-view logits (composition, not
    inheritance): DebiasPL's class prior and ReMixMatch's distribution alignment are adjusters.

    Call order inside a step (REFERENCE.md section 1): ``target_probs`` (reads the OLD state) ->
    ``update`` (raw softmax statistics, all-reduced across processes) -> ``margin`` (reads the NEW state).
    """

    def target_probs(self, weak_logits: Tensor) -> Tensor:
        """[B, C] logits -> [B, C] probabilities used for the label (argmax) and the confidence mask."""
        ...

    def update(self, weak_logits: Tensor) -> None:
        """Update running statistics from [B, C] raw weak logits."""
        ...

    def margin(self) -> Tensor | None:
        """[C] added to the strong-view logits before the cross-entropy, or None for no margin."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
