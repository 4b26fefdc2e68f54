"""The trainer's side of the encoding cache: which datasets to encode, the empty-prompt embedding, the reference pass.

The cache mechanics (fingerprints, shards, storage) are in `trl_diffusion.encodings`, which knows nothing of the
trainer: this module hands it explicit inputs (the family's encode functions and frozen modules, the cache options,
the processes) and returns what the trainer adopts ([`CachedData`][]).

Every process takes part: each encodes its shards of the pairs, and with ``precompute_ref_errors`` each computes the
reference errors of its shards of the pairs. Under ZeRO-3 or FSDP the reference is sharded and its forward is
collective, so the processes run the same number of reference forwards (as TRL's ``_precompute_ref_logps`` runs the
sharded forward on every rank).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import send_to_device

from ..data import PreferenceDataset
from ..encodings import (
    CacheOptions,
    EncodedPreferenceDataset,
    Encoders,
    ProcessGroup,
    add_reference_errors,
    default_cache_dir,
    encode_dataset,
    model_revision,
    weights_digest,
)
from ..noise import FIXED_NOISE_STEP, noise_step


if TYPE_CHECKING:
    from .base_trainer import DiffusionPreferenceTrainer


logger = logging.getLogger(__name__)

# Keys of a collated batch that stay on the host (the per-pair noise is drawn there)
HOST_KEYS = ("row_index", "num_skipped")


@dataclass
class CachedData:
    """What the trainer adopts once its datasets are encoded.

    Attributes:
        train_dataset: the training dataset, encoded where it was a [`PreferenceDataset`][].
        eval_dataset: the evaluation dataset(s), encoded likewise.
        empty_prompt_embeds: the family's encoding of the empty prompt (caption dropout), or ``None``.
        num_skipped: training pairs left out of the cache for an unreadable image.
        release_reference: the reference errors are stored: the frozen reference copy can be released.
    """

    train_dataset: Any
    eval_dataset: Any
    empty_prompt_embeds: dict[str, torch.Tensor] | None
    num_skipped: int
    release_reference: bool


def _zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def check_cache_options(args, uses_reference: bool, accelerator) -> None:
    """Refuse option combinations the cache cannot serve (the crop rule is the config's, see
    ``DiffusionPreferenceConfig.encodings_cached``).

    Raises:
        ValueError: ``precompute_ref_errors`` without a reference, or with ``sync_ref_model``.
        NotImplementedError: ``precompute_ref_errors`` under DeepSpeed ZeRO-3 (untested: see `docs/performance.md`).
    """
    if not args.precompute_ref_errors:
        return
    if not uses_reference:
        raise ValueError("This method has no reference model: precompute_ref_errors does not apply.")
    if getattr(args, "sync_ref_model", False):
        raise ValueError(
            "precompute_ref_errors stores the initial reference's errors; sync_ref_model updates the reference "
            "during training. Use one or the other."
        )
    if _zero3(accelerator):
        raise NotImplementedError(
            "precompute_ref_errors under DeepSpeed ZeRO-3 is not supported yet (its sharded pass is only tested "
            "under FSDP); use FSDP, ZeRO-2, or the live reference."
        )


def processes_of(accelerator) -> ProcessGroup:
    """The accelerator's processes, as the cache builder sees them."""
    return ProcessGroup(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)


def encoders_of(trainer: "DiffusionPreferenceTrainer") -> Encoders:
    """The trainer's family encoders and what identifies them (family, pipeline, model, revision, options)."""
    family = trainer.family
    identity = {
        **family.encoding_key(),
        "model": trainer.model_name_or_path,
        "revision": model_revision(family.pipeline),
    }
    return Encoders(
        encode_images=trainer.encode_images,
        encode_prompt=family.encode_prompt,
        frozen_modules=family.frozen_modules(),
        identity=identity,
        device=trainer.accelerator.device,
    )


def cache_options_of(args, dataset: PreferenceDataset) -> CacheOptions:
    """Cache folder and batch sizes from the training config."""
    return CacheOptions(
        cache_dir=args.encodings_cache_dir or default_cache_dir(dataset),
        batch_size=max(args.vae_encode_batch_size, args.per_device_train_batch_size),
        num_workers=args.dataloader_num_workers,
    )


