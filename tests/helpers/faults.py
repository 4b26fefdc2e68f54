"""Faults injected into a real trainer for the reliability tests: a NaN in one per-sample error at chosen steps."""

import torch


def inject_nan_error(trainer, steps: set[int], call: int = 0, sample: int = 0) -> list[int]:
    """Make ``trainer.denoising_errors`` return NaN for one sample at the given optimizer steps (1-based).

    ``call`` picks which errors of the step: LoRA Diffusion-DPO computes the reference's (call 0), then the policy's
    (call 1). Returns a list that receives the dataset row of each poisoned sample.
    """
    compute = trainer.denoising_errors
    calls = {"step": None, "count": 0}
    poisoned_rows = []

    def denoising_errors(denoiser, step):
        errors = compute(denoiser, step)
        current = trainer.state.global_step + 1
        if step.mode != "train":
            return errors
        if calls["step"] != current:
            calls.update(step=current, count=0)
        if current in steps and calls["count"] == call:
            errors = errors.clone()
            errors[sample] = float("nan")
            rows = step.inputs["row_index"]
            poisoned_rows.append(int(rows[sample % len(rows)]))
        calls["count"] += 1
        return errors

    trainer.denoising_errors = denoising_errors
    return poisoned_rows


def all_finite(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(value).all() for value in state_dict.values() if value.is_floating_point())
