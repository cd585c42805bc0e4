"""Local backprop baselines: L-BP (block-wise losses) and LG-BP (block × patch × group).

Ren, Kornblith, Liao, Hinton — *Scaling Forward Gradient With Local Losses* (ICLR 2023),
Table 3. Both put a stop-gradient between the blocks of a :class:`LocalMixer` and train
every block by backprop *inside the block* on its own loss, one block at a time (so only
one block's activations are alive at once):

- ``l-bp``:  block ``i`` minimises ``L_i = loss(head_i(f_i), y)`` with ``f_i`` the block
  output normalized per (patch, group) and averaged over patches.
- ``lg-bp``: block ``i`` minimises ``Σ_{p,g} L_{i,p,g}``, the replicated losses of
  :mod:`forwardonly.local.replicated` (patch ``p``, group ``g`` live, the rest
  stop-gradiented). By the chain rule that sum has exactly the gradient of ``L_i`` in the
  block's weights (each path from a weight to ``f_i`` runs through exactly one live slice),
  so ``lg-bp`` and ``l-bp`` fill the same ``.grad`` up to rounding; ``lg-bp`` computes it
  through the replicated losses to check that claim, and as the backprop reference for the
  forward-gradient estimators that use the same losses.

The heads train on their exact gradients; the final head on the stop-gradiented last block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..local.replicated import pool_vjp, pooled_features, replicate
from .base import register
from .local_losses import LocalLosses, stats


@register("l-bp")
class LocalBackprop(LocalLosses):
    """L-BP: one loss per block, backprop inside each block, stop-gradient between blocks."""

    def block_objective(self, i: int, out: Tensor, targets: Tensor
                        ) -> tuple[Tensor, Tensor, list[nn.Parameter]]:
        """``(objective, block loss, head parameters it also differentiates)``."""
        head = self.mixer.heads[i]
        loss = self.loss_fn(head(self.mixer.block_features(out)), targets)
        return loss, loss.detach(), [p for p in head.parameters() if p.requires_grad]

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        if self.freeze_backbone:
            return self.heads_only(inputs, targets)
        model = self.mixer
        h = model.patchify(inputs)
        local = []
        for i, block in enumerate(model.blocks):
            with torch.enable_grad():
                out = block(h.detach())
                objective, loss, head_params = self.block_objective(i, out, targets)
                params = [p for p in block.parameters() if p.requires_grad] + head_params
                grads = torch.autograd.grad(objective, params)
            for p, g in zip(params, grads, strict=True):
                self.set_param_grad(p, g)
            local.append(loss)
            h = out.detach()
        loss = self.final_head_step(h, targets)
        return stats(loss, local)


@register("lg-bp")
class LocalGroupBackprop(LocalBackprop):
    """LG-BP: backprop of the block × patch × group replicated losses, block by block."""

    def block_objective(self, i: int, out: Tensor, targets: Tensor
                        ) -> tuple[Tensor, Tensor, list[nn.Parameter]]:
        g = self.mixer.groups
        with torch.no_grad():
            hd = out.detach()
            feats, mean, rstd = pooled_features(hd, g)
        # the head's exact gradient is written here; the replicated losses reach the block only
        loss, dfeats = self.head_step(self.mixer.heads[i], feats, targets)
        e = pool_vjp(hd, mean, rstd, dfeats, g)
        return replicate(out, e, loss, g).sum(), loss, []
