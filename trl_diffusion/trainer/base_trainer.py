"""The shared training step of every pairwise preference method for diffusion models."""

import gc
import json
import logging
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_compiled_module
from datasets import Dataset
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from huggingface_hub import save_torch_state_dict
from peft import PeftConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import DataCollator, Trainer, TrainerCallback
from transformers.trainer_utils import enable_full_determinism, set_seed

from ..callbacks import CollapseWarningCallback, NonFiniteGuard, read_widget
from ..data import DiffusionPreferenceCollator, PreferenceDataset, PreparationStats
from ..dtypes import compute_dtype
from ..lora_formats import KOHYA_WEIGHT_NAME, export_kohya_lora
from ..model_card import write_model_card
from ..model_config import load_pipeline
from ..models import DiffusionFamily, get_family
from ..noise import (
    FIXED_NOISE_STEP,
    PairDraws,
    noise_step,
    pair_randomness,
    pair_seed,  # noqa: F401 (re-exported from its former home)
)
from ..quantization import check_quantized_setup, is_quantized
from ..streaming import StreamingPreferenceDataset, refuse_eval_stream, unshard_stream_loader
from ..video import VideoPreferenceDataset
from .agreement import fetch_in_agreement
from .base_config import DiffusionPreferenceConfig
from .checkpoints import begin_checkpoint, mark_checkpoint_complete, resolve_resume_checkpoint
from .distributed import add_deepspeed_input_cast, prepare_frozen_model
from .encoding_cache import CachedData, prepare_cached_datasets


logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class DenoisingStep:
    """One micro-batch, ready for the denoiser: ``2B`` rows, chosen images first, noise and timestep shared by pairs.

    More generally, each of the ``B`` examples of a batch is a group of ``k = group_size`` images that share a prompt,
    a noise tensor and a timestep, stored image-major (image 0 of every example, then image 1, ...): ``k = 2`` for a
    pair ``[x_w ; x_l]``, ``k = 1`` for the unpaired rows of [`UnpairedPreferenceDataset`][] (Diffusion-KTO). ``k`` is
    read from the batch (images per ``row_index``), so a method needs no switch for it.

    Attributes:
        noisy_latents: the denoiser's input ``x_t``, ``(2B, C, h, w)``.
        target: the regression target (noise, velocity...), same shape.
        timesteps: ``(2B,)`` timesteps on the scale of ``num_train_timesteps``.
        conditioning: keyword tensors for the denoiser (prompt and image conditioning), ``2B`` rows each.
        error_weights: optional ``(2B,)`` weights of the squared error (flow-matching weighting).
        inputs: the collated batch the step was built from.
        mode: ``"train"`` or ``"eval"``.
        ref_errors: ``(2B,)`` errors of the reference, for methods that have one.
        auxiliary_errors: no-grad errors of other networks a method consults (e.g. EMA annotators), by name.
        group_size: images per example, ``k`` (2 for pairs, 1 for unpaired rows).
    """

    noisy_latents: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    error_weights: torch.Tensor | None
    inputs: dict[str, Any]
    mode: str = "train"
    ref_errors: torch.Tensor | None = None
    auxiliary_errors: dict[str, torch.Tensor] = field(default_factory=dict)
    group_size: int = 2


