"""Training on top of an existing LoRA: the policy starts from it, and the reference is base + LoRA or the base."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers.rows import make_pickapic
from helpers.trainers import make_trainer, snapshot
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


@pytest.fixture(scope="module")
def user_lora(tiny_sd, tmp_path_factory) -> str:
    """A user's LoRA of the tiny UNet, random (not the identity), saved by diffusers' own `save_lora_weights`."""
    folder = str(tmp_path_factory.mktemp("user-lora"))
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    torch.manual_seed(3)
    config = LoraConfig(
        r=2, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    pipeline.unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_" in name:
                parameter.mul_(0.3)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipeline.unet))
    return folder


def _errors_of(trainer, network, step):
    with torch.no_grad():
        return trainer.denoising_errors(network, step)


def _step(trainer):
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    return trainer.prepare_step(batch)


def _pipeline_unet(tiny_sd, lora=None):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    if lora is not None:
        pipeline.load_lora_weights(lora)
    return pipeline.unet


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_reference_base_plus_adapter_is_the_pipeline_with_that_lora(method, tiny_sd, user_lora, tmp_path):
    trainer = make_trainer(method, tiny_sd, tmp_path, peft=False, adapter_name_or_path=user_lora, max_steps=2)
    assert trainer.is_peft and trainer.ref_model is None and trainer.reference_adapter == "reference"
    with_lora, base = _pipeline_unet(tiny_sd, user_lora), _pipeline_unet(tiny_sd)
    step = _step(trainer)
    expected = _errors_of(trainer, with_lora, step)
    assert not torch.allclose(expected, _errors_of(trainer, base, step))  # the LoRA changes the errors
    with trainer.reference_model(trainer.model) as reference:
        torch.testing.assert_close(_errors_of(trainer, reference, step), expected)
    # training starts from the user's LoRA: the policy computes what the LoRA pipeline computes
    torch.testing.assert_close(_errors_of(trainer, trainer.model, step), expected)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    trained = [k for k in before if ".default." in k]
    frozen = [k for k in before if ".default." not in k]  # the base and the "reference" adapter
    assert any(".reference." in k for k in frozen) and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    with trainer.reference_model(trainer.model) as reference:
        torch.testing.assert_close(_errors_of(trainer, reference, step), expected)
    assert not torch.allclose(_errors_of(trainer, trainer.model, step), expected)
    # only the policy's adapter trains, and it is what is saved; it loads into a real pipeline
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert optimized and all(".default." in names[i] for i in optimized)
    trainer.save_model()
    unet = _pipeline_unet(tiny_sd, str(tmp_path))
    torch.testing.assert_close(_errors_of(trainer, unet, step), _errors_of(trainer, trainer.model, step))


def test_reference_base_ignores_the_adapter(tiny_sd, user_lora, tmp_path):
    trainer = make_trainer("dpo", tiny_sd, tmp_path, peft=False, adapter_name_or_path=user_lora, reference="base")
    assert trainer.reference_adapter is None
    assert not any(".reference." in name for name, _ in trainer.model.named_parameters())
    step = _step(trainer)
    with trainer.reference_model(trainer.model) as reference:
        torch.testing.assert_close(
            _errors_of(trainer, reference, step), _errors_of(trainer, _pipeline_unet(tiny_sd), step)
        )
    policy = _errors_of(trainer, _pipeline_unet(tiny_sd, user_lora), step)
    torch.testing.assert_close(_errors_of(trainer, trainer.model, step), policy)


def test_no_reference_adapter_for_a_method_without_reference(tiny_sd, user_lora, tmp_path):
    trainer = make_trainer("mapo", tiny_sd, tmp_path, peft=False, adapter_name_or_path=user_lora)
    assert trainer.reference_adapter is None and list(trainer.model.peft_config) == ["default"]


def test_bad_reference_option_is_rejected(tiny_sd, user_lora, tmp_path):
    with pytest.raises(ValueError, match="reference must be"):
        make_trainer("dpo", tiny_sd, tmp_path, adapter_name_or_path=user_lora, reference="adapter")


def test_precomputed_reference_errors_are_those_of_base_plus_adapter(tiny_sd, user_lora, tmp_path):
    live = make_trainer("dpo", tiny_sd, tmp_path / "live", peft=False, adapter_name_or_path=user_lora)
    stored = make_trainer(
        "dpo",
        tiny_sd,
        tmp_path / "stored",
        peft=False,
        adapter_name_or_path=user_lora,
        precompute_ref_errors=True,
        dataset=make_pickapic(8),
    )
    batch = stored._prepare_inputs(stored.data_collator([stored.train_dataset[i] for i in range(2)]))
    step = live.prepare_step(batch, "train")
    live.state.global_step = 0
    with live.reference_model(live.model) as reference:
        expected = _errors_of(live, reference, step)
    torch.testing.assert_close(batch["ref_errors"].float(), expected)
