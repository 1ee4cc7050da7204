"""Preference losses on sequence log-probabilities: DPO (BPO paper Eq. 4), cDPO, IPO, hinge; SFT.

Every preference loss here is a function of the same four per-pair numbers, the summed (or, with
``average_logp``, averaged; Li et al. 2024) answer-token log-probabilities of the chosen and rejected
answers under the policy and under the reference model. With

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

the losses are (``beta`` is the paper's eta):

* ``sigmoid``      -log sigma(beta * h)                                  DPO, BPO paper Eq. 4
* ``conservative`` -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h)   cDPO (label noise eps)
* ``ipo``          (h - 1 / (2 beta))^2                                  IPO (Azar et al. 2023)
* ``hinge``        max(0, 1 - beta * h)                                  SLiC-style hinge

The implicit rewards ``beta * (log pi - log ref)`` of each answer are returned too; their margin
and how often the chosen one wins ("reward accuracy") are the metrics DPO runs are watched by.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LOSS_TYPES = ("sigmoid", "conservative", "ipo", "hinge")


class PreferenceLossOutput(NamedTuple):
    """``losses``, ``chosen_rewards``, ``rejected_rewards``: each of shape ``(batch_size,)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class PreferenceLoss(nn.Module):
    """DPO-family loss on sequence log-probabilities (BPO paper Eq. 4 and its variants).

    Args:
        loss_type: ``sigmoid`` (DPO), ``conservative`` (label-smoothed DPO), ``ipo`` or ``hinge``.
        beta: temperature of the implicit reward, > 0 (paper: 0.1).
        label_smoothing: assumed probability that a preference label is flipped; ``conservative``
            only, in (0, 0.5).
    """

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss {loss_type!r} (known: {', '.join(LOSS_TYPES)})")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if loss_type == "conservative" and not 0 < label_smoothing < 0.5:
            raise ValueError("conservative DPO needs label_smoothing in (0, 0.5)")
        if loss_type != "conservative" and label_smoothing:
            raise ValueError(f"label_smoothing applies to 'conservative' only, not {loss_type!r}")
        self.loss_type = loss_type
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ) -> PreferenceLossOutput:
        """
        Args:
            policy_chosen_logps: log pi(y_w|x) of the chosen answers, shape ``(batch_size,)``.
            policy_rejected_logps: log pi(y_l|x) of the rejected answers, shape ``(batch_size,)``.
            reference_chosen_logps: log ref(y_w|x), shape ``(batch_size,)``; no gradient needed.
            reference_rejected_logps: log ref(y_l|x), shape ``(batch_size,)``.

        Returns:
            ``PreferenceLossOutput``: per-pair losses and the chosen/rejected implicit rewards
            ``beta * (log pi - log ref)``, each ``(batch_size,)``. Average ``losses`` for the step.
        """
        ref_chosen = reference_chosen_logps.to(policy_chosen_logps.dtype).detach()
        ref_rejected = reference_rejected_logps.to(policy_rejected_logps.dtype).detach()
        chosen_logratios = policy_chosen_logps - ref_chosen
        rejected_logratios = policy_rejected_logps - ref_rejected
        h = chosen_logratios - rejected_logratios
        if self.loss_type == "sigmoid":
            losses = -F.logsigmoid(self.beta * h)
        elif self.loss_type == "conservative":
            eps = self.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)
        elif self.loss_type == "ipo":
            losses = (h - 1 / (2 * self.beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - self.beta * h)
        return PreferenceLossOutput(
            losses,
            self.beta * chosen_logratios.detach(),
            self.beta * rejected_logratios.detach(),
        )


def sft_loss(token_logps: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per answer token (the SFT baseline of the paper's Table 4).

    Args:
        token_logps: log-probability of each target token, shape ``(batch_size, seq_len)``.
        answer_mask: 1 where the target token belongs to the answer, shape ``(batch_size, seq_len)``.

    Returns:
        Scalar: the mean over every answer token in the batch (long answers weigh more, as in
        ordinary instruction tuning).
    """
    mask = answer_mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def dpo_with_sft(preference_losses: torch.Tensor, token_logps: torch.Tensor, answer_mask: torch.Tensor,
                 sft_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's DPO objective, plus ``sft_weight`` times the NLL of the *chosen* answers (RPO,
    Pang et al. 2024; TRL's ``rpo_alpha``). Plain DPO may lower log pi(y_w) as long as
    log pi(y_l) falls faster; the NLL term holds the ground truth up.

    Args:
        preference_losses: per-pair losses from ``PreferenceLoss``, shape ``(n,)``.
        token_logps, answer_mask: of the concatenated batch, chosen rows first, ``(2n, seq_len)``.
        sft_weight: >= 0; 0 gives plain DPO.

    Returns:
        ``(loss, chosen_nll)``; ``chosen_nll`` is None when ``sft_weight`` is 0.
    """
    loss = preference_losses.mean()
    if sft_weight <= 0:
        return loss, None
    n = preference_losses.shape[0]
    chosen_nll = sft_loss(token_logps[:n], answer_mask[:n])
    return loss + sft_weight * chosen_nll, chosen_nll