def _bridge_diffusers_model(denoiser: torch.nn.Module) -> None:
    """Give a diffusers model the few `PreTrainedModel` hooks that `transformers.Trainer` and its callbacks call.

    - `activation_checkpointing_enable`: a diffusers model has its own switch, `enable_gradient_checkpointing()`.
    - `config.to_json_string` / `config.to_dict`: trackers (TensorBoard, W&B) record the model config through them;
      a diffusers config is a `FrozenDict` without them.
    """
    denoiser.activation_checkpointing_enable = lambda **kwargs: denoiser.enable_gradient_checkpointing()
    config = denoiser.config
    if not hasattr(config, "to_json_string"):
        config.to_json_string = denoiser.to_json_string
        config.to_dict = lambda: dict(config)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)``, skipped when nothing would change (diffusers warns on every floating-point cast)."""
    if any(parameter.dtype != dtype for parameter in module.parameters()):
        module.to(dtype)
    return module


def _load_safetensors_weights(directory: str, weight_name: str) -> dict[str, torch.Tensor]:
    """Read a (possibly sharded) safetensors state dict written by ``save_pretrained``."""
    index_file = os.path.join(directory, weight_name + ".index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state_dict = {}
        for shard in shards:
            state_dict.update(load_file(os.path.join(directory, shard)))
        return state_dict
    return load_file(os.path.join(directory, weight_name))


class DiffusionPreferenceTrainer(Trainer):
    """Base class of the trl_diffusion trainers: one training step for every pairwise method.

    Each step takes ``B`` pairs as ``[x_w ; x_l]`` latents, draws one noise tensor and one timestep per pair (shared by
    its two images), computes the per-sample denoising errors ``e = mean_{C,H,W} (prediction - target)^2`` of the
    policy in float32 (and of the reference under ``torch.no_grad()`` where the method has one), and hands them to the
    method's loss function. A method subclass sets the class attributes and implements [`preference_loss`][]; an
    unpaired method (one image per example, as Diffusion-KTO) also sets ``dataset_class`` to
    [`UnpairedPreferenceDataset`][], and the step then gives each image its own noise and timestep
    (``DenoisingStep.group_size == 1``).

    Args:
        model: a diffusers pipeline folder or Hub id (loaded with ``DiffusionPipeline.from_pretrained``), or a loaded
            `DiffusionPipeline`. Its denoiser (UNet or transformer) is trained; the VAE and text encoders are frozen.
        ref_model: only for full fine-tuning of a method with a reference: a denoiser `nn.Module`, or a folder/Hub id
            holding one (a pipeline folder or the denoiser's own folder). By default the reference is a frozen copy of
            the initial denoiser. With LoRA the reference is the same network with its adapters disabled.
        args: the method's config.
        data_collator: defaults to [`DiffusionPreferenceCollator`][].
        train_dataset: a `datasets.Dataset` in the Pick-a-Pic or TRL-style schema (see `data.py`), or a ready
            [`PreferenceDataset`][].
        eval_dataset: as ``train_dataset``, or a dict of them by name.
        processing_class: unused (prompts are tokenized by the pipeline's own tokenizers); accepted for TRL's API.
        callbacks: as for `transformers.Trainer`.
        optimizers: ``(optimizer, lr_scheduler)``, as for `transformers.Trainer`.
        peft_config: a `peft.LoraConfig`. LoRA adapters are added to the denoiser and only they train. When its
            ``target_modules`` is ``None``, the model family's default attention projections are used.
    """

    _tag_names = ["trl", "trl-diffusion"]
    _name = "Base"
    _paper: dict = {}
    config_class = DiffusionPreferenceConfig
    # Whether the method compares against a frozen reference model (MaPO does not)
    uses_reference = True
    # The per-pair accuracy metric that is also logged per timestep bucket
    accuracy_metric = "rewards/accuracies"
    # `compute_loss` returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False
    # What a raw `datasets.Dataset` is wrapped in (its `from_config(dataset, args)`): pairs here; an unpaired method
    # (Diffusion-KTO) sets `UnpairedPreferenceDataset`, whose examples hold one image each.
    dataset_class: type[PreferenceDataset] = PreferenceDataset

    def __init__(
        self,
        model: str | DiffusionPipeline,
        ref_model: str | torch.nn.Module | None = None,
        args: DiffusionPreferenceConfig | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | PreferenceDataset | None = None,
        eval_dataset: Dataset | PreferenceDataset | dict[str, Dataset | PreferenceDataset] | None = None,
        processing_class: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LRScheduler | None] = (None, None),
        peft_config: PeftConfig | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else type(model).__name__
            args = self.config_class(output_dir=f"{os.path.basename(str(model_name).rstrip('/'))}-{self._name}")
        self._check_reference_arguments(ref_model, args, peft_config)
        # Seed before LoRA initialisation and reference copies, as `Trainer` does for its own model init.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        pipeline = self._setup_pipeline(model, args)
        denoiser = self._setup_denoiser(pipeline, ref_model, args, peft_config)
        train_dataset, eval_dataset = self._setup_datasets(train_dataset, eval_dataset, args)
        super().__init__(
            model=denoiser,
            args=args,
            data_collator=data_collator or DiffusionPreferenceCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._setup_step_state(args)
        self._place_frozen_networks(denoiser, args)
        # Encoding cache (`precompute_encodings`) and precomputed reference errors: see `trainer/encoding_cache.py`
        self._use_cached_data(prepare_cached_datasets(self, self._prepare_inputs))

    # ----- set-up -----

    def _check_reference_arguments(self, ref_model, args: DiffusionPreferenceConfig, peft_config) -> None:
        """Refuse a ``ref_model`` that the method or the LoRA set-up would not use."""
        if ref_model is not None and not self.uses_reference:
            raise ValueError(f"{type(self).__name__} uses no reference model; do not pass `ref_model`.")
        if ref_model is not None and (peft_config is not None or args.adapter_name_or_path is not None):
            raise ValueError(
                "With LoRA (`peft_config` or `adapter_name_or_path`), the reference is the base network with its "
                "adapters disabled (or with a frozen adapter); do not pass `ref_model` (it would be a second copy in "
                "memory)."
            )

    def _setup_pipeline(self, model: str | DiffusionPipeline, args: DiffusionPreferenceConfig) -> DiffusionPipeline:
        """Load the pipeline (see [`load_pipeline`][trl_diffusion.model_config.load_pipeline]), find its family and
        freeze the VAE and text encoders in the compute dtype."""
        if isinstance(model, DiffusionPipeline):
            pipeline, self.model_name_or_path = model, model.name_or_path or type(model).__name__
        elif isinstance(model, (str, os.PathLike)):
            pipeline, self.model_name_or_path = load_pipeline(model, args), str(model)
        else:
            raise TypeError(
                f"model must be a diffusers pipeline folder, a Hub id or a DiffusionPipeline, got {type(model).__name__}."
            )
        self.family: DiffusionFamily = get_family(pipeline, args)
        self.weight_dtype = compute_dtype(args)
        for name, module in self.family.frozen_modules().items():
            _cast(module.requires_grad_(False).eval(), self.family.frozen_module_dtype(name, self.weight_dtype))
        return pipeline

    def _setup_denoiser(
        self, pipeline: DiffusionPipeline, ref_model, args: DiffusionPreferenceConfig, peft_config: PeftConfig | None
    ) -> torch.nn.Module:
        """Make the denoiser trainable (its LoRA adapters, or all of it) and build the reference where needed."""
        denoiser = self.family.denoiser
        # Training on top of an existing LoRA (`adapter_name_or_path`) is LoRA training of that adapter
        self.is_peft = peft_config is not None or args.adapter_name_or_path is not None
        # The name of a frozen adapter that is (with the base) the reference, or None when the reference is the base
        self.reference_adapter: str | None = None
        check_quantized_setup(denoiser, args, self.is_peft)
        if self.is_peft:
            self._setup_lora(pipeline, denoiser, args, peft_config)
            self.ref_model = None
        else:
            _cast(denoiser.requires_grad_(True), torch.float32)
            self.ref_model = self._create_reference(ref_model, denoiser) if self.uses_reference else None
        _bridge_diffusers_model(denoiser)
        if args.channels_last:
            for network in (denoiser, self.ref_model):
                if network is not None:
                    network.to(memory_format=torch.channels_last)
        return denoiser

    def _setup_lora(
        self, pipeline: DiffusionPipeline, denoiser: torch.nn.Module, args, peft_config: PeftConfig | None
    ) -> None:
        """Freeze the base in the compute dtype and add the trained adapter (new, or the user's), in float32."""
        denoiser.requires_grad_(False)
        if not is_quantized(denoiser):  # a quantized model keeps its own dtypes (and refuses casts)
            _cast(denoiser, self.weight_dtype)
        if args.adapter_name_or_path is not None:
            self._load_starting_adapter(pipeline, args, peft_config)
        else:
            if peft_config.target_modules is None:
                peft_config.target_modules = list(self.family.lora_target_modules)
            denoiser.add_adapter(peft_config)
        cast_training_params(denoiser, dtype=torch.float32)

    def _setup_datasets(self, train_dataset, eval_dataset, args: DiffusionPreferenceConfig):
        """Wrap raw `datasets.Dataset`s in the method's dataset class; keep the training data's statistics."""
        train_dataset = self._wrap_dataset(train_dataset, args)
        self.train_dataset_stats = train_dataset.stats if isinstance(train_dataset, PreferenceDataset) else None
        if isinstance(train_dataset, StreamingPreferenceDataset):
            self.train_dataset_stats = PreparationStats()  # a stream's drops are counted from its batches
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._wrap_dataset(dataset, args) for name, dataset in eval_dataset.items()}
        else:
            eval_dataset = self._wrap_dataset(eval_dataset, args)
        refuse_eval_stream(eval_dataset)
        return train_dataset, eval_dataset

    def _setup_step_state(self, args: DiffusionPreferenceConfig) -> None:
        """The training step's own state: metrics, skip counts, the noise step, and its two watchdog callbacks."""
        self.add_callback(
            CollapseWarningCallback(
                self.accuracy_metric, args.collapse_warning_accuracy, args.collapse_warning_error_ratio
            )
        )
        # The step that seeds every training step's draws, or None for the optimizer step (see `trl_diffusion.noise`)
        self.fixed_noise_step: int | None = FIXED_NOISE_STEP if args.precompute_ref_errors else None
        self._metrics: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._skipped_rows = defaultdict(int)
        self._dropped_ties = defaultdict(int)  # ties of a stream, counted as its batches are read
        self.nonfinite_guard = NonFiniteGuard(self, max_skipped_steps=args.skip_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)
        # The family's encoding of the empty prompt, for caption dropout on cached data (set by the encoding cache)
        self._empty_prompt_embeds: dict[str, torch.Tensor] | None = None

    def _place_frozen_networks(self, denoiser: torch.nn.Module, args: DiffusionPreferenceConfig) -> None:
        """Move the frozen networks to the device; prepare (and compile) the reference as the policy is."""
        for module in self.family.frozen_modules().values():
            module.to(self.accelerator.device)
        if self.is_deepspeed_enabled:
            add_deepspeed_input_cast(denoiser)
        if self.ref_model is None:
            return
        # As TRL prepares its `ref_model`: replicated (DDP, ZeRO-1/2) or sharded (ZeRO-3, FSDP) like the policy.
        self.ref_model = prepare_frozen_model(self.ref_model, self.accelerator)
        distributed = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if args.torch_compile and not distributed and not args.precompute_ref_errors:
            # The frozen copy runs once per step like the policy: compile it as the Trainer compiles the policy.
            self.ref_model = torch.compile(
                self.ref_model, backend=args.torch_compile_backend, mode=args.torch_compile_mode
            )

    def _use_cached_data(self, cached: CachedData | None) -> None:
        """Train from the encoding caches; with stored reference errors, release the frozen reference copy."""
        if cached is None:
            return
        self.train_dataset, self.eval_dataset = cached.train_dataset, cached.eval_dataset
        self._empty_prompt_embeds = cached.empty_prompt_embeds
        self._skipped_rows["train"] += cached.num_skipped
        if cached.release_reference:
            # The reference's work is done: no reference model sits in memory during training.
            self.ref_model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _create_reference(self, ref_model, denoiser: torch.nn.Module) -> torch.nn.Module:
        """A frozen reference denoiser in the compute dtype: a copy of the initial policy unless one is given."""
        if ref_model is None:
            reference = type(denoiser).from_config(denoiser.config)
            reference.load_state_dict(denoiser.state_dict())
        elif isinstance(ref_model, torch.nn.Module):
            reference = ref_model
        else:
            subfolder = self.family.denoiser_name
            has_subfolder = os.path.isdir(os.path.join(str(ref_model), subfolder)) or not os.path.isdir(str(ref_model))
            reference = type(denoiser).from_pretrained(str(ref_model), subfolder=subfolder if has_subfolder else None)
        return _cast(reference.requires_grad_(False).eval(), self.weight_dtype)

    def _load_starting_adapter(self, pipeline: DiffusionPipeline, args, peft_config: PeftConfig | None) -> None:
        """Start the policy from the user's LoRA, loaded as the trained adapter ``"default"`` through the pipeline's
        own ``load_lora_weights`` (so every LoRA format diffusers reads works); with ``reference="base+adapter"`` and
        a method that has a reference, load it a second time as the frozen adapter ``"reference"``. Only LoRA
        weights are duplicated: the denoiser itself is never copied."""
        source = args.adapter_name_or_path
        if peft_config is not None:
            logger.warning(
                "adapter_name_or_path is set: training continues that LoRA with its own rank and target modules; "
                "the rank and targets of the given peft_config are not used."
            )
        names = ["default"] + (["reference"] if self.uses_reference and args.reference == "base+adapter" else [])
        for name in names:
            pipeline.load_lora_weights(source, adapter_name=name)
        denoised = [key for key, module in pipeline.components.items() if getattr(module, "peft_config", None)]
        if denoised != [self.family.denoiser_name]:
            raise ValueError(
                f"The LoRA {source!r} has layers for {denoised}; only a LoRA of the denoiser "
                f"({self.family.denoiser_name}) can be trained on (the text encoders are frozen)."
            )
        denoiser = self.family.denoiser
        denoiser.set_adapter("default")  # active and trainable; "reference" is inactive and frozen
        self.reference_adapter = "reference" if "reference" in names else None
        for name, parameter in denoiser.named_parameters():
            parameter.requires_grad_("lora_" in name and ".default." in name)

    def _wrap_dataset(self, dataset, args: DiffusionPreferenceConfig):
        if StreamingPreferenceDataset.accepts(dataset):
            return StreamingPreferenceDataset.for_trainer(dataset, args, self.dataset_class, self.family.is_video)
        if dataset is None or isinstance(dataset, PreferenceDataset) or not hasattr(dataset, "column_names"):
            return dataset
        if self.family.is_video:
            if self.dataset_class is not PreferenceDataset:
                raise NotImplementedError(
                    f"{type(self).__name__} trains on unpaired images; video families take preference pairs only."
                )
            return VideoPreferenceDataset.from_config(dataset, args, self.family)
        return self.dataset_class.from_config(dataset, args)

    # ----- the training step -----

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # Row indices and the skip count stay on the host: the per-pair noise is drawn there, without a device sync.
        host = {key: inputs.pop(key) for key in ("row_index", "num_skipped", "num_ties") if key in inputs}
        inputs = super()._prepare_inputs(inputs)
        inputs.update(host)
        return inputs

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE latents of a batch of images, encoded ``vae_encode_batch_size`` at a time, in float32."""
        chunks = pixel_values.split(self.args.vae_encode_batch_size)
        return torch.cat([self.family.encode_images(chunk) for chunk in chunks]).float()

    def _pair_draws(self, row_index: torch.Tensor, latent_shape: torch.Size, mode: str) -> tuple[PairDraws, PairDraws]:
        """The seeded draws of a batch's pairs (see `trl_diffusion.noise`): ``(on the device, on the host)``, the
        host copy for host-side decisions (the uncached caption dropout)."""
        step = noise_step(mode, self.state.global_step, self.fixed_noise_step)
        host = pair_randomness(row_index, latent_shape, seed=self.args.seed, step=step)
        return host.to(self.accelerator.device), host

    def _cached_prompt_embeds(
        self, prompt_embeds: dict[str, torch.Tensor], dropped: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Cached prompt embeddings, with the family's empty-prompt encoding where a pair's caption is dropped."""
        if dropped is None:
            return prompt_embeds
        output = {}
        for key, value in prompt_embeds.items():
            empty = self._empty_prompt_embeds[key].to(value.device, value.dtype)
            output[key] = torch.where(dropped.view(-1, *([1] * (value.dim() - 1))), empty, value)
        return output

    def prepare_step(self, inputs: dict[str, Any], mode: str = "train") -> DenoisingStep:
        """Encode a collated batch, or read its cached encodings, and draw its shared noise and timesteps (see
        [`DenoisingStep`][]). Nothing is copied from the device to the host: random decisions are made on the host
        (the uncached caption dropout) or on the device (the cached one, the flip of a cached pair)."""
        with torch.no_grad():
            cached = "latents" in inputs
            latents = inputs["latents"].float() if cached else self.encode_images(inputs["pixel_values"])
            draws, host_draws = self._pair_draws(inputs["row_index"], latents.shape[1:], mode)
            group_size = latents.shape[0] // len(inputs["row_index"])
            drop_rate = self.args.proportion_empty_prompts
            if cached:
                if "latents_flipped" in inputs:
                    flip = (draws.flip < 0.5).repeat(group_size).view(-1, *([1] * (latents.dim() - 1)))
                    latents = torch.where(flip, inputs["latents_flipped"].float(), latents)
                dropped = draws.caption_dropout < drop_rate if drop_rate > 0 else None
                prompt_embeds = self._cached_prompt_embeds(inputs["prompt_embeds"], dropped)
            else:
                prompts = list(inputs["prompts"])
                if drop_rate > 0:
                    dropped = (host_draws.caption_dropout < drop_rate).tolist()
                    prompts = ["" if drop else prompt for prompt, drop in zip(prompts, dropped, strict=True)]
                prompt_embeds = self.family.encode_prompt(prompts)
            conditioning = {key: torch.cat([value] * group_size) for key, value in prompt_embeds.items()}
            conditioning.update(self.family.image_conditioning(inputs))
            timesteps = self.family.timesteps_from_uniform(draws.timestep).repeat(group_size)
            noise = draws.noise.repeat(group_size, *([1] * (draws.noise.dim() - 1)))
            noisy_latents = self.family.noisy_input(latents, noise, timesteps)
            if self.args.channels_last and noisy_latents.dim() == 4:
                noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
            target = self.family.target(latents, noise, timesteps)
        return DenoisingStep(
            noisy_latents=noisy_latents,
            target=target,
            timesteps=timesteps,
            conditioning=conditioning,
            error_weights=self.family.error_weights(timesteps),
            inputs=inputs,
            mode=mode,
            group_size=group_size,
        )

    def denoising_errors(self, denoiser: torch.nn.Module, step: DenoisingStep) -> torch.Tensor:
        """Per-sample errors ``mean_{C,H,W} (prediction - target)^2`` of a denoiser, in float32, shape ``(2B,)``."""
        prediction = self.family.predict(denoiser, step.noisy_latents, step.timesteps, step.conditioning)
        errors = (prediction.float() - step.target.float()).pow(2).flatten(1).mean(dim=1)
        if step.error_weights is not None:
            errors = errors * step.error_weights
        return errors

    @contextmanager
    def reference_model(self, model: torch.nn.Module):
        """Yield the reference denoiser: the policy with adapters disabled (LoRA), the base with the frozen
        ``"reference"`` adapter (training on top of a LoRA with ``reference="base+adapter"``) or the frozen copy."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        if self.reference_adapter is not None:
            denoiser = self.accelerator.unwrap_model(model)
            denoiser.set_adapter(self.reference_adapter)
            try:
                yield model if is_compiled_module(model) else denoiser
            finally:
                denoiser.set_adapter("default")
            return
        if not self.is_peft:
            raise RuntimeError(
                "No reference model: with precompute_ref_errors the reference is released after its one pass, so "
                "only datasets given to the trainer at construction (which carry stored reference errors) can be used."
            )
        denoiser = self.accelerator.unwrap_model(model)
        denoiser.disable_adapters()
        try:
            # Under `torch_compile` the reference pass runs compiled too: the adapters' on/off flags are dynamo
            # guards, so the reference and the policy are two cached graphs, and nothing recompiles step to step.
            yield model if is_compiled_module(model) else denoiser
        finally:
            denoiser.enable_adapters()

    def auxiliary_errors(self, model: torch.nn.Module, step: DenoisingStep) -> dict[str, torch.Tensor]:
        """No-grad errors of other networks the method consults, computed before the policy's forward pass."""
        return {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        step = self.prepare_step(inputs, mode)
        # Every no-grad pass (reference, annotators) runs before the policy's forward, so switching adapters never
        # touches a live autograd graph. Autocast as for the policy (whose forward `accelerate` wraps): a full
        # fine-tune's frozen reference holds compute-dtype weights and takes the float32 latents.
        with torch.no_grad(), self.accelerator.autocast():
            if self.uses_reference and "ref_errors" in inputs:
                step.ref_errors = inputs["ref_errors"].float()  # precomputed (`precompute_ref_errors`)
            elif self.uses_reference:
                with self.reference_model(model) as reference:
                    step.ref_errors = self.denoising_errors(reference, step)
            step.auxiliary_errors = self.auxiliary_errors(model, step)
        policy_errors = self.denoising_errors(model, step)
        loss, metrics = self.preference_loss(step, policy_errors)
        if mode == "train":
            terms = {"loss": loss, "policy errors": policy_errors, "reference errors": step.ref_errors}
            terms.update({f"{name} errors": errors for name, errors in step.auxiliary_errors.items()})
            self.nonfinite_guard.observe(inputs["row_index"], terms)
        self._record_metrics(mode, metrics, step.timesteps[: len(step.timesteps) // step.group_size])
        self._skipped_rows[mode] += int(inputs.get("num_skipped", 0))
        self._dropped_ties[mode] += int(inputs.get("num_ties", 0))
        return (loss, metrics) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        # A data error on one process stops every process with its message (see `trainer/agreement.py`).
        fetch = super().get_batch_samples
        return fetch_in_agreement(self.accelerator, lambda: fetch(epoch_iterator, num_batches, device))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        # A non-finite loss stops (or skips) the step in `NonFiniteGuard`; it must not poison the logged running loss.
        return self.nonfinite_guard.loss_to_accumulate(super().training_step(model, inputs, num_items_in_batch))

    def preference_loss(
        self, step: DenoisingStep, policy_errors: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss from the ``(2B,)`` policy errors (and ``step.ref_errors``): ``(loss, per-pair metrics)``."""
        raise NotImplementedError

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`transformers.Trainer.evaluate`, accepting a raw `datasets.Dataset` in either preference schema."""
        eval_dataset = self._wrap_dataset(eval_dataset, self.args)
        refuse_eval_stream(eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def get_train_dataloader(self):
        # A stream is already split across processes: accelerate must not re-shard its loader.
        dataloader = super().get_train_dataloader()
        unshard_stream_loader(dataloader)
        return dataloader

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ----- metrics -----

    def _record_metrics(self, mode: str, metrics: dict[str, torch.Tensor], timesteps: torch.Tensor):
        """Accumulate per-pair metrics as on-device ``(sum, count)`` pairs: no host sync until logging."""
        store = self._metrics[mode]

        def add(key: str, values: torch.Tensor, mask: torch.Tensor | None = None):
            values = values.detach().float()
            mask = torch.ones_like(values) if mask is None else mask.float()
            total = torch.stack([(values * mask).sum(), mask.sum()])
            store[key] = store[key] + total if key in store else total

        for key, values in metrics.items():
            add(key, values)
        accuracy = metrics.get(self.accuracy_metric)
        if accuracy is not None:
            num_buckets, num_timesteps = self.args.timestep_buckets, self.family.num_train_timesteps
            bucket = (timesteps.float() / num_timesteps * num_buckets).long().clamp(0, num_buckets - 1)
            for b in range(num_buckets):
                low, high = round(b * num_timesteps / num_buckets), round((b + 1) * num_timesteps / num_buckets)
                add(f"{self.accuracy_metric}/t{low}-{high}", accuracy, bucket == b)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss", evaluation logs "eval_*"; other logs (e.g. from callbacks) leave metrics be.
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train" if "loss" in logs else None
        store = self._metrics[mode] if mode else {}
        if store:
            keys = sorted(store)
            totals = self.accelerator.reduce(torch.stack([store[key] for key in keys]), reduction="sum").tolist()
            prefix = "eval_" if mode == "eval" else ""
            for key, (total, count) in zip(keys, totals, strict=True):
                if count > 0:
                    logs[prefix + key] = total / count
            store.clear()
        if mode == "train" and self.train_dataset_stats is not None:
            stats = self.train_dataset_stats
            counts = [
                stats.num_ties + self._dropped_ties["train"],
                stats.num_invalid_labels + stats.num_invalid_captions,
            ]
            counts[1] += self._skipped_rows["train"]
            if isinstance(self.train_dataset, StreamingPreferenceDataset):  # each process read its own part
                counts = self.accelerator.reduce(torch.tensor(counts, device=self.accelerator.device), "sum").tolist()
            logs["data/dropped_ties"], logs["data/skipped_rows"] = counts
        if mode == "train":
            self.nonfinite_guard.update_logs(logs)
        super().log(logs, start_time)

    # ----- saving, loading and the Hub -----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`transformers.Trainer.train`; ``resume_from_checkpoint`` must be a complete checkpoint (``True``: the
        last complete one in ``output_dir``), else a clear error is raised before anything loads."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`transformers.Trainer.save_model`, refusing non-finite weights (see [`NonFiniteGuard`][])."""
        self.nonfinite_guard.check_weights(output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        # The manifest is written last, once every process has written its files: see `trainer/checkpoints.py`.
        checkpoint = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            begin_checkpoint(checkpoint)
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self.save_method_state(checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_checkpoint_complete(checkpoint, self.state.global_step)

    def save_method_state(self, checkpoint: str) -> None:
        """Write a method's own training state into a checkpoint folder (e.g. Adaptive-DPO's EMA annotators)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save LoRA weights in the diffusers format (or the full denoiser), and the model card. Safetensors only."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # `save_model` calls `_save` on every process (FSDP and DeepSpeed gather the state dict collectively first);
        # only the main process writes.
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        if self.is_peft:
            lora_state_dict = get_peft_model_state_dict(denoiser, state_dict=state_dict, adapter_name="default")
            metadata = denoiser.peft_config["default"].to_dict()
            self.family.save_lora_weights(output_dir, lora_state_dict, metadata)
            if "kohya" in self.args.save_lora_format:
                export_kohya_lora(
                    os.path.join(output_dir, LORA_WEIGHT_NAME), os.path.join(output_dir, KOHYA_WEIGHT_NAME)
                )
        elif state_dict is None:
            denoiser.save_pretrained(output_dir, safe_serialization=True)
        else:
            # A state dict gathered by FSDP or ZeRO-3: diffusers' `save_pretrained` has no `state_dict` argument (it
            # would save the sharded parameters), so write the config and the gathered weights in its layout.
            denoiser.save_config(output_dir)
            save_torch_state_dict(
                state_dict,
                output_dir,
                filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                max_shard_size="10GB",
            )
        with open(os.path.join(output_dir, "training_config.json"), "w") as f:
            f.write(self.args.to_json_string())
        self.create_model_card(output_dir=output_dir)

    def saved_model_files(self) -> list[str]:
        """Glob patterns of the files [`save_model`][] writes: what `push_to_hub` uploads, and nothing else."""
        # The validation images the model card shows as its widget gallery, if any
        common = ["README.md", "training_config.json"] + [
            entry["output"]["url"] for entry in read_widget(self.args.output_dir) or []
        ]
        if self.is_peft:
            kohya = [KOHYA_WEIGHT_NAME] if "kohya" in self.args.save_lora_format else []
            return [LORA_WEIGHT_NAME, *kohya, *common]
        return ["config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.json", *common]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_peft:
            prefix = f"{self.family.denoiser_name}."
            state_dict = load_file(os.path.join(resume_from_checkpoint, LORA_WEIGHT_NAME))
            state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
            result = set_peft_model_state_dict(denoiser, state_dict, adapter_name="default")
            if result.unexpected_keys:
                raise ValueError(
                    f"Checkpoint {resume_from_checkpoint} has unexpected LoRA keys {result.unexpected_keys[:5]}."
                )
        else:
            state_dict = _load_safetensors_weights(resume_from_checkpoint, "diffusion_pytorch_model.safetensors")
            denoiser.load_state_dict(state_dict, strict=True)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """Write the Hub model card (``README.md``) beside the saved weights."""
        if not self.is_world_process_zero():
            return
        dataset = getattr(self.train_dataset, "dataset", None)
        dataset_name = getattr(getattr(dataset, "info", None), "dataset_name", None)
        write_model_card(
            output_dir or self.args.output_dir,
            base_model=self.model_name_or_path,
            pipeline_class=type(self.family.pipeline).__name__,
            method_name=self._name,
            paper=self._paper,
            tags=self._tag_names + (["lora"] if self.is_peft else []),
            hyperparameters=self.model_card_hyperparameters(),
            dataset_name=kwargs.get("dataset_name") or dataset_name,
            is_lora=self.is_peft,
            hub_model_id=self.hub_model_id,
            denoiser_class=type(self.family.denoiser).__name__,
            denoiser_name=self.family.denoiser_name,
            instance_prompt=kwargs.get("instance_prompt"),
        )

    def model_card_hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters listed in the model card; methods add theirs."""
        args = self.args
        values = {
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size (pairs)": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_steps": self.state.max_steps if self.state.max_steps > 0 else args.max_steps,
            "resolution": args.resolution,
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            "seed": args.seed,
        }
        if self.is_peft:
            config = self.accelerator.unwrap_model(self.model).peft_config["default"]
            values.update({"lora_rank": config.r, "lora_alpha": config.lora_alpha})
        return values

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision=None,
        **kwargs,
    ):
        """Save the model and upload exactly the saved files (weights, model card, config) to the Hub."""
        from huggingface_hub import HfApi

        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        if kwargs:  # card details given here, as TRL's push_to_hub takes them: dataset_name, instance_prompt
            self.create_model_card(**kwargs)
        return HfApi(token=token).upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            revision=revision or self.args.hub_revision,
            allow_patterns=self.saved_model_files(),
            run_as_future=not blocking,
        )
