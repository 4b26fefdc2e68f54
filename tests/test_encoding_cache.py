"""Speed and memory options: the encoding cache, precomputed reference errors, fast-step settings, torch.compile,
gradient checkpointing, 8-bit optimizers and QLoRA."""

import gc
import importlib.util
import math
import os

import pytest
import torch
from datasets import Dataset
from diffusers import AutoencoderKL, UNet2DConditionModel
from helpers import trainers
from helpers.rows import make_pickapic
from transformers import TrainerCallback

from trl_diffusion import DiffusionDPOConfig
from trl_diffusion.data import PreferenceDataset
from trl_diffusion.encodings import EncodedPreferenceDataset
from trl_diffusion.noise import FIXED_NOISE_STEP, noise_step, pair_randomness
from trl_diffusion.trainer.base_trainer import DiffusionPreferenceTrainer


CPU = not torch.cuda.is_available()


def make_trainer(model, tmp_path, method="dpo", peft=True, dataset=None, eval_dataset=None, **overrides):
    """`test_trainers.make_trainer` with this file's defaults: its own cache folder, float32."""
    overrides = {"encodings_cache_dir": str(tmp_path / "cache"), "bf16": False, **overrides}
    output_dir = overrides.pop("output_dir", str(tmp_path / "out"))
    return trainers.make_trainer(
        method, model, output_dir, peft=peft, dataset=dataset, eval_dataset=eval_dataset, **overrides
    )


