"""SDXL, SD3, Flux, Flux.2, Qwen-Image and Z-Image families: their formulas on known tensors, and every trainer
training them with LoRA."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    FluxPipeline,
    QwenImagePipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.training_utils import compute_density_for_timestep_sampling
from helpers.rows import make_pickapic
from helpers.trainers import check_lora_training, make_args
from peft import LoraConfig

from trl_diffusion import (
    METHODS,
    MaPOConfig,
    MaPOTrainer,
)
from trl_diffusion.models import (
    Flux2Family,
    FluxFamily,
    QwenImageFamily,
    StableDiffusion3Family,
    StableDiffusionXLFamily,
    ZImageFamily,
    get_family,
)
from trl_diffusion.models.flow_matching import sigmas_from_uniform
from trl_diffusion.models.flux import latent_image_ids, pack_latents, unpack_latents
from trl_diffusion.models.flux2 import latent_ids as flux2_latent_ids
from trl_diffusion.models.flux2 import pack_latents as flux2_pack_latents
from trl_diffusion.models.flux2 import patchify_latents, text_ids
from trl_diffusion.models.flux2 import unpack_latents as flux2_unpack_latents
from trl_diffusion.models.resolution_shift import time_shift
from trl_diffusion.testing.tiny_models import build_tiny_flux


FAMILIES = {
    "tiny_sdxl": StableDiffusionXLFamily,
    "tiny_sd3": StableDiffusion3Family,
    "tiny_flux": FluxFamily,
    "tiny_flux2": Flux2Family,
    "tiny_flux2_klein": Flux2Family,
    "tiny_qwen_image": QwenImageFamily,
    "tiny_z_image": ZImageFamily,
}


def load_family(path: str, tmp_path, **overrides):
    return get_family(DiffusionPipeline.from_pretrained(path), make_args(tmp_path, **overrides))


def generate(pipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    output = pipeline(
        prompt="a red square", num_inference_steps=2, height=16, width=16, output_type="np", generator=generator
    )
    return output.images


# ----- the registry -----


@pytest.mark.parametrize("model_fixture", list(FAMILIES))
def test_registry_picks_the_family_of_the_pipeline(model_fixture, request, tmp_path):
    family = load_family(request.getfixturevalue(model_fixture), tmp_path)
    assert type(family) is FAMILIES[model_fixture]
    assert family.denoiser_name == ("unet" if model_fixture == "tiny_sdxl" else "transformer")


# ----- SDXL -----


def test_sdxl_prompt_conditioning_matches_the_pipeline(tiny_sdxl, tmp_path):
    family = load_family(tiny_sdxl, tmp_path)
    prompts = ["a red square", ""]
    with torch.no_grad():
        conditioning = family.encode_prompt(prompts)
        embeds, _, pooled, _ = family.pipeline.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert conditioning["encoder_hidden_states"].shape == (2, 16, 64)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditioning["text_embeds"], pooled, rtol=0, atol=0)


def test_sdxl_time_ids_per_image(tiny_sdxl, tmp_path):
    family = load_family(tiny_sdxl, tmp_path, resolution=16)
    # Two pairs: chosen images first, then rejected, as the collator stacks them
    inputs = {
        "original_sizes": torch.tensor([[20, 30], [16, 16], [40, 24], [18, 17]]),
        "crop_top_lefts": torch.tensor([[0, 7], [0, 0], [12, 0], [1, 0]]),
    }
    time_ids = family.image_conditioning(inputs)["time_ids"]
    assert time_ids.shape == (4, 6) and time_ids.dtype == torch.float32
    for row in range(4):
        original, crop = tuple(inputs["original_sizes"][row].tolist()), tuple(inputs["crop_top_lefts"][row].tolist())
        expected = family.pipeline._get_add_time_ids(original, crop, (16, 16), torch.float32, 32)
        torch.testing.assert_close(time_ids[row], expected[0])


def test_sdxl_time_ids_reach_the_unet(tiny_sdxl, tmp_path):
    family = load_family(tiny_sdxl, tmp_path)
    latents = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([500, 500])
    with torch.no_grad():
        conditioning = family.encode_prompt(["a", "a"])
        conditioning["time_ids"] = torch.tensor([[16.0, 16, 0, 0, 16, 16], [64.0, 16, 24, 0, 16, 16]])
        prediction = family.predict(family.denoiser, latents, timesteps, conditioning)
    assert prediction.shape == latents.shape
    assert not torch.allclose(prediction[0], prediction[1])


def test_sdxl_noisy_input_and_target_follow_ddpm(tiny_sdxl, tmp_path):
    family = load_family(tiny_sdxl, tmp_path)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    alphas = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        family.noisy_input(latents, noise, timesteps), alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    )
    torch.testing.assert_close(family.target(latents, noise, timesteps), noise)
    assert family.error_weights(timesteps) is None


def test_sdxl_vae_runs_in_float32_unless_told_otherwise(tiny_sdxl, tmp_path):
    family = load_family(tiny_sdxl, tmp_path)
    assert family.frozen_module_dtype("vae", torch.bfloat16) == torch.float32
    assert family.frozen_module_dtype("text_encoder_2", torch.bfloat16) == torch.bfloat16
    family = load_family(tiny_sdxl, tmp_path, upcast_vae=False)
    assert family.frozen_module_dtype("vae", torch.float16) == torch.float16


def test_sdxl_pretrained_vae_replaces_the_pipeline_vae(tiny_sdxl, tmp_path):
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "fp16-fix-vae")
    family = load_family(tiny_sdxl, tmp_path, pretrained_vae_model_name_or_path=str(tmp_path / "fp16-fix-vae"))
    assert family.pipeline.vae.config.scaling_factor == 0.5
    # A VAE made for half precision runs in the compute dtype, unless upcast_vae says otherwise
    assert family.frozen_module_dtype("vae", torch.float16) == torch.float16
    family = load_family(
        tiny_sdxl, tmp_path, pretrained_vae_model_name_or_path=str(tmp_path / "fp16-fix-vae"), upcast_vae=True
    )
    assert family.frozen_module_dtype("vae", torch.float16) == torch.float32


def test_sdxl_bf16_training_keeps_the_vae_in_float32(tiny_sdxl, tmp_path):
    args = make_args(tmp_path, MaPOConfig, bf16=True, use_cpu=True, max_steps=1, per_device_train_batch_size=1)
    trainer = MaPOTrainer(tiny_sdxl, args=args, train_dataset=make_pickapic(2), peft_config=LoraConfig(r=2))
    pipeline = trainer.family.pipeline
    assert pipeline.vae.dtype == torch.float32
    assert pipeline.text_encoder.dtype == pipeline.text_encoder_2.dtype == torch.bfloat16
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# ----- flow matching: SD3 and Flux -----


@pytest.mark.parametrize("model_fixture", ["tiny_sd3", "tiny_flux"])
def test_flow_noisy_input_and_velocity_target(model_fixture, request, tmp_path):
    family = load_family(request.getfixturevalue(model_fixture), tmp_path)
    latents = torch.tensor([1.0, -2.0, 0.5, 4.0]).view(4, 1, 1, 1).expand(4, 4, 8, 8)
    noise = torch.tensor([0.0, 1.0, -1.0, 2.0]).view(4, 1, 1, 1).expand(4, 4, 8, 8)
    timesteps = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    # sigma = 0, 0.25, 0.5, 1: x_t = (1 - sigma) x_0 + sigma eps, v = eps - x_0
    expected_noisy = torch.tensor([1.0, -1.25, -0.25, 2.0]).view(4, 1, 1, 1).expand(4, 4, 8, 8)
    expected_target = torch.tensor([-1.0, 3.0, -1.5, -2.0]).view(4, 1, 1, 1).expand(4, 4, 8, 8)
    torch.testing.assert_close(family.noisy_input(latents, noise, timesteps), expected_noisy)
    torch.testing.assert_close(family.target(latents, noise, timesteps), expected_target)
    assert family.num_train_timesteps == 1000


def test_flow_timesteps_uniform_apply_the_static_shift_only(tiny_sd3, tiny_flux, tmp_path):
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9999])
    sigma = (1 - u).clamp(min=1e-3)
    # SD3's scheduler has a static shift of 3; Flux's shifts dynamically at inference only
    sd3 = load_family(tiny_sd3, tmp_path, weighting_scheme="uniform")
    torch.testing.assert_close(sd3.timesteps_from_uniform(u), 1000 * 3 * sigma / (1 + 2 * sigma))
    flux = load_family(tiny_flux, tmp_path, weighting_scheme="uniform")
    torch.testing.assert_close(flux.timesteps_from_uniform(u), 1000 * sigma)


def test_flow_timesteps_logit_normal_and_mode_are_inverse_cdfs(tiny_flux, tmp_path):
    u = (torch.arange(2000) + 0.5) / 2000
    family = load_family(tiny_flux, tmp_path, weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8)
    sigmas = family.timesteps_from_uniform(u) / 1000
    torch.testing.assert_close(sigmas, torch.sigmoid(0.5 + 0.8 * torch.special.ndtri(1 - u)))
    torch.testing.assert_close(family.timesteps_from_uniform(u), family.timesteps_from_uniform(u.clone()))
    assert torch.all(sigmas[1:] <= sigmas[:-1])
    logits = torch.logit(sigmas.double())
    assert abs(logits.mean() - 0.5) < 1e-3 and abs(logits.std() - 0.8) < 2e-2
    family = load_family(tiny_flux, tmp_path, weighting_scheme="mode", mode_scale=1.29)
    sigmas = family.timesteps_from_uniform(u) / 1000
    # Clamped to the examples' grid range [1/T, 1]
    expected = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    torch.testing.assert_close(sigmas, expected.clamp(min=1e-3))
    # The mode with scale 0 is the uniform density
    torch.testing.assert_close(sigmas_from_uniform(u, "mode", mode_scale=0.0), sigmas_from_uniform(u, "uniform"))


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
def test_flow_densities_match_the_diffusers_examples(scheme):
    """Quantiles of our deterministic maps against random draws of the diffusers examples' sampler."""
    u = (torch.arange(4000) + 0.5) / 4000
    ours = sigmas_from_uniform(u, scheme, 0.0, 1.0, 1.29).sort().values
    draws = compute_density_for_timestep_sampling(
        scheme, 4000, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=torch.Generator().manual_seed(0)
    )
    # The examples index the descending `scheduler.timesteps` with the draw: their sigma is 1 - draw
    theirs = (1 - draws).sort().values
    assert (ours - theirs).abs().max() < 0.03


