"""LoRA files for other tools: the kohya key format that ComfyUI, Forge/A1111 and kohya's scripts load.

The trainers save adapters in the diffusers format (``pytorch_lora_weights.safetensors``: keys such as
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` and the peft config in the file's
metadata), which ``pipeline.load_lora_weights`` reads but ComfyUI does not. The kohya format names each adapted
module with one flat key and stores its scale as a tensor:

- ``{prefix}_{module path with "." replaced by "_"}.lora_down.weight``: peft's ``lora_A`` (rank × in);
- ``….lora_up.weight``: peft's ``lora_B`` (out × rank);
- ``….alpha``: a scalar; the update is ``(alpha / rank) · up @ down``, so ``alpha = peft scaling × rank``
  (``lora_alpha`` for plain LoRA, ``lora_alpha · √r`` for rank-stabilised LoRA, per-module patterns included).

``prefix`` is ``lora_unet`` for UNets (SD 1.x/2.x, SDXL): module paths stay the diffusers ones
(``lora_unet_down_blocks_0_attentions_0_…``), the names kohya's SD 1.x trainer writes and that ComfyUI, Forge and
diffusers' own kohya converter map for both SD 1.x and SDXL. For transformers (SD3, Flux) it is
``lora_transformer``, the layout OneTrainer writes and ComfyUI and diffusers' Flux loader read. DoRA adapters and
LoRA biases have no kohya equivalent here and are refused.
"""

import json
import math
from collections.abc import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file


KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
KOHYA_PREFIXES = {"unet": "lora_unet", "transformer": "lora_transformer"}
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' `save_lora_weights` writes the peft config


def _pattern_value(patterns: dict, module: str, default):
    """peft's per-module override (``rank_pattern``/``alpha_pattern``): the first key matching the module's tail."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def kohya_alpha(module: str, adapter_config: dict) -> float:
    """The kohya ``alpha`` of ``module``: peft's scaling (``lora_alpha / r``, or ``/ √r`` with rsLoRA) times ``r``."""
    rank = _pattern_value(adapter_config.get("rank_pattern") or {}, module, adapter_config["r"])
    alpha = _pattern_value(adapter_config.get("alpha_pattern") or {}, module, adapter_config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank
    return scaling * rank


def diffusers_to_kohya(state_dict: dict[str, torch.Tensor], adapter_config: dict) -> dict[str, torch.Tensor]:
    """Convert a diffusers LoRA state dict (``unet.…lora_A.weight`` or ``transformer.…``) to kohya keys.

    Args:
        state_dict: the tensors of a diffusers LoRA file, keys prefixed with the denoiser (``unet.``,
            ``transformer.``).
        adapter_config: the adapter's peft config (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
            ``alpha_pattern``, ``use_dora``), as diffusers stores it in the file's metadata.
    """
    if adapter_config.get("use_dora"):
        raise ValueError("DoRA adapters cannot be written in the kohya format; train without use_dora to export.")
    converted = {}
    for key, value in state_dict.items():
        denoiser, _, rest = key.partition(".")
        if denoiser not in KOHYA_PREFIXES or not rest.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(
                f"Cannot convert LoRA key {key!r} to the kohya format: expected '<unet|transformer>.<module>"
                ".lora_A.weight' or '.lora_B.weight' (LoRA biases and DoRA magnitudes have no kohya key)."
            )
        module, _, part = rest.removesuffix(".weight").rpartition(".")
        name = f"{KOHYA_PREFIXES[denoiser]}_{module.replace('.', '_')}"
        converted[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
        converted[f"{name}.alpha"] = torch.tensor(kohya_alpha(module, adapter_config), dtype=torch.float32)
    return converted


def kohya_to_diffusers(
    state_dict: dict[str, torch.Tensor], module_names: Iterable[str], denoiser_name: str
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The inverse of [`diffusers_to_kohya`][] for a known model: ``(diffusers state dict, {module: alpha})``.

    A flat kohya name loses where the dots were, so the module paths are recovered from ``module_names`` (the
    denoiser's ``named_modules()``). A name that matches none of them, or two, raises a `ValueError`.
    """
    prefix = KOHYA_PREFIXES[denoiser_name] + "_"
    by_flat_name: dict[str, list[str]] = {}
    for name in module_names:
        by_flat_name.setdefault(name.replace(".", "_"), []).append(name)
    converted, alphas = {}, {}
    for key, value in state_dict.items():
        flat, _, part = key.partition(".")
        candidates = by_flat_name.get(flat.removeprefix(prefix), []) if flat.startswith(prefix) else []
        if len(candidates) != 1:
            raise ValueError(f"Kohya key {key!r} names {len(candidates)} modules of the {denoiser_name}; expected 1.")
        module = candidates[0]
        if part == "alpha":
            alphas[module] = float(value)
        elif part in ("lora_down.weight", "lora_up.weight"):
            converted[f"{denoiser_name}.{module}.{'lora_A' if part == 'lora_down.weight' else 'lora_B'}.weight"] = (
                value
            )
        else:
            raise ValueError(f"Unexpected kohya key {key!r}.")
    return converted, alphas


def read_diffusers_lora(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a diffusers LoRA file and the peft config of its one adapted denoiser (from the metadata)."""
    with safe_open(path, framework="pt") as f:
        state_dict = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ValueError(
            f"{path} has no LoRA config in its metadata ('{_METADATA_KEY}'), so its alpha is unknown. Files saved by "
            "trl_diffusion (and diffusers >= 0.35 with `*_lora_adapter_metadata`) carry it."
        )
    denoisers = {key.partition(".")[0] for key in state_dict}
    if len(denoisers) != 1:
        raise ValueError(
            f"{path} adapts {sorted(denoisers)}; the kohya export handles one denoiser (unet/transformer)."
        )
    (denoiser,) = denoisers
    packed = json.loads(metadata[_METADATA_KEY])
    config = {
        key.removeprefix(f"{denoiser}."): value for key, value in packed.items() if key.startswith(f"{denoiser}.")
    }
    return state_dict, config


def export_kohya_lora(diffusers_path: str, output_path: str) -> dict[str, torch.Tensor]:
    """Write the diffusers LoRA file ``diffusers_path`` as a kohya-format file ``output_path``; return its tensors."""
    state_dict, config = read_diffusers_lora(diffusers_path)
    converted = diffusers_to_kohya(state_dict, config)
    save_file(converted, output_path, metadata={"format": "pt", "ss_network_module": "networks.lora"})
    return converted
