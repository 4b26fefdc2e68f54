"""The encoding cache (`trl_diffusion.encodings`, `trl_diffusion.trainer.encoding_cache`): cached steps equal
uncached ones, nothing is encoded twice, flips and caption dropout, bad rows; and precomputed reference errors."""

import math
import os

import pytest
import torch
from datasets import Dataset
from diffusers import AutoencoderKL
from helpers.rows import make_pickapic
from helpers.trainers import (
    Counter,
    collated_batch,
    float32_trainer,
    live_unets,
    loss_history,
    perturb_lora,
)
from transformers import TrainerCallback

from trl_diffusion import DiffusionDPOConfig
from trl_diffusion.data import PreferenceDataset
from trl_diffusion.encodings import EncodedPreferenceDataset
from trl_diffusion.noise import FIXED_NOISE_STEP, noise_step, pair_randomness
from trl_diffusion.trainer.base_trainer import DiffusionPreferenceTrainer


CPU = not torch.cuda.is_available()


# ----- the encoding cache -----


@pytest.mark.parametrize("model_fixture", ["tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_cached_step_equals_the_uncached_step(model_fixture, request, tmp_path):
    """Same pairs, same noise: the cached batch gives the uncached batch's inputs, errors and loss, including caption
    dropout (which substitutes the family's empty-prompt encoding)."""
    trainer = float32_trainer(request.getfixturevalue(model_fixture), tmp_path, proportion_empty_prompts=0.5)
    assert isinstance(trainer.train_dataset, EncodedPreferenceDataset)
    perturb_lora(trainer)
    indices = [0, 1, 2, 3, 4, 5]
    cached, uncached = collated_batch(trainer, indices), collated_batch(trainer, indices, cached=False)
    assert "pixel_values" not in cached and "latents" not in uncached
    step_cached, step_uncached = trainer.prepare_step(cached), trainer.prepare_step(uncached)
    torch.testing.assert_close(step_cached.noisy_latents, step_uncached.noisy_latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step_cached.target, step_uncached.target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step_cached.timesteps, step_uncached.timesteps)
    assert step_cached.conditioning.keys() == step_uncached.conditioning.keys()
    for key in step_cached.conditioning:
        torch.testing.assert_close(
            step_cached.conditioning[key], step_uncached.conditioning[key], rtol=1e-5, atol=1e-5
        )
    with torch.no_grad():
        loss_cached = trainer.compute_loss(trainer.model, cached)
        loss_uncached = trainer.compute_loss(trainer.model, uncached)
    # The encoders ran on other batches for the cache (float rounding ~1e-7), which beta = 2500 amplifies a little
    assert loss_cached.item() == pytest.approx(loss_uncached.item(), rel=1e-4)
    assert not math.isclose(loss_cached.item(), math.log(2), rel_tol=1e-4)  # the policy differs from the reference


def test_cached_training_gives_the_same_losses_as_uncached_training(tiny_sd, tmp_path):
    sgd = {"optim": "sgd", "lr_scheduler_type": "constant", "max_steps": 3}
    cached = float32_trainer(tiny_sd, tmp_path / "cached", **sgd)
    uncached = float32_trainer(tiny_sd, tmp_path / "uncached", precompute_encodings=False, **sgd)
    assert isinstance(cached.train_dataset, EncodedPreferenceDataset)
    assert isinstance(uncached.train_dataset, PreferenceDataset)
    cached.train()
    uncached.train()
    # Same pairs, noise and timesteps. The VAE's latents differ from the cached ones only in memory layout and
    # float rounding (~1e-7), which beta = 2500 amplifies a little. SGD, not Adam: Adam's first updates are ±lr for
    # any non-zero gradient entry, so that rounding could flip near-zero entries, depending on the CPU.
    assert loss_history(cached) == pytest.approx(loss_history(uncached), rel=2e-3)
    for key in ("mse/ref_chosen", "mse/ref_rejected"):
        ref_cached = [log[key] for log in cached.state.log_history if key in log]
        ref_uncached = [log[key] for log in uncached.state.log_history if key in log]
        assert ref_cached == pytest.approx(ref_uncached, rel=1e-5)


def test_second_trainer_on_the_same_data_encodes_nothing(tiny_sd, tmp_path, monkeypatch):
    from transformers import CLIPTextModel

    vae = Counter(monkeypatch, AutoencoderKL, "encode")
    text = Counter(monkeypatch, CLIPTextModel, "forward")
    first = float32_trainer(tiny_sd, tmp_path)
    assert vae.calls > 0 and text.calls > 0
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 1 and files[0].startswith("trl-diffusion-encodings-")
    vae.calls = text.calls = 0
    first.train()
    assert vae.calls == 0 and text.calls == 0  # training reads the cache
    second = float32_trainer(tiny_sd, tmp_path, output_dir=str(tmp_path / "second"), per_device_train_batch_size=4)
    second.train()
    assert vae.calls == 0 and text.calls == 0  # the second trainer loads the first one's cache
    assert sorted(os.listdir(tmp_path / "cache")) == files
    # Anything that changes the encodings changes the fingerprint: another resolution is encoded anew.
    float32_trainer(tiny_sd, tmp_path, output_dir=str(tmp_path / "third"), resolution=8)
    assert vae.calls > 0 and len(os.listdir(tmp_path / "cache")) == 2
    assert not os.path.exists(tmp_path / "out" / ".encodings_cache")  # output_dir holds only what save_model writes


def test_cache_with_random_flip_stores_both_flips_and_pairs_share_one(tiny_sd, tmp_path):
    trainer = float32_trainer(tiny_sd, tmp_path, random_flip=True)
    indices = list(range(8))
    cached = collated_batch(trainer, indices)
    assert "latents_flipped" in cached
    # 20x16 images resize to 20x16 and crop to 16x16 at offset 2 from either side: flipping commutes with the crop.
    source = trainer.train_dataset.source
    source.random_flip = False  # (the uncached dataset flips at random; these are the unflipped crops)
    pixels = torch.stack(
        [source[i]["chosen_pixel_values"] for i in indices] + [source[i]["rejected_pixel_values"] for i in indices]
    )
    torch.testing.assert_close(cached["latents"], trainer.encode_images(pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["latents_flipped"], trainer.encode_images(pixels.flip(-1)), rtol=1e-5, atol=1e-5)
    step = trainer.prepare_step(cached)
    seeded_step = noise_step("train", trainer.state.global_step)
    draws = pair_randomness(cached["row_index"], cached["latents"].shape[1:], seed=trainer.args.seed, step=seeded_step)
    flips = (draws.flip < 0.5).tolist()
    assert 0 < sum(flips) < len(flips)  # both choices occur among 8 pairs
    latents = step.noisy_latents  # with the same noise, pick the latents back out
    noise = draws.noise.repeat(2, 1, 1, 1)
    for half in (0, 1):  # chosen and rejected rows of each pair come from the same flip
        for pair, flip in enumerate(flips):
            row = half * len(indices) + pair
            expected = (cached["latents_flipped"] if flip else cached["latents"])[row : row + 1]
            rebuilt = trainer.family.noisy_input(expected, noise[row : row + 1], step.timesteps[row : row + 1])
            torch.testing.assert_close(latents[row : row + 1], rebuilt)


def test_caption_dropout_with_the_cache_substitutes_the_empty_prompt_encoding(tiny_sd, tmp_path, monkeypatch):
    trainer = float32_trainer(tiny_sd, tmp_path, proportion_empty_prompts=1.0, max_steps=1)
    with torch.no_grad():
        empty = trainer.family.encode_prompt([""])["encoder_hidden_states"]
    step = trainer.prepare_step(collated_batch(trainer, [0, 1, 2]))
    torch.testing.assert_close(step.conditioning["encoder_hidden_states"], empty.expand(6, -1, -1))
    calls = []
    monkeypatch.setattr(trainer.family, "encode_prompt", lambda prompts: calls.append(prompts))
    trainer.train()
    assert calls == []  # no text encoder during training, even with caption dropout


def test_precompute_encodings_rule_and_validation(tiny_sd, tmp_path):
    assert DiffusionDPOConfig(output_dir=str(tmp_path)).precompute_encodings is None
    trainer = float32_trainer(tiny_sd, tmp_path, random_crop=True)  # random crops stay on the per-step path
    assert isinstance(trainer.train_dataset, PreferenceDataset)
    with pytest.raises(ValueError, match="random_crop"):
        DiffusionDPOConfig(output_dir=str(tmp_path), random_crop=True, precompute_encodings=True)
    with pytest.raises(ValueError, match="precompute_ref_errors needs the encoding cache"):
        DiffusionDPOConfig(output_dir=str(tmp_path), precompute_encodings=False, precompute_ref_errors=True)


def test_cache_skips_unreadable_rows_and_counts_them(tiny_sd, tmp_path):
    data = make_pickapic(6).to_dict()
    data["jpg_0"][3] = b"not an image"
    trainer = float32_trainer(tiny_sd, tmp_path, dataset=Dataset.from_dict(data), skip_invalid_rows=True, max_steps=1)
    assert len(trainer.train_dataset) == 5
    trainer.train()
    assert trainer.state.log_history[0]["data/skipped_rows"] == 1


def test_cached_data_in_dataloader_workers(tiny_sd, tmp_path):
    trainer = float32_trainer(tiny_sd, tmp_path, dataloader_num_workers=1, max_steps=2)
    trainer.train()
    assert len(loss_history(trainer)) == 2


# ----- precomputed reference errors -----


def test_precomputed_reference_errors_equal_the_live_reference_and_free_it(tiny_sd, tmp_path, monkeypatch):
    before = live_unets()
    # SGD: the stored and live reference errors differ by rounding (~1e-7), which Adam could amplify to ±lr updates.
    sgd = {"optim": "sgd", "lr_scheduler_type": "constant", "max_steps": 3}
    precomputed = float32_trainer(tiny_sd, tmp_path / "pre", peft=False, precompute_ref_errors=True, **sgd)
    assert precomputed.ref_model is None and precomputed.train_dataset.has_ref_errors
    assert len(live_unets() - before) == 1  # the policy only: the reference copy was released after its one pass
    live = float32_trainer(tiny_sd, tmp_path / "live", peft=False, **sgd)
    assert live.ref_model is not None
    live.fixed_noise_step = FIXED_NOISE_STEP  # the same fixed noise
    indices = [0, 3, 5, 6]
    inputs = collated_batch(precomputed, indices)
    step = live.prepare_step(collated_batch(live, indices))
    with torch.no_grad():
        live_errors = live.denoising_errors(live.ref_model, step)
    torch.testing.assert_close(inputs["ref_errors"], live_errors, rtol=1e-5, atol=1e-7)

    class NoReference(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            assert precomputed.ref_model is None

    precomputed.add_callback(NoReference())
    forwards = []
    precomputed.model.register_forward_hook(lambda *_: forwards.append(1))
    precomputed.train()
    live.train()
    assert len(forwards) == 3  # one policy forward per step, no reference pass
    for key in ("mse/ref_chosen", "mse/ref_rejected", "mse/policy_chosen"):
        values = [[log[key] for log in t.state.log_history if key in log] for t in (precomputed, live)]
        assert values[0] == pytest.approx(values[1], rel=1e-5), key
    # A rerun loads the stored errors: no reference pass at all.
    errors = Counter(monkeypatch, DiffusionPreferenceTrainer, "denoising_errors")
    float32_trainer(
        tiny_sd, tmp_path / "pre", peft=False, precompute_ref_errors=True, output_dir=str(tmp_path / "again")
    )
    assert errors.calls == 0


def test_evaluation_data_is_cached_with_its_reference_errors(tiny_sd, tmp_path):
    precomputed = float32_trainer(
        tiny_sd, tmp_path / "pre", peft=False, precompute_ref_errors=True, eval_dataset=make_pickapic(4, seed=50)
    )
    assert isinstance(precomputed.eval_dataset, EncodedPreferenceDataset) and precomputed.eval_dataset.has_ref_errors
    live = float32_trainer(tiny_sd, tmp_path / "live", peft=False, eval_dataset=make_pickapic(4, seed=50))
    stored, computed = precomputed.evaluate(), live.evaluate()  # evaluation noise is fixed (step -1) in both
    for key in ("eval_loss", "eval_mse/ref_chosen", "eval_mse/ref_rejected"):
        assert stored[key] == pytest.approx(computed[key], rel=1e-5), key
    with pytest.raises(RuntimeError, match="No reference model"):
        precomputed.evaluate(make_pickapic(2))  # a new raw dataset would need the released reference


def test_precompute_ref_errors_needs_a_reference(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="no reference model"):
        float32_trainer(tiny_sd, tmp_path, method="mapo", precompute_ref_errors=True)
