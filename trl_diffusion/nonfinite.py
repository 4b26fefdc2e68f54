"""Non-finite values in training: the error a diverging run stops with, and the checks that find them.

Each micro-batch's loss and per-sample errors (policy, reference, auxiliary networks) are recorded on the device as
finiteness masks. Before every optimizer step the guard checks them and the gradients, agrees with the other processes
through one small all-reduce, and then either lets the step run, skips it (``skip_nonfinite_steps``: the gradients are
dropped, so the optimizer changes nothing) or raises [`NonFiniteError`][] naming the step, the terms and the dataset
rows. Every save (checkpoints and `save_model`) refuses weights that are not finite. The guard itself is the
callback [`NonFiniteGuard`][trl_diffusion.callbacks.NonFiniteGuard]; this module holds what it checks with.

With fp16 mixed precision, an overflowing gradient whose loss is finite is the `GradScaler`'s business: it skips the
step and lowers its scale. Such steps are legitimate and never counted as failures.
"""

import torch


HINT = (
    "Lower the learning rate, keep gradient clipping on (max_grad_norm > 0), check the named rows of the dataset, "
    "or pass skip_nonfinite_steps=N to skip up to N such steps."
)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, error, gradient or weight."""


def nonfinite_rows(mask: torch.Tensor, rows: list[int]) -> list[int]:
    """Dataset rows of the non-finite entries of a per-sample term: ``(2B,)`` is ``[chosen ; rejected]``, ``(B,)``
    one entry per pair, a scalar the whole micro-batch."""
    if mask.dim() == 0 or mask.numel() not in (len(rows), 2 * len(rows)):
        return list(rows) if bool(mask.any()) else []
    indices = mask.flatten().nonzero().flatten().tolist()
    return sorted({rows[index % len(rows)] for index in indices})


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 DTensor's shard


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d boolean tensor, on the tensors' device: whether every entry of every tensor is finite (no host sync)."""
    tensors = [_local_tensor(t).detach() for t in tensors if t is not None and t.numel() > 0]
    if not tensors:
        return torch.tensor(True)
    # The max-norm propagates NaN and is inf for an inf entry, and never overflows, unlike the 2-norm.
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf")))
