"""SAM's training loss: focal and dice on the masks, the IoU head regressed on each mask's real IoU.

The SAM paper weighs focal and dice 20:1 and trains, for an ambiguous prompt
(one point, three outputs), only the output closest to the truth. Losses are
taken on the low-resolution logits against the area-averaged true mask: at
full resolution they cost 16x more and teach no better.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The SAM paper's weights.
FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0


def focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Per-mask sigmoid focal loss, averaged over pixels: ``(..., h, w)`` to ``(...)``."""
    import torch.nn.functional as F

    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def bce_loss(logits, targets):
    """Per-mask binary cross-entropy, averaged over pixels."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(-2).mean(-1)


def dice_loss(logits, targets):
    """Per-mask soft dice loss."""
    prob = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    return 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


@dataclass
class Step:
    """One round's loss, the logits to continue from, and the IoU the round reached.

    Attributes:
        loss: scalar torch tensor (mask loss + IoU-head loss).
        logits: ``(B, h, w)`` detached logits of the output the model itself
            would pick (highest predicted IoU), for the next round's ``mask_input``.
        iou: mean real IoU of the trained outputs (for logs).
    """

    loss: object
    logits: object
    iou: float


class SamObjective:
    """SAM's loss over a round of prompts.

    Args:
        focal_weight: weight of the focal loss (SAM: 20).
        bce_weight: weight of plain cross-entropy (SAM: 0; the demo preset was trained with 1 and focal 0).
        dice_weight: weight of the dice loss (SAM: 1).

    Example:
        >>> step = SamObjective()(logits, iou_pred, targets, multimask=True)  # doctest: +SKIP
        >>> step.loss.backward()  # doctest: +SKIP
    """

    def __init__(self, focal_weight: float = FOCAL_WEIGHT, bce_weight: float = 0.0, dice_weight: float = DICE_WEIGHT):
        self.focal_weight, self.bce_weight, self.dice_weight = focal_weight, bce_weight, dice_weight

    def __call__(self, logits, iou_pred, targets, multimask: bool) -> Step:
        """Loss of the decoder's ``logits (B, M, h, w)`` and ``iou_pred (B, M)`` against ``targets (B, h, w)`` in [0, 1].

        ``multimask``: train the best of SAM's three ambiguous outputs (1..3);
        otherwise its single output (0).
        """
        import torch
        import torch.nn.functional as F

        if multimask:
            logits, iou_pred = logits[:, 1:], iou_pred[:, 1:]
        else:
            logits, iou_pred = logits[:, :1], iou_pred[:, :1]
        t = targets[:, None].expand_as(logits)
        per_mask = self.dice_weight * dice_loss(logits, t)
        if self.focal_weight:
            per_mask = per_mask + self.focal_weight * focal_loss(logits, t)
        if self.bce_weight:
            per_mask = per_mask + self.bce_weight * bce_loss(logits, t)
        with torch.no_grad():
            pred, truth = logits > 0, t > 0.5
            inter = (pred & truth).flatten(-2).sum(-1).float()
            union = (pred | truth).flatten(-2).sum(-1).float()
            real_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        best = per_mask.argmin(1)
        rows = torch.arange(len(best), device=best.device)
        mask_loss = per_mask[rows, best].mean()
        iou_loss = F.mse_loss(iou_pred, real_iou)
        picked = iou_pred.detach().argmax(1)
        return Step(mask_loss + iou_loss, logits[rows, picked].detach(), real_iou[rows, best].mean().item())