def perturb_lora(trainer, seed=0, scale=0.05):
    """Give the LoRA B matrices non-zero values, so the policy differs from its reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def batch(trainer, indices, cached=True):
    """A collated batch of pairs ``indices``: from the encoding cache, or decoded from images (the uncached path)."""
    dataset = trainer.train_dataset if cached else trainer.train_dataset.source
    examples = [dataset[i] for i in indices]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def loss_history(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


class Counter:
    """Count calls of a class method (e.g. every VAE encode), wherever it is called from."""

    def __init__(self, monkeypatch, cls, name):
        self.calls = 0
        original = getattr(cls, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


class _GradientRecorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.grads = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.trainer.model.named_parameters() if p.grad is not None})


# ----- the encoding cache -----


@pytest.mark.parametrize("model_fixture", ["tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_cached_step_equals_the_uncached_step(model_fixture, request, tmp_path):
    """Same pairs, same noise: the cached batch gives the uncached batch's inputs, errors and loss, including caption
    dropout (which substitutes the family's empty-prompt encoding)."""
    trainer = make_trainer(request.getfixturevalue(model_fixture), tmp_path, proportion_empty_prompts=0.5)
    assert isinstance(trainer.train_dataset, EncodedPreferenceDataset)
    perturb_lora(trainer)
    indices = [0, 1, 2, 3, 4, 5]
    cached, uncached = batch(trainer, indices), batch(trainer, indices, cached=False)
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
    cached = make_trainer(tiny_sd, tmp_path / "cached", **sgd)
    uncached = make_trainer(tiny_sd, tmp_path / "uncached", precompute_encodings=False, **sgd)
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
    first = make_trainer(tiny_sd, tmp_path)
    assert vae.calls > 0 and text.calls > 0
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 1 and files[0].startswith("trl-diffusion-encodings-")
    vae.calls = text.calls = 0
    first.train()
    assert vae.calls == 0 and text.calls == 0  # training reads the cache
    second = make_trainer(tiny_sd, tmp_path, output_dir=str(tmp_path / "second"), per_device_train_batch_size=4)
    second.train()
    assert vae.calls == 0 and text.calls == 0  # the second trainer loads the first one's cache
    assert sorted(os.listdir(tmp_path / "cache")) == files
    # Anything that changes the encodings changes the fingerprint: another resolution is encoded anew.
    make_trainer(tiny_sd, tmp_path, output_dir=str(tmp_path / "third"), resolution=8)
    assert vae.calls > 0 and len(os.listdir(tmp_path / "cache")) == 2
    assert not os.path.exists(tmp_path / "out" / ".encodings_cache")  # output_dir holds only what save_model writes


def test_cache_with_random_flip_stores_both_flips_and_pairs_share_one(tiny_sd, tmp_path):
    trainer = make_trainer(tiny_sd, tmp_path, random_flip=True)
    indices = list(range(8))
    cached = batch(trainer, indices)
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
    trainer = make_trainer(tiny_sd, tmp_path, proportion_empty_prompts=1.0, max_steps=1)
    with torch.no_grad():
        empty = trainer.family.encode_prompt([""])["encoder_hidden_states"]
    step = trainer.prepare_step(batch(trainer, [0, 1, 2]))
    torch.testing.assert_close(step.conditioning["encoder_hidden_states"], empty.expand(6, -1, -1))
    calls = []
    monkeypatch.setattr(trainer.family, "encode_prompt", lambda prompts: calls.append(prompts))
    trainer.train()
    assert calls == []  # no text encoder during training, even with caption dropout


def test_precompute_encodings_rule_and_validation(tiny_sd, tmp_path):
    assert DiffusionDPOConfig(output_dir=str(tmp_path)).precompute_encodings is None
    trainer = make_trainer(tiny_sd, tmp_path, random_crop=True)  # random crops stay on the per-step path
    assert isinstance(trainer.train_dataset, PreferenceDataset)
    with pytest.raises(ValueError, match="random_crop"):
        DiffusionDPOConfig(output_dir=str(tmp_path), random_crop=True, precompute_encodings=True)
    with pytest.raises(ValueError, match="precompute_ref_errors needs the encoding cache"):
        DiffusionDPOConfig(output_dir=str(tmp_path), precompute_encodings=False, precompute_ref_errors=True)


def test_cache_skips_unreadable_rows_and_counts_them(tiny_sd, tmp_path):
    data = make_pickapic(6).to_dict()
    data["jpg_0"][3] = b"not an image"
    trainer = make_trainer(tiny_sd, tmp_path, dataset=Dataset.from_dict(data), skip_invalid_rows=True, max_steps=1)
    assert len(trainer.train_dataset) == 5
    trainer.train()
    assert trainer.state.log_history[0]["data/skipped_rows"] == 1


def test_cached_data_in_dataloader_workers(tiny_sd, tmp_path):
    trainer = make_trainer(tiny_sd, tmp_path, dataloader_num_workers=1, max_steps=2)
    trainer.train()
    assert len(loss_history(trainer)) == 2


# ----- precomputed reference errors -----


def _live_unets() -> int:
    gc.collect()
    return sum(isinstance(obj, UNet2DConditionModel) for obj in gc.get_objects())


def test_precomputed_reference_errors_equal_the_live_reference_and_free_it(tiny_sd, tmp_path, monkeypatch):
    before = _live_unets()
    # SGD: the stored and live reference errors differ by rounding (~1e-7), which Adam could amplify to ±lr updates.
    sgd = {"optim": "sgd", "lr_scheduler_type": "constant", "max_steps": 3}
    precomputed = make_trainer(tiny_sd, tmp_path / "pre", peft=False, precompute_ref_errors=True, **sgd)
    assert precomputed.ref_model is None and precomputed.train_dataset.has_ref_errors
    assert _live_unets() - before == 1  # the policy only: the reference copy was released after its one pass
    live = make_trainer(tiny_sd, tmp_path / "live", peft=False, **sgd)
    assert live.ref_model is not None
    live.fixed_noise_step = FIXED_NOISE_STEP  # the same fixed noise
    indices = [0, 3, 5, 6]
    inputs = batch(precomputed, indices)
    step = live.prepare_step(batch(live, indices))
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
    make_trainer(tiny_sd, tmp_path / "pre", peft=False, precompute_ref_errors=True, output_dir=str(tmp_path / "again"))
    assert errors.calls == 0


def test_evaluation_data_is_cached_with_its_reference_errors(tiny_sd, tmp_path):
    precomputed = make_trainer(
        tiny_sd, tmp_path / "pre", peft=False, precompute_ref_errors=True, eval_dataset=make_pickapic(4, seed=50)
    )
    assert isinstance(precomputed.eval_dataset, EncodedPreferenceDataset) and precomputed.eval_dataset.has_ref_errors
    live = make_trainer(tiny_sd, tmp_path / "live", peft=False, eval_dataset=make_pickapic(4, seed=50))
    stored, computed = precomputed.evaluate(), live.evaluate()  # evaluation noise is fixed (step -1) in both
    for key in ("eval_loss", "eval_mse/ref_chosen", "eval_mse/ref_rejected"):
        assert stored[key] == pytest.approx(computed[key], rel=1e-5), key
    with pytest.raises(RuntimeError, match="No reference model"):
        precomputed.evaluate(make_pickapic(2))  # a new raw dataset would need the released reference


def test_precompute_ref_errors_needs_a_reference(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="no reference model"):
        make_trainer(tiny_sd, tmp_path, method="mapo", precompute_ref_errors=True)


# ----- the fast step -----


def test_bf16_autocast_keeps_trainable_weights_in_float32(tiny_sd, tmp_path):
    lora = make_trainer(tiny_sd, tmp_path / "lora", bf16=True, use_cpu=True, max_steps=1)
    assert lora.accelerator.mixed_precision == "bf16"
    trainable = [p for p in lora.model.parameters() if p.requires_grad]
    frozen = [p for p in lora.model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    lora.train()
    # Full fine-tuning: the float32 policy and a bf16 frozen reference, which runs under the same autocast.
    full = make_trainer(tiny_sd, tmp_path / "full", peft=False, bf16=True, use_cpu=True, max_steps=1)
    assert all(p.dtype == torch.float32 for p in full.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in full.ref_model.parameters())
    full.train()
    assert math.isfinite(full.state.log_history[0]["loss"])


@pytest.mark.parametrize("model_fixture", ["tiny_sd", "tiny_flux"])
def test_attention_runs_through_sdpa(model_fixture, request, tmp_path, monkeypatch):
    trainer = make_trainer(request.getfixturevalue(model_fixture), tmp_path)
    sdpa = Counter(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch(trainer, [0, 1]))
    assert sdpa.calls > 0


def test_channels_last_option(tiny_sd, tmp_path):
    trainer = make_trainer(tiny_sd, tmp_path, channels_last=True, max_steps=1)
    weight = trainer.model.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    inputs = batch(trainer, [0, 1])
    step = trainer.prepare_step(inputs)
    assert step.noisy_latents.is_contiguous(memory_format=torch.channels_last)
    reference = make_trainer(tiny_sd, tmp_path / "plain", max_steps=1)
    with torch.no_grad():
        errors = trainer.denoising_errors(trainer.model, step)
        plain = reference.denoising_errors(reference.model, reference.prepare_step(batch(reference, [0, 1])))
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
    trainer = make_trainer(tiny_sd, tmp_path, torch_compile=True, torch_compile_backend="eager", max_steps=4)
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
    full = make_trainer(
        tiny_sd, tmp_path / "full", peft=False, torch_compile=True, torch_compile_backend="eager", max_steps=2
    )
    assert type(full.ref_model).__name__ == "OptimizedModule"
    full.train()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]
    torch._dynamo.reset()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd, tmp_path):
    recorded = []
    for checkpointing in (False, True):
        trainer = make_trainer(tiny_sd, tmp_path / str(checkpointing), activation_checkpointing=checkpointing)
        recorder = _GradientRecorder(trainer)
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
        trainer = make_trainer(
            tiny_sd,
            tmp_path / str(size),
            per_device_train_batch_size=size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
        )
        perturb_lora(trainer)
        recorder = _GradientRecorder(trainer)
        trainer.add_callback(recorder)
        trainer.train()
        grads.append(recorder.grads[0])
    # Batch 8 and batch 4 forwards round differently (~1e-7); a wrong accumulation scaling would be off by 2x.
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(CPU, reason="needs CUDA: checks that a training step makes no device-to-host synchronisation")
def test_training_step_makes_no_host_sync(tiny_sd, tmp_path):
    trainer = make_trainer(tiny_sd, tmp_path, bf16=True)
    perturb_lora(trainer)
    inputs = batch(trainer, [0, 1])
    trainer.compute_loss(trainer.model, inputs)  # warm up (lazy CUDA initialisations may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----- memory: 8-bit optimizers and QLoRA -----


