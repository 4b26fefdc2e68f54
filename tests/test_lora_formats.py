"""LoRA files in the kohya key format: written by `save_model` and `trl-diffusion export-lora`, converted back
tensor by tensor, and loaded by diffusers' own kohya converter into pipelines that generate the same images."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.rows import make_pickapic
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer
from trl_diffusion.lora_formats import (
    KOHYA_WEIGHT_NAME,
    diffusers_to_kohya,
    export_kohya_lora,
    kohya_alpha,
    kohya_to_diffusers,
)
from trl_diffusion.scripts import cli
from trl_diffusion.trainer.base_trainer import LORA_WEIGHT_NAME


def save_random_lora(model, output_dir, peft_config, **overrides):
    """A trainer's LoRA with random, non-zero A and B, saved by `save_model` in both formats."""
    args = DiffusionDPOConfig(
        output_dir=str(output_dir), resolution=16, report_to="none", dataloader_num_workers=0,
        save_lora_format=["diffusers", "kohya"], **overrides,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(model=model, args=args, train_dataset=make_pickapic(2), peft_config=peft_config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    trainer.save_model()
    return trainer


def generate(pipeline, **kwargs) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    return pipeline("a red square", num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def assert_round_trip(trainer, output_dir):
    """Every tensor of the diffusers file comes back from the kohya file, and alpha / rank is peft's scaling."""
    denoiser, name = trainer.accelerator.unwrap_model(trainer.model), trainer.family.denoiser_name
    diffusers_tensors = load_file(output_dir / LORA_WEIGHT_NAME)
    kohya = load_file(output_dir / KOHYA_WEIGHT_NAME)
    prefix = {"unet": "lora_unet_", "transformer": "lora_transformer_"}[name]
    assert all(key.startswith(prefix) and "." in key for key in kohya)
    assert len(kohya) == 3 * len(diffusers_tensors) // 2  # down, up and alpha per module
    back, alphas = kohya_to_diffusers(kohya, [n for n, _ in denoiser.named_modules()], name)
    assert back.keys() == diffusers_tensors.keys()
    for key, value in diffusers_tensors.items():
        assert torch.equal(back[key], value), key
    scalings = {n: m.scaling["default"] for n, m in denoiser.named_modules() if isinstance(m, LoraLayer)}
    assert alphas.keys() == scalings.keys()
    for module, alpha in alphas.items():
        rank = diffusers_tensors[f"{name}.{module}.lora_A.weight"].shape[0]
        assert alpha / rank == pytest.approx(scalings[module], rel=1e-6), module
    return kohya


@pytest.mark.parametrize("model_fixture", ["tiny_sd", "tiny_sdxl", "tiny_flux"])
def test_kohya_file_loads_through_diffusers_and_generates_the_same_images(model_fixture, request, tmp_path):
    model = request.getfixturevalue(model_fixture)
    trainer = save_random_lora(model, tmp_path, LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"))
    assert_round_trip(trainer, tmp_path)
    assert KOHYA_WEIGHT_NAME in trainer.saved_model_files()
    pipeline = DiffusionPipeline.from_pretrained(model)
    base = generate(pipeline)
    pipeline.load_lora_weights(str(tmp_path), adapter_name="diffusers")  # the folder still loads the diffusers file
    expected = generate(pipeline)
    pipeline.delete_adapters("diffusers")
    pipeline.load_lora_weights(str(tmp_path), weight_name=KOHYA_WEIGHT_NAME, adapter_name="kohya")
    actual = generate(pipeline)
    assert np.abs(expected - base).max() > 1e-3  # the adapter changes the images
    np.testing.assert_allclose(actual, expected, atol=2e-5)


def test_rank_stabilised_and_per_module_alphas_and_sd3(tiny_sd3, tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=6, use_rslora=True, init_lora_weights="gaussian",
        rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3},
    )  # fmt: skip
    trainer = save_random_lora(tiny_sd3, tmp_path, config)
    kohya = assert_round_trip(trainer, tmp_path)
    key = next(k for k in kohya if k.endswith("attn_to_k.alpha"))
    assert kohya[key].item() == pytest.approx(6 / 2**0.5 * 2)  # rsLoRA: alpha / sqrt(r), times r = 2
    assert kohya_alpha("transformer_blocks.0.attn.to_v", {"r": 4, "lora_alpha": 6, "alpha_pattern": {"to_v": 3}}) == 3


def test_export_lora_command_writes_the_file_save_model_writes(tiny_sd, tmp_path):
    save_random_lora(tiny_sd, tmp_path / "run", LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian"))
    output = tmp_path / "comfy.safetensors"
    assert cli.main(["export-lora", str(tmp_path / "run"), "--output", str(output)]) == 0
    exported, saved = load_file(output), load_file(tmp_path / "run" / KOHYA_WEIGHT_NAME)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[key], saved[key]) for key in saved)


def test_unconvertible_files_fail_clearly(tiny_sd, tmp_path):
    state_dict = {"unet.a.lora_A.weight": torch.zeros(2, 3), "unet.a.lora_B.weight": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="DoRA"):
        diffusers_to_kohya(state_dict, {"r": 2, "lora_alpha": 2, "use_dora": True})
    with pytest.raises(ValueError, match="LoRA biases"):
        diffusers_to_kohya({"unet.a.lora_B.bias": torch.zeros(3)}, {"r": 2, "lora_alpha": 2})
    save_file(state_dict, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="no LoRA config in its metadata"):
        export_kohya_lora(str(tmp_path / "bare.safetensors"), str(tmp_path / "out.safetensors"))
    with pytest.raises(ValueError, match="names 0 modules"):
        kohya_to_diffusers({"lora_unet_nowhere.alpha": torch.tensor(1.0)}, ["a"], "unet")
    with pytest.raises(ValueError, match="save_lora_format"):
        DiffusionDPOConfig(output_dir=str(tmp_path), save_lora_format=["comfy"])
