"""The Wan text-to-video family: its formulas against `WanPipeline`, and every trainer training it with LoRA."""

import math
import os
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, WanPipeline
from helpers.runs import REPO, run, run_in_process
from helpers.trainers import check_lora_training, wan_args
from helpers.videos import make_video_pairs
from peft import LoraConfig
from PIL import Image

from trl_diffusion import METHODS, MaPOTrainer, PreferenceDataset
from trl_diffusion.models import WanFamily, get_family
from trl_diffusion.models.flow_matching import shift_sigmas
from trl_diffusion.testing.tiny_models import build_tiny_wan


def load_wan(path, tmp_path, **overrides) -> WanFamily:
    return get_family(DiffusionPipeline.from_pretrained(path), wan_args(tmp_path, **overrides))


def generate(pipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    output = pipeline(
        "a red square", num_frames=9, height=32, width=32, num_inference_steps=2, output_type="np", generator=generator
    )
    return output.frames


def test_registry_picks_the_wan_family(tiny_wan, tmp_path):
    family = load_wan(tiny_wan, tmp_path)
    assert type(family) is WanFamily and family.is_video
    assert family.denoiser_name == "transformer" and family.num_train_timesteps == 1000
    assert family.num_frames == 9 and family.frame_size == (32, 32)
    assert load_wan(tiny_wan, tmp_path, num_frames=None, video_size=[48, 80]).num_frames == 81
    assert load_wan(tiny_wan, tmp_path, video_size=[48, 80]).frame_size == (48, 80)


def test_wan_prompt_encoding_is_the_pipelines(tiny_wan, tmp_path):
    family = load_wan(tiny_wan, tmp_path)
    # HTML entities and runs of whitespace are cleaned as the pipeline cleans them; the long prompt is truncated
    prompts = ["a red square", "  a  red &amp; blue\n square ", "a much longer prompt than sixteen tokens", ""]
    with torch.no_grad():
        ours = family.encode_prompt(prompts)["encoder_hidden_states"]
        theirs, _ = family.pipeline.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu"
        )
    assert ours.shape == (4, 16, 32)
    assert torch.equal(ours, theirs)
    # Padding positions are exact zeros, the prompt's positions are not
    assert torch.all(ours[0, len("a red square") + 2 :] == 0) and ours[0, :3].abs().sum() > 0


def test_wan_latents_are_normalised_as_the_pipeline_decodes_them(tiny_wan, tmp_path):
    family = load_wan(tiny_wan, tmp_path)
    vae = family.pipeline.vae
    videos = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor([0.1, -0.2, 0.05, 0.3]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 2.0, 0.8, 1.2]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        latents = family.encode_images(videos)
        posterior_mode = vae.encode(videos).latent_dist.mode()
        torch.testing.assert_close(latents, (posterior_mode - mean) / std)
        assert latents.shape == (2, 4, 3, 4, 4)
        # `WanPipeline` decodes `latents / (1 / latents_std) + latents_mean`
        expected = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
        torch.testing.assert_close(family.decode_latents(latents), expected)


def test_wan_training_noise_levels_follow_the_schedulers_flow_shift(tiny_wan, tmp_path):
    family = load_wan(tiny_wan, tmp_path, weighting_scheme="uniform")
    assert family.shift == 3.0  # UniPC's `flow_shift`, not a `shift` key
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9999])
    sigma = (1 - u).clamp(min=1e-3)
    torch.testing.assert_close(family.timesteps_from_uniform(u), 1000 * 3 * sigma / (1 + 2 * sigma))
    # The inference schedule the pipeline runs is the same shift of the same sigma grid (its timesteps are the
    # sigmas times T, truncated to integers)
    scheduler = family.pipeline.scheduler
    scheduler.set_timesteps(10)
    expected = shift_sigmas(torch.linspace(1, 1e-3, 11, dtype=torch.float64)[:-1], 3.0)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected, atol=2e-6, rtol=0)
    assert torch.equal(scheduler.timesteps, (1000 * scheduler.sigmas[:-1].double()).long())


def test_wan_noisy_input_target_and_per_sample_errors_over_frames(tiny_wan, tmp_path):
    trainer = MaPOTrainer(tiny_wan, args=wan_args(tmp_path), train_dataset=make_video_pairs(2))
    family = trainer.family
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 4, 4, generator=generator), torch.randn(2, 4, 3, 4, 4, generator=generator)
    timesteps = torch.tensor([250.0, 800.0])
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1, 1)
    noisy = family.noisy_input(latents, noise, timesteps)
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(family.target(latents, noise, timesteps), noise - latents)
    with torch.no_grad():
        conditioning = family.encode_prompt(["a", "b"])
        prediction = family.predict(family.denoiser, noisy, timesteps, conditioning)
        step = trainer.prepare_step(next(iter(trainer.get_train_dataloader())))
        step.noisy_latents, step.timesteps, step.conditioning = noisy, timesteps, conditioning
        step.target, step.error_weights = family.target(latents, noise, timesteps), None
        errors = trainer.denoising_errors(family.denoiser, step)
    assert prediction.shape == latents.shape
    expected = (prediction - (noise - latents)).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(errors, expected)


