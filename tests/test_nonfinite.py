"""The non-finite guard (`trl_diffusion/trainer/nonfinite.py`): a diverging run stops with its reason, never writes
non-finite weights, and never logs a NaN loss as 0."""

import os

import pytest
import torch
from helpers.faults import all_finite, inject_nan_error
from helpers.runs import load_weights
from helpers.trainers import make_trainer
from transformers import TrainerCallback

from trl_diffusion.trainer.checkpoints import COMPLETE_MARKER
from trl_diffusion.trainer.nonfinite import NonFiniteError, nonfinite_rows


class _Snapshots(TrainerCallback):
    """The trainable weights after every optimizer step, by step."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = {
            name: p.detach().clone() for name, p in self.trainer.model.named_parameters() if p.requires_grad
        }


def _trainable(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def _assert_equal_weights(expected, actual):
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_an_overflowing_learning_rate_stops_before_any_nonfinite_weights_are_written(peft, tiny_sd, tmp_path):
    """The issue's run: learning rate 1e30, no gradient clipping, 6 steps, a checkpoint every step."""
    trainer = make_trainer(
        "dpo", tiny_sd, tmp_path / "out", peft=peft, max_steps=6, learning_rate=1e30, max_grad_norm=0.0,
        optim="sgd", save_strategy="steps", save_steps=1,
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"optimizer step 2: loss non-finite for dataset rows \[\d+, \d+\]"):
        trainer.train()
    checkpoints = sorted(name for name in os.listdir(tmp_path / "out") if name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-1"]
    assert os.path.isfile(tmp_path / "out" / "checkpoint-1" / COMPLETE_MARKER)
    assert all_finite(load_weights(tmp_path / "out" / "checkpoint-1"))
    # Nothing logged the NaN loss as 0: the only training log is step 1's finite loss.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and 0 < losses[0] < 10
    # A final save after the error writes the last finite weights (step 1's: the failed update was not applied).
    trainer.save_model(str(tmp_path / "final"))
    assert all_finite(load_weights(tmp_path / "final"))
    # Weights that did become non-finite are never written.
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"Refusing to save to .*poisoned: at step 1 the trainable weights"):
        trainer.save_model(str(tmp_path / "poisoned"))
    assert not os.path.exists(tmp_path / "poisoned")


def test_an_update_that_overflows_the_weights_is_never_checkpointed(tiny_sd, tmp_path):
    """A learning rate at float32's limit: the first update itself turns weights into inf (the loss was finite)."""
    trainer = make_trainer(
        "dpo", tiny_sd, tmp_path / "out", peft=False, max_steps=3, learning_rate=3.4e38, max_grad_norm=0.0,
        optim="sgd", save_strategy="steps", save_steps=1,
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"Refusing to save to .*checkpoint-1: at step 1 the trainable weights"):
        trainer.train()
    assert not os.path.exists(tmp_path / "out" / "checkpoint-1")
    with pytest.raises(NonFiniteError, match="The last optimizer update overflowed"):
        trainer.save_model()
    assert os.listdir(tmp_path / "out") == []


def test_a_nan_in_one_reference_error_names_step_term_and_row(tiny_sd, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path, max_steps=3, optim="sgd")
    snapshots = _Snapshots(trainer)
    trainer.add_callback(snapshots)
    poisoned = inject_nan_error(trainer, steps={2}, call=0, sample=1)  # the reference pass, second pair's chosen
    with pytest.raises(NonFiniteError) as raised:
        trainer.train()
    (row,) = poisoned
    message = str(raised.value)
    assert "optimizer step 2: loss non-finite for dataset rows" in message
    assert f"reference errors non-finite for dataset rows [{row}]" in message
    assert "policy errors" not in message  # the policy's own errors stayed finite
    assert "batch rows [" in message and "Training stopped before this update was applied" in message
    _assert_equal_weights(snapshots.weights[1], _trainable(trainer))  # step 2's update was not applied
    assert trainer.state.global_step == 1


def test_skip_nonfinite_steps_drops_the_update_counts_it_and_stops_after_n(tiny_sd, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path, max_steps=5, skip_nonfinite_steps=1)
    snapshots = _Snapshots(trainer)
    trainer.add_callback(snapshots)
    inject_nan_error(trainer, steps={2, 4}, call=1)  # the policy's errors
    with pytest.raises(NonFiniteError, match=r"optimizer step 4: .* 1 earlier ones were skipped"):
        trainer.train()
    _assert_equal_weights(snapshots.weights[1], snapshots.weights[2])  # step 2 skipped: no update (Adam included)
    assert any(not torch.equal(snapshots.weights[2][k], snapshots.weights[3][k]) for k in snapshots.weights[2])
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert [logs[step]["nonfinite/skipped_steps"] for step in (1, 2, 3)] == [0, 1, 1]
    assert logs[2]["loss"] != logs[2]["loss"]  # the skipped step's loss is logged as nan, not as a silent 0
    assert all(0 < logs[step]["loss"] < 10 for step in (1, 3))
    _assert_equal_weights(snapshots.weights[3], _trainable(trainer))  # step 4 stopped before its update


def test_grad_scaler_overflow_skips_are_not_counted_but_a_nan_loss_still_stops(tiny_sd, tmp_path):
    """fp16's `GradScaler` skips steps whose scaled gradients overflow, and lowers its scale: legitimate, not counted.

    CPU has no fp16 autocast, so the run is float32 with a real `torch.amp.GradScaler` in the accelerator (the one
    accelerate gives an fp16 run on a GPU), started at a scale that overflows the first step's gradients.
    """
    trainer = make_trainer("dpo", tiny_sd, tmp_path / "a", max_steps=3, optim="sgd", skip_nonfinite_steps=1)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120, backoff_factor=2.0**-100)
    skipped = []

    class _ScalerSkips(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            skipped.append(trainer.accelerator.optimizer_step_was_skipped)

    trainer.add_callback(_ScalerSkips())
    trainer.train()
    assert skipped[0] and not all(skipped)  # the scaler skipped step 1, then trained
    assert trainer.accelerator.scaler.get_scale() < 2.0**120
    assert trainer.state.log_history[-2]["nonfinite/skipped_steps"] == 0 and all_finite(_trainable(trainer))
    # A non-finite loss is not an overflow of the scaled gradients: the guard still stops it.
    trainer = make_trainer("dpo", tiny_sd, tmp_path / "b", max_steps=3, optim="sgd")
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    inject_nan_error(trainer, steps={2}, call=1)
    with pytest.raises(NonFiniteError, match="optimizer step 2: loss non-finite"):
        trainer.train()


def test_nonfinite_rows_maps_samples_to_dataset_rows():
    rows = [7, 3]
    assert nonfinite_rows(torch.tensor([False, False, False, True]), rows) == [3]  # [chosen ; rejected]
    assert nonfinite_rows(torch.tensor([True, False]), rows) == [7]  # one entry per pair
    assert nonfinite_rows(torch.tensor(True), rows) == [7, 3]  # a scalar: the whole micro-batch
    assert nonfinite_rows(torch.tensor(False), rows) == []


def test_skip_nonfinite_steps_is_validated(tmp_path):
    from trl_diffusion import DiffusionDPOConfig

    with pytest.raises(ValueError, match="skip_nonfinite_steps"):
        DiffusionDPOConfig(output_dir=str(tmp_path), skip_nonfinite_steps=-1)