def reference_errors_key(trainer: "DiffusionPreferenceTrainer", mode: str) -> dict[str, Any]:
    """Everything stored reference errors depend on besides the encodings: the reference's weights, the seed and
    fixed step of the noise, the compute dtype, the family's options, caption dropout and the scheduler."""
    reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
    # With LoRA the reference is the base network: its adapters (whatever their initialisation) do not count,
    # unless a frozen adapter is part of the reference (training on top of a LoRA, `reference="base+adapter"`).
    skip = ("lora_",) if trainer.is_peft and not trainer.reference_adapter else ()
    return {
        "reference": weights_digest({"reference": reference}, skip=skip),
        "lora_base": trainer.is_peft,
        "seed": trainer.args.seed,
        "mode": mode,
        "step": noise_step(mode, fixed_step=FIXED_NOISE_STEP),
        "dtype": str(trainer.weight_dtype),
        "options": trainer.family.options.key(),
        "proportion_empty_prompts": trainer.args.proportion_empty_prompts,
        "scheduler": dict(trainer.family.pipeline.scheduler.config),
    }


def reference_errors_function(
    trainer: "DiffusionPreferenceTrainer",
    dataset: EncodedPreferenceDataset,
    mode: str,
    prepare_inputs: Callable[[dict], dict],
) -> Callable[[list[int]], torch.Tensor]:
    """Pair indices of ``dataset`` to their ``(B, k)`` reference errors, exactly as the live reference's step."""

    def compute(indices: list[int]) -> torch.Tensor:
        inputs = prepare_inputs(trainer.data_collator(dataset.__getitems__(indices)))
        with torch.no_grad():
            step = trainer.prepare_step(inputs, mode)
            with trainer.reference_model(trainer.model) as network, trainer.accelerator.autocast():
                errors = trainer.denoising_errors(network, step)
        return torch.stack(errors.float().chunk(step.group_size), dim=1)

    return compute


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch on ``device``, but for the host keys (row indices, skip count)."""
    host = {key: inputs.pop(key) for key in HOST_KEYS if key in inputs}
    return {**send_to_device(inputs, device), **host}


def prepare_cached_datasets(
    trainer: "DiffusionPreferenceTrainer", prepare_inputs: Callable[[dict], dict] | None = None
) -> CachedData | None:
    """Encode the trainer's datasets (every process its shards), add reference errors with ``precompute_ref_errors``;
    ``None`` when the config trains without the cache.

    Args:
        trainer: a `DiffusionPreferenceTrainer` (its public attributes: args, family, accelerator, datasets...).
        prepare_inputs: moves a collated batch to the device as the training step does (default: [`to_device`][]).
    """
    args, accelerator = trainer.args, trainer.accelerator
    check_cache_options(args, trainer.uses_reference, accelerator)
    if not args.encodings_cached:
        return None
    prepare_inputs = prepare_inputs or (lambda inputs: to_device(inputs, accelerator.device))
    empty_prompt_embeds = None
    if args.proportion_empty_prompts > 0:
        with torch.no_grad():
            empty_prompt_embeds = trainer.family.encode_prompt([""])
    encoders, processes = encoders_of(trainer), processes_of(accelerator)
    lockstep = trainer.is_fsdp_enabled or _zero3(accelerator)

    def convert(dataset, name: str, mode: str):
        if not isinstance(dataset, PreferenceDataset):
            return dataset
        encoded = encode_dataset(dataset, encoders, cache_options_of(args, dataset), processes, name)
        if args.precompute_ref_errors:
            compute = reference_errors_function(trainer, encoded, mode, prepare_inputs)
            key = reference_errors_key(trainer, mode)
            batch_size = args.per_device_train_batch_size
            encoded = add_reference_errors(encoded, compute, key, batch_size, processes, lockstep, name)
        return encoded

    train_dataset = convert(trainer.train_dataset, "train", "train")
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, dict):
        eval_dataset = {key: convert(dataset, f"eval_{key}", "eval") for key, dataset in eval_dataset.items()}
    else:
        eval_dataset = convert(eval_dataset, "eval", "eval")
    converted = isinstance(trainer.train_dataset, PreferenceDataset)
    return CachedData(
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        empty_prompt_embeds=empty_prompt_embeds,
        num_skipped=train_dataset.num_skipped if converted else 0,
        release_reference=args.precompute_ref_errors and trainer.ref_model is not None,
    )
