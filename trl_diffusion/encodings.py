"""The encoding cache: VAE latents and prompt embeddings computed once with `datasets.map`, then reused.

The VAE and the text encoders are frozen, so their outputs for a given image and prompt never change. With
``precompute_encodings`` (on by default when ``random_crop`` is off) the trainer encodes every pair once, before
training, and each training step reads latents and prompt embeddings instead of decoding images and running the
encoders. The cache is a `datasets` Arrow file written by ``datasets.map`` (batched, with a progress bar), named by a
fingerprint of everything its content depends on, so a second run on the same data and model (or a second trainer in
the same run) loads it and encodes nothing.

The rule for what can be cached: a pair's encodings must be a function of the pair alone.

- Centre crops are cached; random crops change every epoch and stay on the uncached path (``random_crop=True``
  turns ``precompute_encodings`` off by default, and setting both is an error). The same holds for videos'
  ``temporal_crop="random"``; a video pair's cache row holds its clip's latents ``(2, C, F', h, w)``.
- With ``random_flip`` both flips of each pair are cached, and each step picks one per pair with the pair's seeded
  generator (see ``pair_seed``), so its chosen and rejected images share the flip.
- Caption dropout substitutes the family's encoding of the empty prompt, computed once.

Fingerprint: the source dataset's own `datasets` fingerprint and the selected pairs (ties and invalid rows dropped,
chosen/rejected order), the image, caption and confidence columns, resolution, crop and flip settings, the model
family and pipeline class, the model path and its Hub revision (the commit of a Hub snapshot, where known), a digest
of the frozen encoders' weights, their dtypes, and the family options that change encodings
(``max_sequence_length``, ``pretrained_vae_model_name_or_path``, ``upcast_vae``).

Location: ``encodings_cache_dir`` if set; else beside the source dataset's own cache files (a dataset from
``load_dataset``); else, for an in-memory dataset, ``<HF_DATASETS_CACHE>/trl_diffusion_encodings``. That keeps
``output_dir`` exactly what ``save_model`` writes, and runs with different output folders share one cache.

Storage: one Arrow row per pair, each tensor flattened into a list column named ``name|dtype|shape``, in the dtype the
encoder produced (bfloat16 is stored bit-exactly as int16). A row holds ``latents`` ``(2, C, h, w)`` (chosen, then
rejected), ``latents_flipped`` with ``random_flip``, ``prompt_embeds.<key>`` for every key of the family's
``encode_prompt`` output, and, with ``precompute_ref_errors``, ``ref_errors`` ``(2,)``.
"""

import gc
import hashlib
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset

from .data import PreferenceDataset
from .dtypes import DTYPES
from .noise import FIXED_NOISE_STEP, noise_step


if TYPE_CHECKING:
    from .trainer.base_config import DiffusionPreferenceConfig
    from .trainer.base_trainer import DiffusionPreferenceTrainer


logger = logging.getLogger(__name__)

# Bump when the stored layout or the encoding procedure changes: old caches are then ignored, never misread.
CACHE_FORMAT_VERSION = 1
_STORED_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def precompute_encodings_enabled(args: "DiffusionPreferenceConfig") -> bool:
    """The rule: cache unless told not to, or unless random crops make a pair's encoding change every epoch."""
    if args.precompute_encodings is None:
        return not args.random_crop and args.temporal_crop != "random"
    return args.precompute_encodings


# ----- fingerprint -----


def model_revision(pipeline) -> str | None:
    """The Hub commit a pipeline was loaded from, read from the ``snapshots/<commit>`` folder of its components."""
    paths = [getattr(pipeline, "name_or_path", None)]
    for component in pipeline.components.values():
        config = getattr(component, "config", None)
        paths.append(getattr(config, "_name_or_path", None) if config is not None else None)
        paths.append(getattr(component, "name_or_path", None))
    for path in paths:
        match = re.search(r"snapshots[/\\]([0-9a-f]{40})", str(path or ""))
        if match:
            return match.group(1)
    return None


