"""The collapse warnings of `CollapseWarningCallback`, on logs built from constructed errors."""

import logging

import pytest
import torch
from transformers import TrainerControl, TrainerState

from trl_diffusion.callbacks import CollapseWarningCallback
from trl_diffusion.losses import diffusion_dpo_loss, diffusion_kto_loss


def _logs(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """What the trainer logs: each metric averaged over its values, plus a training loss."""
    return {"loss": 0.1, **{key: values.float().mean().item() for key, values in metrics.items()}}


def _log(callback, logs, step=10):
    state = TrainerState()
    state.global_step = step
    callback.on_log(None, state, TrainerControl(), logs=logs)


def _collapse_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "trl_diffusion.callbacks"]


# Reference errors of four pairs, and a policy that ranks every pair right by raising every error, the chosen too
REF_CHOSEN = torch.tensor([0.20, 0.30, 0.25, 0.40])
REF_REJECTED = torch.tensor([0.22, 0.28, 0.26, 0.41])
HACKED_CHOSEN = REF_CHOSEN * 1.1
HACKED_REJECTED = REF_REJECTED * 1.6


def test_warns_once_when_the_chosen_reward_is_negative_while_accuracy_saturates(caplog):
    _, metrics = diffusion_dpo_loss(HACKED_CHOSEN, HACKED_REJECTED, REF_CHOSEN, REF_REJECTED, beta=100.0)
    assert metrics["rewards/accuracies"].mean() == 1.0 and metrics["rewards/chosen"].mean() < 0
    callback = CollapseWarningCallback(accuracy=0.95, error_ratio=None)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.callbacks"):
        _log(callback, _logs(metrics), step=10)
        _log(callback, _logs(metrics), step=20)
    messages = _collapse_messages(caplog)
    assert len(messages) == 1 and "Step 10" in messages[0] and "rewards/chosen" in messages[0]


def test_no_reward_warning_when_the_chosen_image_improves_or_accuracy_is_low(caplog):
    healthy_chosen = REF_CHOSEN * 0.9  # chosen reward > 0, accuracy 1
    _, healthy = diffusion_dpo_loss(healthy_chosen, HACKED_REJECTED, REF_CHOSEN, REF_REJECTED, beta=100.0)
    # the chosen reward is negative everywhere, but half the pairs are ranked wrong
    _, unsure = diffusion_dpo_loss(
        HACKED_CHOSEN, REF_REJECTED * torch.tensor([1.6, 1.0, 1.6, 1.0]), REF_CHOSEN, REF_REJECTED, beta=100.0
    )
    assert unsure["rewards/accuracies"].mean() == 0.5
    callback = CollapseWarningCallback(accuracy=0.95, error_ratio=None)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.callbacks"):
        _log(callback, _logs(healthy))
        _log(callback, _logs(unsure))
        _log(callback, {key: value for key, value in _logs(healthy).items() if key != "loss"})  # an eval-style log
    assert _collapse_messages(caplog) == []


@pytest.mark.parametrize(("factor", "warns"), [(1.05, True), (1.2, False)])
def test_warns_once_when_the_policy_chosen_error_exceeds_the_reference_by_the_factor(factor, warns, caplog):
    _, metrics = diffusion_dpo_loss(HACKED_CHOSEN, HACKED_REJECTED, REF_CHOSEN, REF_REJECTED, beta=100.0)
    callback = CollapseWarningCallback(accuracy=None, error_ratio=factor)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.callbacks"):
        for step in (10, 20, 30):
            _log(callback, _logs(metrics), step)
    messages = _collapse_messages(caplog)
    assert len(messages) == int(warns)
    if warns:
        assert "1.10 times the reference's" in messages[0]


def test_kto_logs_feed_the_same_warnings(caplog):
    errors = torch.cat([HACKED_CHOSEN, HACKED_REJECTED])
    references = torch.cat([REF_CHOSEN, REF_REJECTED])
    desirable = torch.tensor([True] * 4 + [False] * 4)
    _, metrics = diffusion_kto_loss(errors, references, desirable, beta=100.0)
    callback = CollapseWarningCallback(accuracy_metric="kto/accuracy", accuracy=0.5, error_ratio=1.05)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion.callbacks"):
        _log(callback, _logs(metrics))
    assert callback.warned == {"reward_hacking", "chosen_error"}
    assert len(_collapse_messages(caplog)) == 2
