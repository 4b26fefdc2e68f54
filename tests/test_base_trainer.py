"""The base trainer's fast-step options (`trl_diffusion.trainer.base_trainer`): bf16 autocast, SDPA attention,
channels-last, torch.compile, gradient checkpointing and accumulation, no host sync in a step."""

import math

import pytest
import torch
from helpers.trainers import (
    Counter,
    collated_batch,
    float32_trainer,
    loss_history,
    perturb_lora,
)
from transformers import TrainerCallback


CPU = not torch.cuda.is_available()


class GradientRecorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.grads = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.trainer.model.named_parameters() if p.grad is not None})


# ----- the fast step -----


def test_bf16_autocast_keeps_trainable_weights_in_float32(tiny_sd, tmp_path):
    lora = float32_trainer(tiny_sd, tmp_path / "lora", bf16=True, use_cpu=True, max_steps=1)
    assert lora.accelerator.mixed_precision == "bf16"
    trainable = [p for p in lora.model.parameters() if p.requires_grad]
    frozen = [p for p in lora.model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    lora.train()
    # Full fine-tuning: the float32 policy and a bf16 frozen reference, which runs under the same autocast.
    full = float32_trainer(tiny_sd, tmp_path / "full", peft=False, bf16=True, use_cpu=True, max_steps=1)
    assert all(p.dtype == torch.float32 for p in full.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in full.ref_model.parameters())
    full.train()
    assert math.isfinite(full.state.log_history[0]["loss"])


@pytest.mark.parametrize("model_fixture", ["tiny_sd", "tiny_flux"])
def test_attention_runs_through_sdpa(model_fixture, request, tmp_path, monkeypatch):
    trainer = float32_trainer(request.getfixturevalue(model_fixture), tmp_path)
    sdpa = Counter(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
    with torch.no_grad():
        trainer.compute_loss(trainer.model, collated_batch(trainer, [0, 1]))
    assert sdpa.calls > 0


def test_channels_last_option(tiny_sd, tmp_path):
    trainer = float32_trainer(tiny_sd, tmp_path, channels_last=True, max_steps=1)
    weight = trainer.model.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    inputs = collated_batch(trainer, [0, 1])
    step = trainer.prepare_step(inputs)
    assert step.noisy_latents.is_contiguous(memory_format=torch.channels_last)
    reference = float32_trainer(tiny_sd, tmp_path / "plain", max_steps=1)
    with torch.no_grad():
        errors = trainer.denoising_errors(trainer.model, step)
        plain = reference.denoising_errors(reference.model, reference.prepare_step(collated_batch(reference, [0, 1])))
    torch.testing.assert_close(errors, plain, rtol=1e-4, atol=1e-6)
    trainer.train()


def test_torch_compile_does_not_recompile_when_adapters_toggle(tiny_sd, tmp_path):
    """The reference pass (adapters off, no grad) and the policy pass are two cached graphs of one compiled module.

    The "eager" backend runs dynamo's capture and guards (which decide recompilation) without inductor's code
    generation, which takes minutes on a CPU; see docs/performance.md for inductor's cost.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = float32_trainer(tiny_sd, tmp_path, torch_compile=True, torch_compile_backend="eager", max_steps=4)
    graphs = []

    class Graphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            graphs.append(counters["stats"]["unique_graphs"])

    trainer.add_callback(Graphs())
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert graphs == [2, 2, 2, 2]  # reference and policy, compiled once at the first step
    assert not counters["recompiles"]
    # Full fine-tuning: the frozen reference copy is compiled too.
    torch._dynamo.reset()
    counters.clear()
    full = float32_trainer(
        tiny_sd, tmp_path / "full", peft=False, torch_compile=True, torch_compile_backend="eager", max_steps=2
    )
    assert type(full.ref_model).__name__ == "OptimizedModule"
    full.train()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]
    torch._dynamo.reset()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd, tmp_path):
    recorded = []
    for checkpointing in (False, True):
        trainer = float32_trainer(tiny_sd, tmp_path / str(checkpointing), activation_checkpointing=checkpointing)
        recorder = GradientRecorder(trainer)
        trainer.add_callback(recorder)
        trainer.train()
        assert trainer.model.is_gradient_checkpointing == checkpointing
        recorded.append((recorder.grads, loss_history(trainer)))
    (plain, plain_losses), (checkpointed, checkpointed_losses) = recorded
    assert plain_losses == pytest.approx(checkpointed_losses, rel=1e-6)
    for before, after in zip(plain, checkpointed, strict=True):
        assert before.keys() == after.keys() and before
        for name in before:
            torch.testing.assert_close(before[name], after[name], rtol=1e-5, atol=1e-8)


def test_gradient_accumulation_on_the_cached_path(tiny_sd, tmp_path):
    """Batch 4 and batch 2 x accumulation 2 give the same first gradient (the cache removes encoder noise)."""
    grads = []
    for size, accumulation in ((4, 1), (2, 2)):
        trainer = float32_trainer(
            tiny_sd,
            tmp_path / str(size),
            per_device_train_batch_size=size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
        )
        perturb_lora(trainer)
        recorder = GradientRecorder(trainer)
        trainer.add_callback(recorder)
        trainer.train()
        grads.append(recorder.grads[0])
    # Batch 8 and batch 4 forwards round differently (~1e-7); a wrong accumulation scaling would be off by 2x.
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(CPU, reason="needs CUDA: checks that a training step makes no device-to-host synchronisation")
def test_training_step_makes_no_host_sync(tiny_sd, tmp_path):
    trainer = float32_trainer(tiny_sd, tmp_path, bf16=True)
    perturb_lora(trainer)
    inputs = collated_batch(trainer, [0, 1])
    trainer.compute_loss(trainer.model, inputs)  # warm up (lazy CUDA initialisations may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