def test_flow_error_weights(tiny_sd3, tmp_path):
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    sigmas = timesteps / 1000
    assert load_family(tiny_sd3, tmp_path).error_weights(timesteps) is None
    family = load_family(tiny_sd3, tmp_path, flow_loss_weighting="sigma_sqrt")
    torch.testing.assert_close(family.error_weights(timesteps), sigmas**-2)
    family = load_family(tiny_sd3, tmp_path, flow_loss_weighting="cosmap")
    torch.testing.assert_close(family.error_weights(timesteps), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    family = load_family(tiny_sd3, tmp_path, epsilon_equivalent_errors=True)
    torch.testing.assert_close(family.error_weights(timesteps), (1 - sigmas) ** 2)
    family = load_family(tiny_sd3, tmp_path, flow_loss_weighting="sigma_sqrt", epsilon_equivalent_errors=True)
    torch.testing.assert_close(family.error_weights(timesteps), (1 - sigmas) ** 2 / sigmas**2)


def test_epsilon_equivalent_weight_is_the_error_of_the_implied_noise(tiny_flux, tmp_path):
    family = load_family(tiny_flux, tmp_path, epsilon_equivalent_errors=True)
    generator = torch.Generator().manual_seed(0)
    latents, noise, velocity = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    timesteps = torch.tensor([50.0, 400.0, 850.0])
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
    noisy = family.noisy_input(latents, noise, timesteps)
    # A velocity prediction v̂ implies the noise prediction ε̂ = x_t + (1 − σ) v̂
    implied_noise = noisy + (1 - sigmas) * velocity
    velocity_errors = (velocity - family.target(latents, noise, timesteps)).pow(2).flatten(1).mean(1)
    noise_errors = (implied_noise - noise).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(velocity_errors * family.error_weights(timesteps), noise_errors)


def test_flow_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="flow_loss_weighting='sigma_sqrt' with weighting_scheme='uniform'"):
        make_args(tmp_path, weighting_scheme="sigma_sqrt")
    with pytest.raises(ValueError, match="flow_loss_weighting"):
        make_args(tmp_path, flow_loss_weighting="uniform")
    with pytest.raises(ValueError, match="mode_scale"):
        make_args(tmp_path, mode_scale=2.0)


