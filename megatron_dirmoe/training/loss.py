"""The language-model loss of one micro-batch and Megatron-LM's checks on it.

``pretrain_gpt`` checks every micro-batch's local loss before the data-parallel all-reduce:
NaN and Inf stop the job (``--check-for-nan-in-loss-and-grad``, on by default) and, with
``--check-for-spiky-loss``, a loss over 10x the largest seen so far is reported. The CUDA path
runs them through Megatron's rerun state machine (so ``--rerun-mode`` works as in Megatron-LM);
the CPU loop applies the same rules with :class:`LossChecks`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch

__all__ = ["SPIKY_LOSS_FACTOR", "loss_func", "LossChecks"]

# Megatron-LM's pretrain_gpt: a spiky loss is one over 10x the largest loss observed.
SPIKY_LOSS_FACTOR = 10


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of token losses, token count and the 'lm loss' report (Megatron's per-token form:
    its schedule divides by the tokens and micro-batches), after Megatron's NaN/Inf/spike
    checks."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])

    args = get_args()
    machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        # Forward computations are deterministic: no tolerance.
        machine.validate_result(result=loss, rejection_func=torch.isnan, tolerance=0.0,
                                message="found NaN in local forward loss calculation",
                                fatal=True)
        machine.validate_result(result=loss, rejection_func=torch.isinf, tolerance=0.0,
                                message="found Inf in local forward loss calculation",
                                fatal=True)
    if args.check_for_spiky_loss:
        machine.validate_result(
            result=loss,
            rejection_func=partial(machine.is_unexpectedly_large,
                                   threshold=SPIKY_LOSS_FACTOR, context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, {"lm loss": report}


class LossChecks:
    """Megatron's loss checks for the CPU loop: `check` raises `FloatingPointError` on a NaN or
    Inf loss (``--check-for-nan-in-loss-and-grad``) and returns a warning for a loss over
    :data:`SPIKY_LOSS_FACTOR` x the largest seen (``--check-for-spiky-loss``)."""

    def __init__(self, args) -> None:
        self.nan_inf = bool(getattr(args, "check_for_nan_in_loss_and_grad", True))
        self.spiky = bool(getattr(args, "check_for_spiky_loss", False))
        self.max_seen = 0.0

    def check(self, loss: float, iteration: int) -> Optional[str]:
        if self.nan_inf and not math.isfinite(loss):
            kind = "NaN" if math.isnan(loss) else "Inf"
            raise FloatingPointError(
                f"iteration {iteration}: found {kind} in local forward loss calculation "
                "(--check-for-nan-in-loss-and-grad; lower --lr or check the data)")
        warning = None
        if self.spiky and math.isfinite(loss):
            if self.max_seen > 0 and abs(loss) > SPIKY_LOSS_FACTOR * self.max_seen:
                warning = (f"iteration {iteration}: spiky loss {loss:.4g} > "
                           f"{SPIKY_LOSS_FACTOR} x the largest so far ({self.max_seen:.4g})")
            self.max_seen = max(self.max_seen, abs(loss))
        return warning
