"""Small stateful objects that track class statistics of the pseudo-labels.

Each has ``update()`` / ``state_dict()`` / ``load_state_dict()``. Statistics are averaged across processes
through an injected ``all_reduce_mean`` callable (``accelerator.reduce(t, "mean")`` in the loop,
:func:`~zeroshot_adapt.algorithms.base.identity_mean` in one process) BEFORE the moving average, so every
process holds the same prior; state is checkpointed. ``all_reduce_mean=None`` means one process
(:func:`~zeroshot_adapt.algorithms.base.identity_mean`; imported lazily because the algorithms package
imports this module). (The official DebiasPL code keeps its prior per
process and resets it on resume; see REFERENCE.md section 1.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from zeroshot_adapt.algorithms.losses import debiased_logits, log_prior_offset
from zeroshot_adapt.errors import UserError

AllReduceMean = Callable[[Tensor], Tensor]


@runtime_checkable
class ReportsMetrics(Protocol):
    """Optional extension of a PseudoLabelAdjuster: scalars describing its state, logged by algorithms."""

    def metrics(self) -> dict[str, Tensor]: ...


def _or_identity(all_reduce_mean: AllReduceMean | None) -> AllReduceMean:
    if all_reduce_mean is not None:
        return all_reduce_mean
    from zeroshot_adapt.algorithms.base import identity_mean  # lazy: the algorithms package imports us

    return identity_mean


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"prior momentum {momentum!r} must lie in [0, 1) (the official default is 0.99)")


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise UserError(f"num_classes {num_classes!r} must be a positive integer")


class ClassPrior:
    """Running estimate of the class marginal of the teacher's predictions (DebiasPL eq. 4).

    ``class_prior = m * class_prior + (1 - m) * all_reduce_mean(mean_over_batch(softmax(z_w)))``,
    per class (a length-C vector), on the RAW softmax (REFERENCE.md: the debiased softmax in the
    paper's Algorithm 1 is a typo). Starts uniform (1/C). Stored as float32; it follows the device of
    the tensors it is updated with, or move it with :meth:`to`.

    Gradient accumulation (``micro_batches`` = k > 1, the loop's ``optim.grad_accum``): the loop calls the
    algorithm once per micro-batch, but the prior moves ONCE per optimizer step, so its time scale does not
    depend on k. The first k - 1 calls only collect their batch means; the k-th averages the k means (the
    batch mean of the whole step when the micro-batches are equal, as the loop makes them), all-reduces it
    and applies the moving average. Until then every micro-batch reads the prior of the previous step: the
    targets exactly as without accumulation; the margin of micro-batches 1..k-1 is one step older (without
    accumulation the whole batch gets the margin of the updated prior). Checkpoints are written between
    optimizer steps, where nothing is pending.
    """

    def __init__(
        self,
        num_classes: int,
        momentum: float,
        all_reduce_mean: AllReduceMean | None = None,
        micro_batches: int = 1,
    ):
        _check_num_classes(num_classes)
        _check_momentum(momentum)
        if int(micro_batches) != micro_batches or micro_batches < 1:
            raise UserError(f"micro_batches (optim.grad_accum) {micro_batches!r} must be a positive integer")
        self.num_classes = num_classes
        self.momentum = momentum
        self.all_reduce_mean = _or_identity(all_reduce_mean)
        self.micro_batches = int(micro_batches)
        self.probs: Tensor = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32)
        self._pending: list[Tensor] = []  # batch means of this optimizer step's earlier micro-batches

    def to(self, device: torch.device | str) -> ClassPrior:
        self.probs = self.probs.to(device)
        return self

    @torch.no_grad()
    def update(self, probs_batch_mean: Tensor) -> None:
        """probs_batch_mean: [C] this process's batch mean of the raw softmax; all-reduced, then EMA."""
        if probs_batch_mean.shape != (self.num_classes,):
            raise ValueError(f"expected a [{self.num_classes}] batch mean, got {tuple(probs_batch_mean.shape)}")
        mean = probs_batch_mean.detach().float()
        if self.micro_batches > 1:
            self._pending.append(mean)
            if len(self._pending) < self.micro_batches:
                return  # not the last micro-batch of this optimizer step
            mean = torch.stack(self._pending).mean(dim=0)
            self._pending = []
        mean = self.all_reduce_mean(mean)
        self.probs = self.probs.to(mean.device)
        self.probs = self.momentum * self.probs + (1.0 - self.momentum) * mean

    @torch.no_grad()
    def update_from_logits(self, logits: Tensor) -> None:
        """logits: [B, C] raw weak-view logits; updates with ``mean_over_batch(softmax(logits))``."""
        self.update(torch.softmax(logits.detach().float(), dim=1).mean(dim=0))

    def on(self, device: torch.device) -> Tensor:
        """The [C] prior on `device` (moved there once, so later calls are free)."""
        if self.probs.device != device:
            self.probs = self.probs.to(device)
        return self.probs

    def metrics(self) -> dict[str, Tensor]:
        """Imbalance of the prior: ``prior_max / prior_min`` (1 for uniform)."""
        return {"prior_imbalance": (self.probs.max() / self.probs.min()).detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"class_prior": self.probs.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        probs = torch.as_tensor(state["class_prior"], dtype=torch.float32)
        if probs.shape != (self.num_classes,):
            raise UserError(
                f"checkpointed class prior has shape {tuple(probs.shape)}, but this run has {self.num_classes} classes"
            )
        self.probs = probs.to(self.probs.device).clone()
        self._pending = []


class DebiasAdjuster:
    """DebiasPL as a :class:`~zeroshot_adapt.algorithms.base.PseudoLabelAdjuster`.

    - ``target_probs(z_w) = softmax(z_w - tau * log(class_prior_old))``  (eq. 3)
    - ``update(z_w)``: prior EMA on the raw softmax                       (eq. 4)
    - ``margin() = tau * log(class_prior_new)``, added to strong logits   (eq. 5)

    ``tau = 0`` reproduces FixMatch exactly: the offset is (signed) zero, so the values are unchanged.
    """

    def __init__(self, class_prior: ClassPrior, tau: float):
        self.class_prior = class_prior
        self.tau = float(tau)

    def target_probs(self, weak_logits: Tensor) -> Tensor:
        prior = self.class_prior.on(weak_logits.device)
        return torch.softmax(debiased_logits(weak_logits, prior, self.tau), dim=1)

    def update(self, weak_logits: Tensor) -> None:
        self.class_prior.update_from_logits(weak_logits)

    def to(self, device: torch.device | str) -> DebiasAdjuster:
        self.class_prior.to(device)
        return self

    def margin(self) -> Tensor:
        return log_prior_offset(self.class_prior.probs, self.tau)

    def metrics(self) -> dict[str, Tensor]:
        return self.class_prior.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.class_prior.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_prior.load_state_dict(state)


def _target_prior(num_classes: int, target_prior: Sequence[float] | Tensor | None) -> Tensor:
    if target_prior is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32)
    target = torch.as_tensor(target_prior, dtype=torch.float32).flatten()
    if target.shape != (num_classes,) or not bool((target > 0).all()):
        raise UserError(
            f"distribution-alignment target prior must hold {num_classes} positive numbers, got {target.tolist()}"
        )
    return target / target.sum()


class DistributionAlignment:
    """ReMixMatch distribution alignment (Berthelot et al. 2020, section 3.2) as a PseudoLabelAdjuster.

    ``target_probs(z_w) = normalize(softmax(z_w) * p_target / p_model)`` with ``p_model`` the running
    mean of the raw weak softmax (a :class:`ClassPrior`, read BEFORE this step's update) and
    ``p_target`` uniform unless given (in T-ZSL the true class marginal is unknown). No margin.
    """

    def __init__(
        self,
        num_classes: int,
        momentum: float,
        target_prior: Sequence[float] | Tensor | None = None,
        all_reduce_mean: AllReduceMean | None = None,
        micro_batches: int = 1,
    ):
        self.class_prior = ClassPrior(num_classes, momentum, all_reduce_mean, micro_batches=micro_batches)
        self.target_prior = _target_prior(num_classes, target_prior)

    def target_probs(self, weak_logits: Tensor) -> Tensor:
        probs = torch.softmax(weak_logits, dim=1)
        model = self.class_prior.on(weak_logits.device)
        self.target_prior = self.target_prior.to(weak_logits.device)
        aligned = probs * (self.target_prior / model)
        return aligned / aligned.sum(dim=1, keepdim=True)

    def update(self, weak_logits: Tensor) -> None:
        self.class_prior.update_from_logits(weak_logits)

    def to(self, device: torch.device | str) -> DistributionAlignment:
        self.class_prior.to(device)
        self.target_prior = self.target_prior.to(device)
        return self

    def margin(self) -> None:
        return None

    def metrics(self) -> dict[str, Tensor]:
        return self.class_prior.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.class_prior.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_prior.load_state_dict(state)