@pytest.mark.parametrize("without_t5", [False, True])
def test_sd3_prompt_conditioning_matches_the_pipeline(tiny_sd3, tmp_path, without_t5):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd3, **({"text_encoder_3": None} if without_t5 else {}))
    family = get_family(pipeline, make_args(tmp_path))
    prompts = ["a red square", "a much longer prompt than sixteen tokens"]
    with torch.no_grad():
        conditioning = family.encode_prompt(prompts)
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
    # 16 CLIP tokens then 16 T5 tokens, 64 wide; both CLIP encoders' pooled outputs
    assert conditioning["encoder_hidden_states"].shape == (2, 32, 64)
    assert conditioning["pooled_projections"].shape == (2, 64)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditioning["pooled_projections"], pooled, rtol=0, atol=0)


def test_flux_prompt_conditioning_matches_the_pipeline(tiny_flux, tmp_path):
    family = load_family(tiny_flux, tmp_path)
    prompts = ["a red square", ""]
    with torch.no_grad():
        conditioning = family.encode_prompt(prompts)
        embeds, pooled, _ = family.pipeline.encode_prompt(prompts, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditioning["pooled_projections"], pooled, rtol=0, atol=0)


def test_flux_packing_round_trip_and_layout():
    latents = torch.randn(3, 4, 8, 6)
    packed = pack_latents(latents)
    assert packed.shape == (3, 12, 16)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 3, 4, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), latents, rtol=0, atol=0)
    # The pipeline's unpacking takes pixel sizes and its VAE scale factor
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 16, 12, 2), latents, rtol=0, atol=0)
    expected_ids = FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(8, 6, "cpu", torch.float32), expected_ids, rtol=0, atol=0)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_guidance_embedding_is_fed_where_the_transformer_has_one(tiny_flux, guidance_embeds, tmp_path):
    path = tiny_flux if guidance_embeds else build_tiny_flux(str(tmp_path / "schnell"), guidance_embeds=False)
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0])
    predictions = []
    for guidance_scale in (1.0, 3.5):
        family = load_family(path, tmp_path, guidance_scale=guidance_scale)
        with torch.no_grad():
            conditioning = family.encode_prompt(["a", "b"])
            predictions.append(family.predict(family.denoiser, latents, timesteps, conditioning))
    assert predictions[0].shape == latents.shape
    assert torch.allclose(predictions[0], predictions[1]) is not guidance_embeds