def test_wan_expanded_timesteps_match_per_sample_timesteps(tiny_wan, tmp_path):
    """Wan 2.2 TI2V feeds one timestep per latent token; for text-to-video they are all equal."""
    family = load_wan(tiny_wan, tmp_path)
    latents, timesteps = torch.randn(2, 4, 3, 4, 4), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(["a", "b"])
        plain = family.predict(family.denoiser, latents, timesteps, conditioning)
        family.pipeline.register_to_config(expand_timesteps=True)
        expanded = family.predict(family.denoiser, latents, timesteps, conditioning)
    torch.testing.assert_close(expanded, plain, rtol=1e-5, atol=1e-5)


def test_wan_rejects_clips_it_cannot_encode(tiny_wan, tmp_path):
    with pytest.raises(ValueError, match=r"num_frames = 4·k \+ 1"):
        load_wan(tiny_wan, tmp_path, num_frames=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        load_wan(tiny_wan, tmp_path, video_size=[32, 40])


def test_wan_two_expert_pipelines_are_refused(tiny_wan, tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(tiny_wan)
    two_experts = WanPipeline(**pipeline.components | {"transformer_2": pipeline.transformer}, boundary_ratio=0.875)
    with pytest.raises(NotImplementedError, match="transformer_2"):
        get_family(two_experts, wan_args(tmp_path))


# ----- every trainer on Wan -----


# Video families take preference pairs: an unpaired method (Diffusion-KTO) is refused with a clear error (below)
PAIRWISE_METHODS = [name for name, (trainer, _) in METHODS.items() if trainer.dataset_class is PreferenceDataset]


@pytest.mark.parametrize("method", PAIRWISE_METHODS)
def test_wan_lora_training_saves_an_adapter_wan_pipeline_loads(tiny_wan, method, tmp_path):
    trainer_class, config_class = METHODS[method]
    trainer = trainer_class(
        tiny_wan,
        args=wan_args(tmp_path / "run", config_class),
        train_dataset=make_video_pairs(4),
        peft_config=LoraConfig(r=4, lora_alpha=4),
    )
    assert type(trainer.family) is WanFamily and trainer.family.denoiser_name == "transformer"
    adapter_keys, pipeline = check_lora_training(trainer, tiny_wan, generate)
    assert any(".attn1.to_q." in name for name in adapter_keys) and any(
        ".attn2.to_v." in name for name in adapter_keys
    )
    assert isinstance(pipeline, WanPipeline)


def test_wan_trains_in_bf16_from_decoded_videos(tiny_wan, tmp_path):
    """bf16 autocast, no encoding cache: videos are decoded and encoded by the VAE at every step."""
    args = wan_args(tmp_path, bf16=True, use_cpu=True, max_steps=1, precompute_encodings=False, random_flip=True)
    trainer = MaPOTrainer(tiny_wan, args=args, train_dataset=make_video_pairs(2), peft_config=LoraConfig(r=2))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_the_wan_tiny_yaml_trains_and_saves_an_adapter_wan_pipeline_loads(tmp_path, monkeypatch):
    """The training script on `examples/scripts/wan_dpo_tiny.yaml`, in this process (the CLI run below is slow)."""
    monkeypatch.setenv("TRL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    config = os.path.join(REPO, "examples", "scripts", "wan_dpo_tiny.yaml")
    dataset = os.path.join(REPO, "examples", "data", "video_pairs_tiny")
    args = ["--config", config, "--dataset_name", dataset, "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    trainer = run_in_process("dpo", args)
    assert type(trainer.family) is WanFamily and trainer.state.global_step == 2
    assert trainer.train_dataset_stats.num_ties == 1
    assert Image.open(tmp_path / "out" / "images" / "validation_0.png").size == (128, 32)
    pipeline = WanPipeline.from_pretrained(str(tmp_path / "cache" / "tiny-wan"))
    without_lora = generate(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(generate(pipeline) - without_lora).max() > 0


def test_the_real_wan_yaml_trains_the_tiny_model(tmp_path, monkeypatch):
    """`examples/scripts/wan_dpo.yaml` (Wan 2.1 1.3B, 480p, 81 frames) with the tiny model, data and clip size."""
    monkeypatch.setenv("TRL_DIFFUSION_CACHE", str(tmp_path / "cache"))
    args = ["--config", os.path.join(REPO, "examples", "scripts", "wan_dpo.yaml"), "--model_name_or_path", "tiny-wan"]
    args += ["--dataset_name", os.path.join(REPO, "examples", "data", "video_pairs_tiny"), "--video_size", "32", "32"]
    args += ["--num_frames", "9", "--max_steps", "2", "--gradient_accumulation_steps", "1", "--bf16", "false"]
    args += ["--dtype", "float32", "--dataloader_num_workers", "0", "--report_to", "none"]
    trainer = run_in_process("dpo", args + ["--output_dir", str(tmp_path / "out")])
    assert trainer.args.activation_checkpointing or trainer.args.gradient_checkpointing
    assert trainer.model.is_gradient_checkpointing and trainer.state.global_step == 2
    pipeline = WanPipeline.from_pretrained(str(tmp_path / "cache" / "tiny-wan"))
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert len(pipeline.get_list_adapters()["transformer"]) == 1


@pytest.mark.slow
def test_the_documented_wan_command_trains_and_saves_an_adapter(tmp_path):
    """`trl-diffusion dpo --config examples/scripts/wan_dpo_tiny.yaml`, from the repository root."""
    output = run(
        [sys.executable, "-m", "trl_diffusion.scripts.cli", "dpo", "--config", "examples/scripts/wan_dpo_tiny.yaml"]
        + ["--output_dir", str(tmp_path / "out"), "--max_steps", "2"],
        tmp_path / "cache",
    )
    assert "Training completed." in output and "Dropped 1 tied pairs" in output
    # The validation clip, as a strip of four 32 x 32 frames
    assert Image.open(tmp_path / "out" / "images" / "validation_0.png").size == (128, 32)
    pipeline = WanPipeline.from_pretrained(os.path.join(str(tmp_path / "cache"), "tiny-wan"))
    without_lora = generate(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(generate(pipeline) - without_lora).max() > 0
    assert os.path.isfile(os.path.join(REPO, "examples", "data", "video_pairs_tiny", "train.parquet"))


def test_wan_gradient_checkpointing_gives_the_same_sgd_step(tiny_wan, tmp_path):
    """Every real-size Wan run needs activation checkpointing (docs/supported_models.md); it must not change a step."""
    adapters = []
    for checkpointing in (False, True):
        args = wan_args(
            tmp_path / str(checkpointing),
            max_steps=1,
            optim="sgd",
            lr_scheduler_type="constant",
            learning_rate=1.0,
            activation_checkpointing=checkpointing,
        )
        trainer = MaPOTrainer(tiny_wan, args=args, train_dataset=make_video_pairs(2), peft_config=LoraConfig(r=2))
        trainer.train()
        assert trainer.model.is_gradient_checkpointing == checkpointing
        adapters.append({name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_wan22_ti2v_layout_trains_and_saves_an_adapter(tmp_path):
    """Wan 2.2 TI2V 5B's layout: a residual VAE that patchifies first (16x), one timestep per latent token."""
    path = build_tiny_wan(str(tmp_path / "ti2v"), ti2v=True)
    args = wan_args(tmp_path / "run", resolution=64, max_steps=1)
    trainer = MaPOTrainer(
        path, args=args, train_dataset=make_video_pairs(2, size=(64, 64)), peft_config=LoraConfig(r=2)
    )
    assert trainer.family.pipeline.config.expand_timesteps and trainer.family.pipeline.vae_scale_factor_spatial == 16
    assert trainer.train_dataset[0]["latents"].shape == (2, 4, 3, 4, 4)
    trainer.train()
    trainer.save_model()
    pipeline = WanPipeline.from_pretrained(path)
    shape = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np"}
    without_lora = pipeline("a", generator=torch.Generator().manual_seed(0), **shape).frames
    pipeline.load_lora_weights(str(tmp_path / "run"))
    with_lora = pipeline("a", generator=torch.Generator().manual_seed(0), **shape).frames
    assert np.abs(with_lora - without_lora).max() > 0


def test_an_unpaired_method_is_refused_on_video_with_a_clear_error(tiny_wan, tmp_path):
    trainer_class, config_class = METHODS["kto"]
    with pytest.raises(NotImplementedError, match="video families take preference pairs only"):
        trainer_class(tiny_wan, args=wan_args(tmp_path, config_class), train_dataset=make_video_pairs(2))
