"""Memory options (`trl_diffusion.quantization`): 8-bit AdamW through the trainer and QLoRA (4- and 8-bit base
weights), on bitsandbytes' CPU kernels where the GPU is missing."""

import importlib.util
import math

import pytest
import torch
from helpers.trainers import (
    float32_trainer,
)

from trl_diffusion import DiffusionDPOConfig


CPU = not torch.cuda.is_available()


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

    trainer = float32_trainer(tiny_sd, tmp_path, peft=False, optim=optim, max_steps=1)
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
    trainer = float32_trainer(tiny_sd, tmp_path, **quantize)
    _check_qlora(trainer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    with pytest.raises(ValueError, match="cannot be fully fine-tuned"):
        float32_trainer(tiny_sd, tmp_path / "full", peft=False, **quantize)


@pytest.mark.skipif(CPU, reason="needs CUDA: diffusers' bitsandbytes quantizer loads only on a GPU")
def test_qlora_on_gpu(tiny_sd, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (trl_diffusion[quantization])")
    trainer = float32_trainer(tiny_sd, tmp_path, bf16=True, load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    _check_qlora(trainer, bnb.nn.Linear4bit)


def test_quantization_config_fields(tiny_sd, tmp_path):
    from diffusers import BitsAndBytesConfig, DiffusionPipeline

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="need bitsandbytes"):
            float32_trainer(tiny_sd, tmp_path, load_in_4bit=True)
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
        float32_trainer(DiffusionPipeline.from_pretrained(tiny_sd), tmp_path, load_in_4bit=True)
