"""The shared frame of Ren et al.'s local-loss estimators on a :class:`LocalMixer`.

Ren, Kornblith, Liao, Hinton — *Scaling Forward Gradient With Local Losses* (ICLR 2023,
arXiv 2210.03310). :class:`LocalLosses` is the base class of ``l-bp``, ``lg-bp``
(:mod:`.local_bp`), ``fg-a``, ``lg-fg-a`` (:mod:`.activity`), ``lg-fg-w`` and ``fg-w-mixer``
(:mod:`.local_fg`); the losses themselves are in :mod:`forwardonly.local`.

Every local estimator walks the blocks in order. Block ``i`` gets its input from block
``i − 1`` stop-gradiented, is trained on its own loss (its head on the aggregated block
output), and writes ``.grad`` of its own parameters only; its head trains on the exact
gradient of the same loss. The final head trains on the exact gradient of the model's loss
on the (stop-gradiented) last block output; ``predict`` is ``model(x)``: the final head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..autodiff import LossFn, activity_rule_error
from ..local.heads import head_step
from ..models.local_mixer import Head, LocalMixer
from .base import Estimator, set_grad


class LocalLosses(Estimator):
    """Base class of Ren et al.'s local-loss estimators (they need a :class:`LocalMixer`).

    Arguments:
        model: a :class:`LocalMixer` (``build_model("local-mixer", ...)``).
        loss_fn, seed: see :class:`Estimator`.
        freeze_backbone: train the heads only; every block parameter gets a zero gradient
            (the heads-only baseline: what the frozen random features alone give).
    """

    supports_sequential: ClassVar[bool] = False  # also plain MLPs (see autodiff.activity)

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, seed: int = 0,
                 freeze_backbone: bool = False) -> None:
        if not isinstance(model, LocalMixer):
            if not self.supports_sequential:
                raise TypeError(
                    f"method {type(self).name!r} needs a LocalMixer model "
                    f"(build_model('local-mixer', ...)), got {type(model).__name__}"
                )
            reason = activity_rule_error(model)
            if reason is not None:
                raise TypeError(
                    f"method {type(self).name!r} needs a LocalMixer model or an nn.Sequential "
                    f"MLP of Linear layers and elementwise activations ending in a Linear "
                    f"head; {reason}"
                )
        super().__init__(model, loss_fn, seed=seed)
        self.mixer: LocalMixer = model  # type: ignore[assignment]  # an MLP when supported
        self.freeze_backbone = bool(freeze_backbone)

    def set_param_grad(self, param: nn.Parameter, value: Tensor) -> None:
        if param.requires_grad:
            set_grad(param, value)

    def zero_backbone_grads(self) -> None:
        for p in self.mixer.backbone_parameters():
            if p.requires_grad:
                set_grad(p, torch.zeros_like(p))

    def head_step(self, head: Head, feats: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``head``'s exact gradient on ``(B, C)`` features ``feats``; return the
        loss and ``∂L/∂feats`` (:func:`forwardonly.local.head_step`)."""
        loss, dfeats, grads = head_step(head, feats, targets, self.loss_fn)
        for p, g in grads:
            set_grad(p, g)
        return loss, dfeats

    def block_head_step(self, i: int, out: Tensor, targets: Tensor) -> Tensor:
        """Exact gradient of block ``i``'s head on its plain pooled loss; returns the loss."""
        loss, _ = self.head_step(self.mixer.heads[i], self.mixer.block_features(out), targets)
        return loss

    def final_head_step(self, h: Tensor, targets: Tensor) -> Tensor:
        """Exact gradient of the final head on the stop-gradiented last block output."""
        feats = self.mixer.final_features(h.detach())
        loss, _ = self.head_step(self.mixer.final_head, feats, targets)
        return loss

    @torch.no_grad()
    def heads_only(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        """One step of the frozen-backbone baseline: heads get their exact gradients."""
        h = self.mixer.patchify(inputs)
        local = []
        for i, block in enumerate(self.mixer.blocks):
            h = block(h)
            local.append(self.block_head_step(i, h, targets))
        self.zero_backbone_grads()
        loss = self.final_head_step(h, targets)
        return stats(loss, local)


def stats(loss: Tensor, local: list[Tensor], **extra: float) -> dict[str, float]:
    """``{"loss": final-head loss, "local_loss": mean of the block losses, ...}``."""
    out = {"loss": float(loss), "local_loss": float(torch.stack(local).mean())}
    out.update(extra)
    return out


#: The former name of :class:`LocalLosses`.
LocalMixerEstimator = LocalLosses