@pytest.mark.parametrize(("model_fixture", "resolution"), [("tiny_flux", 18), ("tiny_sd3", 14)])
def test_flow_families_reject_resolutions_they_cannot_patch(model_fixture, resolution, request, tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        load_family(request.getfixturevalue(model_fixture), tmp_path, resolution=resolution)


# ----- every trainer on every family -----


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_fixture", list(FAMILIES))
def test_lora_training_saves_an_adapter_the_pipeline_loads(model_fixture, method, request, tmp_path):
    path = request.getfixturevalue(model_fixture)
    trainer_class, config_class = METHODS[method]
    trainer = trainer_class(
        path,
        args=make_args(tmp_path / "run", config_class),
        train_dataset=make_pickapic(4),
        peft_config=LoraConfig(r=4, lora_alpha=4),
    )
    assert type(trainer.family) is FAMILIES[model_fixture]
    check_lora_training(trainer, path, generate)


@pytest.mark.parametrize(
    "model_fixture", ["tiny_sd3", "tiny_flux", "tiny_flux2", "tiny_flux2_klein", "tiny_qwen_image", "tiny_z_image"]
)
def test_flow_families_train_in_bf16(model_fixture, request, tmp_path):
    args = make_args(tmp_path, MaPOConfig, bf16=True, use_cpu=True, max_steps=1, epsilon_equivalent_errors=True)
    trainer = MaPOTrainer(
        request.getfixturevalue(model_fixture), args=args, train_dataset=make_pickapic(2), peft_config=LoraConfig(r=2)
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# ----- Flux.2 and Flux.2 [klein] -----


@pytest.mark.parametrize("model_fixture", ["tiny_flux2", "tiny_flux2_klein"])
def test_flux2_prompt_conditioning_matches_the_pipeline(model_fixture, request, tmp_path):
    family = load_family(request.getfixturevalue(model_fixture), tmp_path)
    prompts = ["a red square", "", "a much longer prompt than the others"]
    with torch.no_grad():
        conditioning = family.encode_prompt(prompts)
        embeds, ids = family.pipeline.encode_prompt(prompts, device="cpu", max_sequence_length=256)
    # Three text-encoder layers stacked on the feature axis (3 x 16), 256 tokens: the tiny tokenizer's limit
    assert conditioning["encoder_hidden_states"].shape == (3, 256, 48)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(text_ids(256, "cpu"), ids[0], rtol=0, atol=0)


def test_flux2_latents_match_the_pipeline(tiny_flux2, tmp_path):
    family = load_family(tiny_flux2, tmp_path)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(pixels)
        expected = family.pipeline._encode_vae_image(pixels, generator=None)
    # 4 VAE channels in 2x2 patches, normalised by the VAE's (non-trivial) batch-norm statistics
    assert latents.shape == (2, 16, 4, 4)
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    vae_latents = family.pipeline.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(patchify_latents(vae_latents), Flux2Pipeline._patchify_latents(vae_latents))
    packed = flux2_pack_latents(latents)
    torch.testing.assert_close(packed, Flux2Pipeline._pack_latents(latents), rtol=0, atol=0)
    torch.testing.assert_close(flux2_unpack_latents(packed, 4, 4), latents, rtol=0, atol=0)
    torch.testing.assert_close(flux2_latent_ids(4, 4, "cpu"), Flux2Pipeline._prepare_latent_ids(latents)[0])


@pytest.mark.parametrize(("model_fixture", "guidance_embeds"), [("tiny_flux2", True), ("tiny_flux2_klein", False)])
def test_flux2_guidance_embedding_is_fed_to_dev_only(model_fixture, guidance_embeds, request, tmp_path):
    latents, timesteps = torch.randn(2, 16, 4, 4), torch.tensor([300.0, 700.0])
    predictions = []
    for guidance_scale in (1.0, 4.0):
        family = load_family(request.getfixturevalue(model_fixture), tmp_path, guidance_scale=guidance_scale)
        assert family.denoiser.config.guidance_embeds is guidance_embeds
        with torch.no_grad():
            predictions.append(family.predict(family.denoiser, latents, timesteps, family.encode_prompt(["a", "b"])))
    assert predictions[0].shape == latents.shape
    assert torch.allclose(predictions[0], predictions[1]) is not guidance_embeds


# ----- the resolution-dependent shift of the noise levels -----


def scheduler_sigmas(pipeline, sigmas: torch.Tensor, mu: float | None) -> torch.Tensor:
    """The pipeline scheduler's own shift of ``sigmas`` (its ``set_timesteps`` with custom sigmas and ``mu``),
    without Qwen-Image's ``shift_terminal``, a stretch of the sampling grid that training does not apply."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config, shift_terminal=None)
    scheduler.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    return scheduler.sigmas[:-1].float()


@pytest.mark.parametrize(
    ("model_fixture", "resolution", "mu"),
    [
        # Flux.2: the empirical mu of the image tokens (here 4 x 4 and 16 x 16) at 50 sampling steps
        ("tiny_flux2", 16, compute_empirical_mu(16, 50)),
        ("tiny_flux2_klein", 64, compute_empirical_mu(256, 50)),
        # Qwen-Image: base_shift = max_shift = ln 3, whatever the resolution
        ("tiny_qwen_image", 32, math.log(3)),
        # Z-Image: a static shift of 3, no mu
        ("tiny_z_image", 16, None),
    ],
)
def test_training_noise_levels_are_the_schedulers_shifted_levels(model_fixture, resolution, mu, request, tmp_path):
    path = request.getfixturevalue(model_fixture)
    family = load_family(path, tmp_path, weighting_scheme="uniform", resolution=resolution)
    u = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
    expected = scheduler_sigmas(family.pipeline, 1 - u, mu)
    torch.testing.assert_close(family.timesteps_from_uniform(u) / 1000, expected)
    if mu is not None:
        assert family.resolution_shift
        unshifted = load_family(path, tmp_path, weighting_scheme="uniform", resolution_shift=False)
        torch.testing.assert_close(unshifted.timesteps_from_uniform(u) / 1000, 1 - u)


def test_flux1_shifts_by_resolution_only_when_asked(tiny_flux, tmp_path):
    u = torch.tensor([0.1, 0.5, 0.9])
    assert not load_family(tiny_flux, tmp_path).resolution_shift
    family = load_family(tiny_flux, tmp_path, weighting_scheme="uniform", resolution=32, resolution_shift=True)
    # FluxPipeline's mu for 8 x 8 = 64 image tokens
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    torch.testing.assert_close(family.timesteps_from_uniform(u) / 1000, scheduler_sigmas(family.pipeline, 1 - u, mu))


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_time_shift_is_the_schedulers(shift_type):
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=shift_type)
    sigmas = torch.tensor([0.001, 0.2, 0.5, 0.8, 1.0])
    torch.testing.assert_close(time_shift(sigmas, 0.8, shift_type), scheduler.time_shift(0.8, 1.0, sigmas))


@pytest.mark.parametrize("model_fixture", ["tiny_z_image", "tiny_sd3"])
def test_resolution_shift_is_refused_for_a_static_shift(model_fixture, request, tmp_path):
    with pytest.raises(ValueError, match="static shift"):
        load_family(request.getfixturevalue(model_fixture), tmp_path, resolution_shift=True)


# ----- Qwen-Image -----


def test_qwen_image_prompt_conditioning_matches_the_pipeline(tiny_qwen_image, tmp_path):
    family = load_family(tiny_qwen_image, tmp_path)
    prompts = ["a red square", "", "a much longer prompt than the others"]
    with torch.no_grad():
        conditioning = family.encode_prompt(prompts)
        embeds, mask = family.pipeline.encode_prompt(prompts, device="cpu", max_sequence_length=256)
    # The pipeline pads to the longest prompt; the family to max_sequence_length, with zeros and a mask
    length = embeds.shape[1]
    assert conditioning["encoder_hidden_states"].shape == (3, 256, 16) and length < 256
    torch.testing.assert_close(conditioning["encoder_hidden_states"][:, :length], embeds, rtol=0, atol=0)
    assert not conditioning["encoder_hidden_states"][:, length:].any()
    torch.testing.assert_close(conditioning["encoder_hidden_states_mask"][:, :length], mask, rtol=0, atol=0)
    assert not conditioning["encoder_hidden_states_mask"][:, length:].any()


def test_qwen_image_padding_is_masked_out(tiny_qwen_image, tmp_path):
    """The same prompts padded to 200 or 256 tokens give the same prediction."""
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0])
    predictions = []
    for length in (200, 256):
        family = load_family(tiny_qwen_image, tmp_path, max_sequence_length=length)
        with torch.no_grad():
            conditioning = family.encode_prompt(["a red square", "blue"])
            predictions.append(family.predict(family.denoiser, latents, timesteps, conditioning))
    torch.testing.assert_close(predictions[0], predictions[1], rtol=1e-5, atol=1e-6)


def test_qwen_image_latents_and_packing(tiny_qwen_image, tmp_path):
    family = load_family(tiny_qwen_image, tmp_path)
    vae = family.pipeline.vae
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(pixels)
        posterior = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    assert latents.shape == (2, 4, 8, 8)
    # The pipeline decodes z * latents_std + latents_mean
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    torch.testing.assert_close(latents * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1), posterior[:, :, 0])
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, QwenImagePipeline._pack_latents(latents, 2, 4, 8, 8), rtol=0, atol=0)
    unpacked = QwenImagePipeline._unpack_latents(packed, 16, 16, family.pipeline.vae_scale_factor)
    torch.testing.assert_close(unpacked[:, :, 0], latents, rtol=0, atol=0)


# ----- Z-Image -----


def test_z_image_prompt_conditioning_matches_the_pipeline(tiny_z_image, tmp_path):
    family = load_family(tiny_z_image, tmp_path)
    prompts = ["a red square", "", "a much longer prompt than the others"]
    with torch.no_grad():
        conditioning = family.encode_prompt(prompts)
        embeds, _ = family.pipeline.encode_prompt(
            list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=256
        )
    assert conditioning["prompt_embeds"].shape == (3, 256, 16)
    for row, expected in enumerate(embeds):
        mask = conditioning["prompt_mask"][row].bool()
        torch.testing.assert_close(conditioning["prompt_embeds"][row][mask], expected, rtol=0, atol=0)
        assert not conditioning["prompt_embeds"][row][~mask].any()


def test_z_image_predicts_the_velocity_from_the_transformers_conventions(tiny_z_image, tmp_path):
    """The transformer takes ``1 − σ`` and predicts ``x_0 − ε``; the family returns the velocity ``ε − x_0``."""
    family = load_family(tiny_z_image, tmp_path)
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 800.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(["a red square", "blue"])
        prediction = family.predict(family.denoiser, latents, timesteps, conditioning)
        embeds, _ = family.pipeline.encode_prompt(
            ["a red square", "blue"], device="cpu", do_classifier_free_guidance=False, max_sequence_length=256
        )
        # As ZImagePipeline calls it: one-frame latents, time (1000 − t) / 1000, the unpadded prompt rows
        output = family.denoiser(list(latents.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, embeds)[0]
    torch.testing.assert_close(prediction, -torch.stack(output).squeeze(2), rtol=0, atol=0)
