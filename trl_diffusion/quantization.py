"""QLoRA: load the denoiser's frozen base in 4 or 8 bits with bitsandbytes, and train LoRA adapters on top.

The config's ``load_in_4bit`` / ``load_in_8bit`` fields (and ``bnb_4bit_quant_type``, ``bnb_4bit_compute_dtype``,
``bnb_4bit_use_double_quant``) become a diffusers `diffusers.BitsAndBytesConfig`, and the denoiser alone is loaded
with ``from_pretrained(path, subfolder=<unet|transformer>, quantization_config=...)``; the VAE and text encoders load
as usual (their outputs are usually cached, see `trl_diffusion.encodings`). The reference is still the same network
with its adapters disabled, i.e. the quantized base.

diffusers' bitsandbytes quantizer needs a GPU (its ``validate_environment`` refuses to load without CUDA or XPU).
"""

import importlib.util
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline

from .dtypes import DTYPES as COMPUTE_DTYPES


if TYPE_CHECKING:
    from .trainer.base_config import DiffusionPreferenceConfig


# Pipeline components that can be the trained network, in the order the families use them
DENOISER_NAMES = ("unet", "transformer")


def wants_quantization(args: "DiffusionPreferenceConfig") -> bool:
    return bool(args.load_in_4bit or args.load_in_8bit)


def bnb_quantization_config(args: "DiffusionPreferenceConfig", compute_dtype: torch.dtype):
    """The diffusers `BitsAndBytesConfig` for the config's ``load_in_4bit`` / ``load_in_8bit`` fields, or ``None``."""
    if not wants_quantization(args):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("load_in_4bit / load_in_8bit need bitsandbytes: pip install 'trl_diffusion[quantization]'.")
    from diffusers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = COMPUTE_DTYPES[args.bnb_4bit_compute_dtype] if args.bnb_4bit_compute_dtype else compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
    )


def is_quantized(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_quantized", False))


def load_quantized_pipeline(path: str, args: "DiffusionPreferenceConfig", compute_dtype: torch.dtype):
    """Load a pipeline folder or Hub id with its denoiser quantized by bitsandbytes (the rest as usual)."""
    import diffusers

    index = DiffusionPipeline.load_config(path)
    names = [name for name in DENOISER_NAMES if isinstance(index.get(name), (list, tuple)) and index[name][1]]
    if not names:
        raise ValueError(f"{path} has no `unet` or `transformer` component to quantize.")
    name = names[0]
    denoiser_class = getattr(diffusers, index[name][1])
    quantization_config = bnb_quantization_config(args, compute_dtype)
    denoiser = denoiser_class.from_pretrained(
        path, subfolder=name, quantization_config=quantization_config, torch_dtype=compute_dtype
    )
    return DiffusionPipeline.from_pretrained(str(path), **{name: denoiser})


def check_quantized_setup(denoiser: torch.nn.Module, args: "DiffusionPreferenceConfig", is_peft: bool) -> None:
    """Quantized weights cannot train: a quantized denoiser needs a `peft_config` (QLoRA)."""
    if wants_quantization(args) and not is_quantized(denoiser):
        raise ValueError(
            "load_in_4bit/load_in_8bit quantize the denoiser when the trainer loads the model from a path or Hub id; "
            "the given pipeline's denoiser is not quantized. Pass the path, or load the denoiser yourself with "
            "`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`."
        )
    if is_quantized(denoiser) and not is_peft:
        raise ValueError(
            "A quantized denoiser cannot be fully fine-tuned: pass a `peft_config` to train LoRA (QLoRA)."
        )
