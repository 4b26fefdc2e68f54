"""`DiffusionModelConfig`: the model half of a training script's arguments (TRL's `ModelConfig`, for diffusers).

It names the pipeline to load (a Hub id, a local diffusers folder or one of the offline tiny models below), how to
load it (revision, variant, dtype) and the LoRA adapter to train. The helpers turn it into the objects
the trainers take: [`load_pipeline`][] and [`get_peft_config`][].

Tiny models: `model_name_or_path: tiny-sd` (also every other name in `TINY_MODELS`) builds a tiny,
randomly initialised pipeline from configs with `trl_diffusion.testing.tiny_models`, saves it once under
`$TRL_DIFFUSION_CACHE` (default `~/.cache/trl_diffusion`) and loads it from there, so a script or the CLI runs from a
fresh clone with no download. A local folder of the same name takes precedence.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .dtypes import DTYPES, compute_dtype


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .trainer.base_config import DiffusionPreferenceConfig


TINY_MODELS = {
    "tiny-sd": ("build_tiny_stable_diffusion", {"prediction_type": "epsilon"}),
    "tiny-sd-v": ("build_tiny_stable_diffusion", {"prediction_type": "v_prediction"}),
    "tiny-sdxl": ("build_tiny_sdxl", {}),
    "tiny-sd3": ("build_tiny_sd3", {}),
    "tiny-flux": ("build_tiny_flux", {}),
    "tiny-flux2": ("build_tiny_flux2", {}),
    "tiny-flux2-klein": ("build_tiny_flux2", {"klein": True}),
    "tiny-qwen-image": ("build_tiny_qwen_image", {}),
    "tiny-z-image": ("build_tiny_z_image", {}),
    "tiny-wan": ("build_tiny_wan", {}),
}


@dataclass
class DiffusionModelConfig:
    """Model arguments of the trl_diffusion scripts: which pipeline to load, how, and which LoRA adapter to train.

    Using `transformers.HfArgumentParser` (or TRL's `TrlParser`) this class becomes command-line flags and YAML
    keys, like TRL's `ModelConfig`.

    Args:
        model_name_or_path: A diffusers pipeline: a Hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`), a local
            folder, or one of the offline tiny models `tiny-sd`, `tiny-sd-v`, `tiny-sdxl`, `tiny-sd3`, `tiny-flux`,
            `tiny-flux2`, `tiny-flux2-klein`, `tiny-qwen-image`, `tiny-z-image` (built from configs on first use and
            cached under `$TRL_DIFFUSION_CACHE`, default `~/.cache/trl_diffusion`). Defaults to `None`.
        model_revision: Branch, tag or commit of a Hub model. Defaults to `"main"`.
        variant: Weight variant to load, such as `"fp16"` (files named `*.fp16.safetensors`). Defaults to `None`.
        dtype: dtype the pipeline is loaded in: `"float32"`, `"bfloat16"`, `"float16"` or `"auto"` (the saved dtype).
            The trainer then keeps trainable weights in float32 and runs frozen ones in the mixed-precision dtype.
            Defaults to `"float32"`.
        use_peft: Train a LoRA adapter on the denoiser instead of the whole denoiser. Defaults to `False`.
        lora_r: LoRA rank. Defaults to `8`.
        lora_alpha: LoRA alpha (the update is scaled by `lora_alpha / lora_r`). Defaults to `8`.
        lora_dropout: Dropout on the LoRA input. Defaults to `0.0`.
        lora_target_modules: Module names to adapt. `None` takes the model family's attention projections (`to_q`,
            `to_k`, `to_v`, `to_out.0`). Defaults to `None`.
        init_lora_weights: peft's initialisation of the adapter: `"gaussian"` (as the diffusers training scripts) or
            `"true"` (peft's default, Kaiming-uniform A). Defaults to `"gaussian"`.
        use_rslora: Rank-stabilised LoRA: scale by `lora_alpha / √r`. Defaults to `False`.
        use_dora: Weight-decomposed LoRA (DoRA). Defaults to `False`.

    Note:
        Quantization (QLoRA) is set in the training config, not here: `load_in_4bit`, `load_in_8bit`,
        `bnb_4bit_quant_type`, `bnb_4bit_compute_dtype` and `bnb_4bit_use_double_quant` of
        [`DiffusionPreferenceConfig`][]. With one of them set, the script hands the trainer the model path and the
        trainer loads the denoiser quantized.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Diffusers pipeline: Hub id, local folder, or a tiny model (tiny-sd, tiny-flux2...)."},
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant to load, e.g. fp16."})
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype to load the pipeline in.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the whole denoiser."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; default: the family's attention projections."}
    )
    init_lora_weights: str = field(
        default="gaussian",
        metadata={"help": "LoRA initialisation.", "choices": ["gaussian", "true"]},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA (alpha / sqrt(r))."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})

    def __post_init__(self):
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {self.dtype!r}.")
        # `--lora_target_modules all-linear` arrives as a one-element list; peft takes the string form.
        if isinstance(self.lora_target_modules, list) and self.lora_target_modules == ["all-linear"]:
            self.lora_target_modules = "all-linear"


def tiny_model_cache_dir() -> str:
    return os.environ.get("TRL_DIFFUSION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trl_diffusion"))


def resolve_model_path(name_or_path: str) -> str:
    """Return ``name_or_path``, or for a tiny-model name (`tiny-sd`...) the cached folder it is built into.

    The tiny model is built into a temporary folder and renamed into place, so several processes of one launch may
    call this at once: the first rename wins and every process loads the same weights (they are seeded anyway).
    """
    if name_or_path not in TINY_MODELS or os.path.isdir(name_or_path):
        return name_or_path
    from .testing import tiny_models

    target = os.path.join(tiny_model_cache_dir(), name_or_path)
    if os.path.isfile(os.path.join(target, "model_index.json")):
        return target
    os.makedirs(tiny_model_cache_dir(), exist_ok=True)
    builder, kwargs = TINY_MODELS[name_or_path]
    staging = tempfile.mkdtemp(prefix=f".{name_or_path}-", dir=tiny_model_cache_dir())
    getattr(tiny_models, builder)(staging, **kwargs)
    try:
        os.rename(staging, target)
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_pipeline(
    model_args: "DiffusionModelConfig | str | os.PathLike", args: "DiffusionPreferenceConfig | None" = None
) -> "DiffusionPipeline":
    """Load the `DiffusionPipeline` that ``model_args`` names, with its revision, variant and dtype.

    The one pipeline loader of the library: the scripts call it with their model arguments, the trainers with the
    path or Hub id they are given.

    Args:
        model_args: the model arguments, or a pipeline folder, Hub id or tiny-model name (then loaded in its saved
            dtype, at the default revision).
        args: a training config; when it asks for quantization (``load_in_4bit`` / ``load_in_8bit``, QLoRA), the
            denoiser's frozen base loads in 4 or 8 bits and its other layers in the run's compute dtype (revision,
            variant and dtype of ``model_args`` are then not used).

    Returns:
        The loaded pipeline, on the CPU.

    Raises:
        ValueError: if no model is named.
    """
    from diffusers import DiffusionPipeline

    from .quantization import load_quantized_pipeline, wants_quantization
    from .trainer.distributed import zero3_init_disabled

    if isinstance(model_args, (str, os.PathLike)):
        model_args = DiffusionModelConfig(model_name_or_path=str(model_args), dtype="auto")
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a Hub id, a local diffusers folder or `tiny-sd`).")
    path = resolve_model_path(model_args.model_name_or_path)
    if args is not None and wants_quantization(args):
        return load_quantized_pipeline(path, args, compute_dtype(args))
    kwargs = {"revision": model_args.model_revision, "variant": model_args.variant}
    if model_args.dtype != "auto":
        kwargs["dtype"] = DTYPES[model_args.dtype]
    with zero3_init_disabled():  # the frozen text encoders must load whole under ZeRO-3
        return DiffusionPipeline.from_pretrained(path, **kwargs)


def get_peft_config(model_args: DiffusionModelConfig):
    """A `peft.LoraConfig` from ``model_args``, or `None` when ``use_peft`` is off."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    init = True if model_args.init_lora_weights == "true" else model_args.init_lora_weights
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        init_lora_weights=init,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )
