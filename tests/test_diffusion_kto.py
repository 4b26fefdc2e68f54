"""Diffusion-KTO: the trainer on unpaired rows, with LoRA and full fine-tuning, and its loss on the model's errors."""

import math

import pytest
import torch
from helpers.rows import make_pickapic
from helpers.trainers import make_trainer, snapshot

from trl_diffusion import DiffusionKTOTrainer, UnpairedPreferenceDataset, unpair_preference_dataset
from trl_diffusion.losses import diffusion_kto_loss


def test_lora_trains_the_adapters_only_on_unpaired_rows(tiny_sd, tmp_path):
    rows = unpair_preference_dataset(make_pickapic(4))
    trainer = make_trainer("kto", tiny_sd, tmp_path, dataset=rows, per_device_train_batch_size=4)
    assert isinstance(trainer, DiffusionKTOTrainer) and trainer.ref_model is None
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    lora_keys = [k for k in before if "lora_" in k]
    base_keys = [k for k in before if "lora_" not in k]
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    assert any(not torch.equal(before[k], after[k]) for k in lora_keys)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(math.isfinite(log["loss"]) for log in logs)
    assert {"kl", "kto/accuracy", "rewards/chosen", "rewards/rejected", "mse/ref_chosen"} <= set(logs[0])


def test_full_finetune_trains_the_denoiser_against_a_frozen_copy(tiny_sd, tmp_path):
    trainer = make_trainer("kto", tiny_sd, tmp_path, peft=False, dataset=make_pickapic(4))
    initial, reference_before = snapshot(trainer.model), snapshot(trainer.ref_model)
    trainer.train()
    trained = snapshot(trainer.model)
    assert sum(not torch.equal(initial[k], trained[k]) for k in initial) > len(initial) // 2
    reference_after = snapshot(trainer.ref_model)
    assert all(torch.equal(reference_before[k], reference_after[k]) for k in reference_before)


def test_a_pairwise_dataset_is_unpaired_on_the_way_in(tiny_sd, tmp_path):
    trainer = make_trainer("kto", tiny_sd, tmp_path, dataset=make_pickapic(6), precompute_encodings=False)
    assert isinstance(trainer.train_dataset, UnpairedPreferenceDataset)
    assert len(trainer.train_dataset) == 12 and trainer.train_dataset.num_desirable == 6


@pytest.mark.parametrize("cached", [False, True])
def test_the_loss_is_the_formula_on_the_model_errors_with_one_noise_per_image(cached, tiny_sd, tmp_path):
    trainer = make_trainer("kto", tiny_sd, tmp_path, dataset=make_pickapic(4), precompute_encodings=cached)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    step = trainer.prepare_step(batch)
    assert step.group_size == 1 and step.noisy_latents.shape[0] == 4
    assert len(set(step.timesteps.tolist())) == 4  # every image has its own timestep (and noise)
    model = trainer.model
    with torch.no_grad():
        with trainer.reference_model(model) as reference:
            ref_errors = trainer.denoising_errors(reference, step)
        policy_errors = trainer.denoising_errors(model, step)
        expected, _ = diffusion_kto_loss(policy_errors, ref_errors, batch["desirable"], beta=trainer.args.beta)
        loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, expected)
    assert batch["desirable"].tolist() == [True, False, True, False]


def test_cached_and_uncached_training_agree(tiny_sd, tmp_path):
    losses = []
    for cached in (False, True):
        trainer = make_trainer(
            "kto", tiny_sd, tmp_path / str(cached), dataset=make_pickapic(4), precompute_encodings=cached, max_steps=1
        )
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_unbalanced_weights_are_warned_about(tiny_sd, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="trl_diffusion.trainer.diffusion_kto_trainer"):
        make_trainer("kto", tiny_sd, tmp_path, dataset=make_pickapic(2), desirable_weight=3.0)
    assert "outside [1, 4/3]" in caplog.text


def test_precomputed_reference_errors_match_the_live_reference(tiny_sd, tmp_path):
    live = make_trainer("kto", tiny_sd, tmp_path / "live", peft=False, dataset=make_pickapic(4))
    stored = make_trainer(
        "kto", tiny_sd, tmp_path / "stored", peft=False, dataset=make_pickapic(4), precompute_ref_errors=True
    )
    assert stored.ref_model is None  # released after its one pass
    batch = stored._prepare_inputs(stored.data_collator([stored.train_dataset[i] for i in range(4)]))
    assert batch["ref_errors"].shape == (4,)
    step = live.prepare_step(batch)
    with torch.no_grad(), live.reference_model(live.model) as reference:
        torch.testing.assert_close(batch["ref_errors"].float(), live.denoising_errors(reference, step))
    stored.train()
    assert all(math.isfinite(log["loss"]) for log in stored.state.log_history if "loss" in log)