def _bnb_reason() -> str | None:
    """Why bitsandbytes' optimizers cannot run here, or None."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install 'trl_diffusion[quantization]')"
    parameter = torch.nn.Parameter(torch.zeros(4096, device="cuda" if not CPU else "cpu"))
    parameter.grad = torch.ones_like(parameter)
    try:
        bnb.optim.AdamW8bit([parameter]).step()
    except Exception as error:  # e.g. a bitsandbytes build without a CPU backend
        return f"bitsandbytes {bnb.__version__} has no 8-bit optimizer backend on this device ({error})"
    return None


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_through_the_trainer(optim, tiny_sd, tmp_path):
    reason = _bnb_reason()
    if reason:
        pytest.skip(reason)
    import bitsandbytes as bnb

    trainer = make_trainer(tiny_sd, tmp_path, peft=False, optim=optim, max_steps=1)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.args.optim_bits == 8
    assert optimizer.is_paged == optim.startswith("paged")
    trainer.train()
    states = [state for state in trainer.optimizer.optimizer.state.values() if "state1" in state]
    # bitsandbytes keeps 8-bit moments for tensors of at least 4096 elements, 32-bit ones for smaller tensors
    assert any(state["state1"].dtype == torch.uint8 for state in states)
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def _allow_bnb_loading_on_cpu(monkeypatch):
    """diffusers' bitsandbytes quantizer refuses to load without a GPU; bitsandbytes 0.50 has CPU kernels. Lift the
    check (and its CUDA device map) so the QLoRA code path runs here."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    for name in ("BnB4BitDiffusersQuantizer", "BnB8BitDiffusersQuantizer"):
        quantizer = getattr(bnb_quantizer, name)
        monkeypatch.setattr(quantizer, "validate_environment", lambda self, *args, **kwargs: None)
        monkeypatch.setattr(quantizer, "update_device_map", lambda self, device_map: {"": "cpu"})