@torch.no_grad()
def weights_digest(
    modules: dict[str, torch.nn.Module], samples_per_tensor: int = 64, skip: tuple[str, ...] = ()
) -> str:
    """A cheap content digest of networks: every tensor's name, shape and dtype, and a strided sample of its values.

    Two different checkpoints of one architecture differ in practically every sampled value, so this tells them
    apart without hashing gigabytes; it copies one small tensor per module to the host.
    """
    hasher = hashlib.sha256()
    for module_name in sorted(modules):
        samples = []
        for name, tensor in modules[module_name].state_dict().items():
            if any(part in name for part in skip):
                continue
            hasher.update(f"{module_name}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.numel() and (tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8)):
                flat = tensor.detach().reshape(-1)
                samples.append(flat[:: max(1, flat.numel() // samples_per_tensor)][:samples_per_tensor].float())
        if samples:
            hasher.update(torch.cat(samples).cpu().numpy().tobytes())
    return hasher.hexdigest()


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def encodings_fingerprint(trainer: "DiffusionPreferenceTrainer", dataset: PreferenceDataset, flips: tuple) -> str:
    """The fingerprint that names a dataset's encoding cache (see the module docstring for what it covers)."""
    args, family = trainer.args, trainer.family
    frozen = family.frozen_modules()
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "dataset": getattr(dataset.dataset, "_fingerprint", None),
        "kind": type(dataset).__name__,
        "pairs": hashlib.sha256(json.dumps(dataset.rows).encode()).hexdigest(),
        "columns": [list(dataset.image_columns), dataset.caption_column, dataset.confidence_column],
        "transform": dataset.transform_options(),
        "flips": list(flips),
        "family": f"{type(family).__module__}.{type(family).__qualname__}",
        "pipeline": type(family.pipeline).__name__,
        "model": trainer.model_name_or_path,
        "revision": model_revision(family.pipeline),
        "weights": weights_digest(frozen),
        "dtypes": {name: str(next(module.parameters()).dtype) for name, module in frozen.items()},
        "options": {
            "max_sequence_length": args.max_sequence_length,
            "pretrained_vae_model_name_or_path": args.pretrained_vae_model_name_or_path,
            "upcast_vae": args.upcast_vae,
        },
    }
    if parts["dataset"] is None:
        raise ValueError(
            "The encoding cache needs a `datasets.Dataset` (it is named by the dataset's fingerprint); "
            "pass one or set precompute_encodings=False."
        )
    return _digest(parts)


def default_cache_dir(dataset: PreferenceDataset) -> str:
    """Beside the source dataset's cache files, or under the `datasets` cache for an in-memory dataset."""
    cache_files = getattr(dataset.dataset, "cache_files", None)
    if cache_files:
        return os.path.dirname(os.path.abspath(cache_files[0]["filename"]))
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "trl_diffusion_encodings")


# ----- storage -----


def _store(output: dict[str, Any], name: str, tensor: torch.Tensor) -> None:
    """Add a batch of tensors ``(N, ...)`` to a `datasets.map` output as one column ``name|dtype|shape`` (the shape
    of one row) of ``(N, numel)`` host arrays, bit-exact: bfloat16 as its int16 bits, other dtypes as float32."""
    tensor = tensor.detach()
    if tensor.dtype not in _STORED_DTYPES:
        tensor = tensor.float()
    column = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{'x'.join(map(str, tensor.shape[1:]))}"
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    output[column] = tensor.reshape(tensor.shape[0], -1).cpu().numpy()


def _parse_column(column: str) -> tuple[str, torch.dtype, tuple[int, ...]] | None:
    parts = column.split("|")
    if len(parts) != 3:
        return None
    name, dtype, shape = parts
    return name, DTYPES[dtype], tuple(int(size) for size in shape.split("x")) if shape else ()


def _from_column(values: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(values, copy=True))
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.reshape(-1, *shape)


class EncodedPreferenceDataset(torch.utils.data.Dataset):
    """The pairs of a [`PreferenceDataset`], read from an encoding cache: examples for the collator.

    Each example holds ``latents`` ``(2, C, h, w)`` (and ``latents_flipped``), ``prompt_embeds`` (one prompt's
    ``encode_prompt`` output, per key), ``ref_errors`` ``(2,)`` where reference errors were precomputed, and the
    usual ``prompt``, ``row_index``, ``original_sizes``, ``crop_top_lefts`` and ``confidence``.

    Attributes:
        encodings: the cache as a `datasets.Dataset`, one row per readable pair.
        source: the [`PreferenceDataset`] it was computed from.
        fingerprint: the cache's fingerprint.
        num_skipped: pairs left out because an image was unreadable (``skip_invalid_rows``).
    """

    def __init__(self, encodings: Dataset, source: PreferenceDataset, fingerprint: str):
        self.encodings = encodings
        self.source = source
        self.fingerprint = fingerprint
        self.num_skipped = len(source) - len(encodings)
        self.stats = source.stats
        self._tensor_columns = {
            column: parsed for column in encodings.column_names if (parsed := _parse_column(column)) is not None
        }
        self._arrow = encodings.with_format("arrow")

    def __len__(self) -> int:
        return len(self.encodings)

    @property
    def dataset(self):
        """The source `datasets.Dataset` (as [`PreferenceDataset.dataset`]), e.g. for the model card's dataset name."""
        return self.source.dataset

    @property
    def has_ref_errors(self) -> bool:
        return any(name == "ref_errors" for name, _, _ in self._tensor_columns.values())

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Read a batch of rows at once (the `DataLoader` calls this with a batch's indices)."""
        table = self._arrow[list(indices)]
        tensors = {}
        for column, (name, dtype, shape) in self._tensor_columns.items():
            values = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            tensors[name] = _from_column(values, dtype, shape)
        plain = {
            column: table.column(column).to_pylist()
            for column in ("prompt", "row_index", "original_sizes", "crop_top_lefts", "confidence", "desirable")
            if column in table.column_names
        }
        examples = []
        for i in range(len(indices)):
            example = {
                "latents": tensors["latents"][i],
                "prompt_embeds": {
                    name.removeprefix("prompt_embeds."): tensor[i]
                    for name, tensor in tensors.items()
                    if name.startswith("prompt_embeds.")
                },
                **{column: values[i] for column, values in plain.items()},
            }
            for name in ("latents_flipped", "ref_errors"):
                if name in tensors:
                    example[name] = tensors[name][i]
            examples.append(example)
        return examples


# ----- building the cache -----


class _PixelPairs(torch.utils.data.Dataset):
    """Decode and transform pairs for the encoder, in data-loader workers: one or both flips of each pair."""

    def __init__(self, dataset: PreferenceDataset, flips: tuple[bool, ...]):
        self.dataset = dataset
        self.flips = flips

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        loaded = self.dataset.load_pair(index)
        if loaded is None:
            return {"pair_index": index, "pixels": None}
        record, images = loaded
        pixels = []
        for flip in self.flips:
            tensors, original_sizes, crop_top_lefts = self.dataset.transform_pair(images, flip=flip)
            pixels.append(torch.stack(tensors))
        example = {
            "pair_index": index,
            "pixels": torch.stack(pixels),  # (flips, 2, 3, H, W)
            "prompt": record[self.dataset.caption_column],
            "row_index": self.dataset.rows[index][0],
            "original_sizes": original_sizes,
            "crop_top_lefts": crop_top_lefts,
        }
        example.update(self.dataset.row_fields(example["row_index"]))
        return example


def _collate_pixel_pairs(examples: list[dict]) -> list[dict]:
    return examples


def _encode_batch(trainer, next_batch, flips: tuple[bool, ...]):
    """The `datasets.map` function: encode the next batch of decoded pairs (the loader runs in step with the map)."""

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        examples = next_batch()
        indices = [example["pair_index"] for example in examples]
        if indices != list(batch["pair_index"]):
            raise RuntimeError(f"Encoding cache out of step: expected pairs {batch['pair_index']}, got {indices}.")
        valid = [example for example in examples if example["pixels"] is not None]
        if not valid:
            return {"pair_index": []}
        pixels = torch.stack([example["pixels"] for example in valid])  # (N, flips, k, 3, H, W), k images per example
        latents = trainer.encode_images(pixels.flatten(0, 2).to(trainer.accelerator.device))
        latents = latents.reshape(len(valid), len(flips), pixels.shape[2], *latents.shape[1:])
        output = {
            "pair_index": [example["pair_index"] for example in valid],
            "row_index": [example["row_index"] for example in valid],
            "prompt": [example["prompt"] for example in valid],
            "original_sizes": [example["original_sizes"] for example in valid],
            "crop_top_lefts": [example["crop_top_lefts"] for example in valid],
        }
        for column in ("confidence", "desirable"):
            if column in valid[0]:
                output[column] = [example[column] for example in valid]
        for position, flip in enumerate(flips):
            _store(output, "latents_flipped" if flip else "latents", latents[:, position])
        for key, value in trainer.family.encode_prompt(output["prompt"]).items():
            _store(output, f"prompt_embeds.{key}", value)
        return output

    return encode


def encode_dataset(
    trainer: "DiffusionPreferenceTrainer", dataset: PreferenceDataset, name: str = "train"
) -> EncodedPreferenceDataset:
    """Encode every pair of ``dataset`` once with ``datasets.map``, or load the cache a previous run wrote."""
    args = trainer.args
    if not dataset.has_fixed_crops:
        raise ValueError(
            "precompute_encodings caches fixed crops; random_crop=True (or temporal_crop='random') changes every "
            "pair's crop each epoch. Set precompute_encodings=False (or leave it unset) to train with random crops."
        )
    flips = (False, True) if dataset.random_flip else (False,)
    fingerprint = encodings_fingerprint(trainer, dataset, flips)
    cache_dir = args.encodings_cache_dir or default_cache_dir(dataset)
    os.makedirs(cache_dir, exist_ok=True)
    cache_file = os.path.join(cache_dir, f"trl-diffusion-encodings-{fingerprint}.arrow")
    batch_size = max(args.vae_encode_batch_size, args.per_device_train_batch_size)
    state = {}

    def next_batch():
        # The loader starts on the first call only: a cache hit never decodes an image or spawns a worker.
        if "iterator" not in state:
            loader = torch.utils.data.DataLoader(
                _PixelPairs(dataset, flips),
                batch_size=batch_size,
                shuffle=False,
                num_workers=args.dataloader_num_workers,
                collate_fn=_collate_pixel_pairs,
                generator=torch.Generator(),  # its worker seeds must not draw from (and shift) the global RNG
            )
            state["iterator"] = iter(loader)
        return next(state["iterator"])

    pairs = Dataset.from_dict({"pair_index": list(range(len(dataset)))})
    with args.main_process_first(desc=f"encoding cache ({name})"), torch.no_grad():
        encodings = pairs.map(
            _encode_batch(trainer, next_batch, flips),
            batched=True,
            batch_size=batch_size,
            remove_columns=["pair_index"],
            cache_file_name=cache_file,
            new_fingerprint=fingerprint,
            writer_batch_size=batch_size,
            desc=f"Encoding {name} images and prompts ({type(trainer.family).__name__})",
        )
    encoded = EncodedPreferenceDataset(encodings, dataset, fingerprint)
    logger.info("Encoding cache for %s: %d pairs in %s", name, len(encoded), cache_file)
    return encoded


# ----- precomputed reference errors -----


def add_reference_errors(
    trainer: "DiffusionPreferenceTrainer", dataset: EncodedPreferenceDataset, mode: str, name: str = "train"
) -> EncodedPreferenceDataset:
    """Add each pair's reference errors ``(r_w, r_l)`` to its cache row, in one no-grad pass before training.

    The noise, timestep, flip and caption dropout of a pair come from ``pair_seed(seed, step, row)`` with a fixed
    step (``FIXED_NOISE_STEP`` for training data, ``EVAL_NOISE_STEP`` for evaluation data), so the stored
    errors are exactly what the live reference would compute at every step of the run. The result is cached like
    the encodings, named by the encodings' fingerprint, the reference's weights, the seed and every option that
    changes noise, timesteps or errors.
    """
    args = trainer.args
    reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
    parts = {
        "encodings": dataset.fingerprint,
        # With LoRA the reference is the base network: its adapters (whatever their initialisation) do not count,
        # unless a frozen adapter is part of the reference (training on top of a LoRA, `reference="base+adapter"`).
        "reference": weights_digest(
            {"reference": reference}, skip=("lora_",) if trainer.is_peft and not trainer.reference_adapter else ()
        ),
        "lora_base": trainer.is_peft,
        "seed": args.seed,
        "mode": mode,
        "step": noise_step(mode, fixed_step=FIXED_NOISE_STEP),
        "dtype": str(trainer.weight_dtype),
        "options": {
            key: getattr(args, key, None)
            for key in (
                "proportion_empty_prompts",
                "weighting_scheme",
                "logit_mean",
                "logit_std",
                "mode_scale",
                "flow_loss_weighting",
                "epsilon_equivalent_errors",
                "guidance_scale",
                "resolution",
            )
        },
        "scheduler": dict(trainer.family.pipeline.scheduler.config),
    }
    fingerprint = _digest(parts)
    cache_dir = os.path.dirname(dataset.encodings.cache_files[0]["filename"])
    cache_file = os.path.join(cache_dir, f"trl-diffusion-reference-errors-{fingerprint}.arrow")
    collator = trainer.data_collator
    batch_size = args.per_device_train_batch_size

    def compute(batch: dict[str, list], indices: list[int]) -> dict[str, Any]:
        inputs = collator(dataset.__getitems__(indices))
        inputs = trainer._prepare_inputs(inputs)
        step = trainer.prepare_step(inputs, mode)
        with trainer.reference_model(trainer.model) as network, trainer.accelerator.autocast():
            errors = trainer.denoising_errors(network, step)
        output = {}
        group_size = len(errors) // len(indices)  # (B, k): chosen, rejected for a pair
        _store(output, "ref_errors", torch.stack(errors.float().chunk(group_size), dim=1))
        return output

    with args.main_process_first(desc=f"reference errors ({name})"), torch.no_grad():
        encodings = dataset.encodings.map(
            compute,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            cache_file_name=cache_file,
            new_fingerprint=fingerprint,
            desc=f"Reference errors of the {name} pairs",
        )
    return EncodedPreferenceDataset(encodings, dataset.source, dataset.fingerprint)


def prepare_cached_datasets(trainer: "DiffusionPreferenceTrainer") -> None:
    """Swap the trainer's datasets for their encoding caches and, with ``precompute_ref_errors``, add reference
    errors and release the reference model (called once, at the end of the trainer's construction)."""
    args = trainer.args
    if args.precompute_ref_errors and not trainer.uses_reference:
        raise ValueError(f"{type(trainer).__name__} has no reference model: precompute_ref_errors does not apply.")
    if args.precompute_ref_errors and getattr(args, "sync_ref_model", False):
        raise ValueError(
            "precompute_ref_errors stores the initial reference's errors; sync_ref_model updates the reference "
            "during training. Use one or the other."
        )
    if args.precompute_ref_errors and not precompute_encodings_enabled(args):
        raise ValueError(
            "precompute_ref_errors needs the encoding cache (precompute_encodings, which random_crop turns off): "
            "each pair's stored reference error is for one fixed latent, noise and timestep."
        )
    if not precompute_encodings_enabled(args):
        return
    deepspeed_plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    sharded = trainer.is_fsdp_enabled or (deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3)
    if args.precompute_ref_errors and sharded:
        raise NotImplementedError(
            "precompute_ref_errors computes reference errors on the main process before training; with a sharded "
            "reference (ZeRO-3, FSDP) every process would have to take part. Use the live reference there."
        )
    trainer._empty_prompt_embeds = None
    if args.proportion_empty_prompts > 0:
        with torch.no_grad():
            trainer._empty_prompt_embeds = trainer.family.encode_prompt([""])

    def convert(dataset, name: str, mode: str):
        if not isinstance(dataset, PreferenceDataset):
            return dataset
        encoded = encode_dataset(trainer, dataset, name)
        if mode == "train":
            trainer._skipped_rows["train"] += encoded.num_skipped
        if args.precompute_ref_errors:
            encoded = add_reference_errors(trainer, encoded, mode, name)
        return encoded

    trainer.train_dataset = convert(trainer.train_dataset, "train", "train")
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {
            key: convert(dataset, f"eval_{key}", "eval") for key, dataset in trainer.eval_dataset.items()
        }
    else:
        trainer.eval_dataset = convert(trainer.eval_dataset, "eval", "eval")
    if args.precompute_ref_errors and trainer.ref_model is not None:
        # The reference's work is done: release it, so no reference model sits in memory during training.
        trainer.ref_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
