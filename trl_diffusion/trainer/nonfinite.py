"""The non-finite guard: a diverging run stops with the reason, before any non-finite weights are written.

Each micro-batch's loss and per-sample errors (policy, reference, auxiliary networks) are recorded on the device as
finiteness masks. Before every optimizer step the guard checks them and the gradients, agrees with the other processes
through one small all-reduce, and then either lets the step run, skips it (``skip_nonfinite_steps``: the gradients are
dropped, so the optimizer changes nothing) or raises [`NonFiniteError`] naming the step, the terms and the dataset
rows. Every save (checkpoints and `save_model`) refuses weights that are not finite.

With fp16 mixed precision, an overflowing gradient whose loss is finite is the `GradScaler`'s business: it skips the
step and lowers its scale. Such steps are legitimate and never counted as failures.
"""

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate.utils import DistributedType, gather_object
from transformers import TrainerCallback


if TYPE_CHECKING:
    from .base_trainer import DiffusionPreferenceTrainer


logger = logging.getLogger(__name__)

HINT = (
    "Lower the learning rate, keep gradient clipping on (max_grad_norm > 0), check the named rows of the dataset, "
    "or pass skip_nonfinite_steps=N to skip up to N such steps."
)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, error, gradient or weight."""


@dataclass
class _Observation:
    """What one process saw during one optimizer step: per-term non-finite masks and the rows they belong to."""

    rows: list[int] = field(default_factory=list)
    masks: list[tuple[str, torch.Tensor, list[int]]] = field(default_factory=list)


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


class NonFiniteGuard(TrainerCallback):
    """Stop (or skip) an optimizer step whose loss, errors or gradients are not finite; refuse non-finite saves.

    Args:
        trainer: the [`DiffusionPreferenceTrainer`] it guards.
        max_skipped_steps: optimizer steps that may be skipped before training stops (``skip_nonfinite_steps``).
    """

    def __init__(self, trainer: "DiffusionPreferenceTrainer", max_skipped_steps: int = 0):
        self.trainer = trainer
        self.max_skipped_steps = max_skipped_steps
        self.num_skipped_steps = 0
        self._observation = _Observation()
        # Micro-batches since the last log, and how many of them had a non-finite loss (a device tensor)
        self._window_micro_batches = 0
        self._window_nonfinite = torch.tensor(0)

    # ----- recording (every micro-batch, no host sync) -----

    def observe(self, rows: torch.Tensor, terms: dict[str, torch.Tensor | None]) -> None:
        """Record the finiteness of a micro-batch's loss and per-sample terms, with its dataset rows."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        self._observation.rows.extend(rows)
        for name, values in terms.items():
            if values is not None:
                self._observation.masks.append((name, ~torch.isfinite(values.detach()), rows))

    # ----- the decision, before each optimizer step -----

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        observation, self._observation = self._observation, _Observation()
        masks = [mask.any().reshape(1) for _, mask, _ in observation.masks]
        terms_bad = torch.cat(masks).any() if masks else torch.tensor(False)
        grads_bad = ~all_finite([p.grad for p in trainer.model.parameters() if p.grad is not None])
        device = trainer.accelerator.device
        flags = torch.stack([terms_bad.to(device), grads_bad.to(device)]).float()
        if trainer.accelerator.num_processes > 1:
            flags = trainer.accelerator.reduce(flags, reduction="sum")
        terms_bad, grads_bad = (bool(flag > 0) for flag in flags.tolist())
        # fp16: with a finite loss, an overflowing gradient is skipped by the GradScaler itself (legitimate).
        scaler_handles_it = trainer.accelerator.scaler is not None and not terms_bad
        if not terms_bad and (not grads_bad or scaler_handles_it):
            return
        step = state.global_step + 1
        reports = self._describe(observation, grads_bad)
        if trainer.accelerator.num_processes > 1:
            reports = [report for per_rank in gather_object([reports]) for report in per_rank]
        message = f"Non-finite values at optimizer step {step}: " + "; ".join(reports) + "."
        if self.num_skipped_steps >= self.max_skipped_steps or trainer.is_deepspeed_enabled:
            budget = (
                f" {self.num_skipped_steps} earlier ones were skipped (skip_nonfinite_steps={self.max_skipped_steps})."
                if self.max_skipped_steps
                else ""
            )
            applied = (
                "DeepSpeed applied this update during the backward pass; no checkpoint will hold its weights."
                if trainer.is_deepspeed_enabled
                else "Training stopped before this update was applied: the weights (and every checkpoint) are those "
                "of the last finite step."
            )
            raise NonFiniteError(f"{message}{budget} {applied} {HINT}")
        self.num_skipped_steps += 1
        logger.warning(
            "%s Skipping this update (%d of %d non-finite steps allowed).",
            message,
            self.num_skipped_steps,
            self.max_skipped_steps,
        )
        trainer.model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter (and state) be

    def _describe(self, observation: _Observation, grads_bad: bool) -> list[str]:
        """Human-readable findings of this process (only computed once something is known to be non-finite)."""
        process = self.trainer.accelerator.process_index
        where = f" (process {process})" if self.trainer.accelerator.num_processes > 1 else ""
        found: dict[str, set[int]] = {}
        for name, mask, rows in observation.masks:
            bad_rows = nonfinite_rows(mask.cpu(), rows)
            if bad_rows:
                found.setdefault(name, set()).update(bad_rows)
        reports = [f"{name} non-finite for dataset rows {sorted(rows)}{where}" for name, rows in found.items()]
        if grads_bad and process == 0:
            reports.append("gradient norm non-finite")
        if reports:
            reports.append(f"batch rows {observation.rows}{where}")
        return reports

    # ----- saving -----

    def check_weights(self, output_dir: str | None) -> None:
        """Raise [`NonFiniteError`] instead of saving weights that are not all finite (all processes agree)."""
        trainer = self.trainer
        parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        finite = all_finite([getattr(p, "ds_tensor", p) for p in parameters]).to(trainer.accelerator.device)
        sharded = trainer.is_fsdp_enabled or trainer.accelerator.distributed_type == DistributedType.DEEPSPEED
        if sharded and trainer.accelerator.num_processes > 1:  # each process holds a shard; they all call save
            finite = trainer.accelerator.reduce((~finite).float(), reduction="sum") == 0
        if not bool(finite):
            names = [
                name
                for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
                if p.requires_grad and not bool(all_finite([p]))
            ]
            raise NonFiniteError(
                f"Refusing to save to {output_dir}: at step {trainer.state.global_step} the trainable weights are not "
                f"finite ({len(names)} tensors, e.g. {names[:3]}). The last optimizer update overflowed. " + HINT
            )

    # ----- the logged loss -----

    def loss_to_accumulate(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss the Trainer adds to its running total: 0 where it is not finite (no host sync).

        A NaN in the Trainer's running total would make every later logged loss NaN; transformers' own filter would
        log the first step of a window as 0. [`update_logs`] divides by the finite micro-batches only.
        """
        finite = torch.isfinite(loss)
        self._window_micro_batches += 1
        self._window_nonfinite = self._window_nonfinite.to(loss.device) + (~finite).long()
        return torch.where(finite, loss, torch.zeros_like(loss))

    def update_logs(self, logs: dict[str, float]) -> None:
        """Correct a training log's ``loss`` to the mean over its finite micro-batches (``nan`` if there are none),
        and add ``nonfinite/skipped_steps`` when skipping is allowed. Runs on every process (it all-reduces)."""
        accelerator = self.trainer.accelerator
        counts = torch.stack([torch.tensor(self._window_micro_batches), self._window_nonfinite.cpu()])
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        total, nonfinite = counts.tolist()
        if nonfinite and "loss" in logs:
            logs["loss"] = logs["loss"] * total / (total - nonfinite) if total > nonfinite else float("nan")
        self._window_micro_batches, self._window_nonfinite = 0, torch.tensor(0)
        if self.max_skipped_steps > 0:
            logs["nonfinite/skipped_steps"] = self.num_skipped_steps