def _check_qlora(trainer, layer_class):
    denoiser = trainer.model
    assert denoiser.is_quantized and trainer.ref_model is None
    assert isinstance(denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer, layer_class)
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in denoiser.named_parameters() if "lora_B" in n}
    forwards = []
    denoiser.register_forward_hook(lambda *_: forwards.append(1))
    trainer.train()
    assert len(forwards) == 2 * trainer.state.global_step  # reference (adapters off) and policy: one network
    assert all(torch.equal(p, base[n]) for n, p in denoiser.named_parameters() if n in base)
    assert any(not torch.equal(p, lora[n]) for n, p in denoiser.named_parameters() if n in lora)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_code_path_with_bitsandbytes_cpu_kernels(bits, tiny_sd, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (trl_diffusion[quantization])")
    import bitsandbytes as bnb

    if CPU:
        _allow_bnb_loading_on_cpu(monkeypatch)
    quantize = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"} if bits == 4 else {"load_in_8bit": True}
    trainer = make_trainer(tiny_sd, tmp_path, **quantize)
    _check_qlora(trainer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    with pytest.raises(ValueError, match="cannot be fully fine-tuned"):
        make_trainer(tiny_sd, tmp_path / "full", peft=False, **quantize)


@pytest.mark.skipif(CPU, reason="needs CUDA: diffusers' bitsandbytes quantizer loads only on a GPU")
def test_qlora_on_gpu(tiny_sd, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (trl_diffusion[quantization])")
    trainer = make_trainer(tiny_sd, tmp_path, bf16=True, load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    _check_qlora(trainer, bnb.nn.Linear4bit)


def test_quantization_config_fields(tiny_sd, tmp_path):
    from diffusers import BitsAndBytesConfig, DiffusionPipeline

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="need bitsandbytes"):
            make_trainer(tiny_sd, tmp_path, load_in_4bit=True)
        pytest.skip("bitsandbytes is not installed: only the clear error is checked")

    from trl_diffusion.quantization import bnb_quantization_config

    args = DiffusionDPOConfig(output_dir=str(tmp_path), load_in_4bit=True, bnb_4bit_use_double_quant=True)
    config = bnb_quantization_config(args, torch.bfloat16)
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    args = DiffusionDPOConfig(output_dir=str(tmp_path), load_in_4bit=True, bnb_4bit_compute_dtype="float32")
    assert bnb_quantization_config(args, torch.bfloat16).bnb_4bit_compute_dtype == torch.float32
    assert bnb_quantization_config(DiffusionDPOConfig(output_dir=str(tmp_path)), torch.float32) is None
    with pytest.raises(ValueError, match="at most one"):
        DiffusionDPOConfig(output_dir=str(tmp_path), load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="not quantized"):
        make_trainer(DiffusionPipeline.from_pretrained(tiny_sd), tmp_path, load_in_4bit=True)
