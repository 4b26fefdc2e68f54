import math
from dataclasses import dataclass, field

import torch
from trl.trainer.base_config import _BaseConfig

from ..image_urls import ImageURLOptions


# Densities of the flow-matching noise level, and weightings of the velocity error (see `models/flow_matching.py`)
FLOW_TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
FLOW_LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _bf16_accelerator_available() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()


@dataclass
class DiffusionPreferenceConfig(_BaseConfig):
    """Fields shared by every trl_diffusion trainer: data preparation, augmentation and training-step options.

    It subclasses TRL's own base configuration (TRL's defaults: `logging_steps=10`, bf16 unless `fp16` is set), which
    subclasses `transformers.TrainingArguments`. Only the defaults that differ for diffusion training are changed.

    The parameters come in groups: data and training step; model-family options (see `docs/supported_models.md`);
    video families (see `docs/data.md`); speed and memory (see `docs/performance.md`); saving (see
    `docs/training.md`).

    Args:
        resolution: Side of the square training images. Each image's shorter side is resized to it, then it is cropped.
            Defaults to `512`.
        random_crop: Crop each pair at one random offset (the same for both images) instead of the centre. Defaults to
            `False`.
        random_flip: Flip each pair horizontally (both images together) with probability 1/2. Defaults to `False`.
        drop_ties: Drop pairs labelled as ties (`label_0 == 0.5`); the count is logged. A pairwise loss needs a winner,
            so `False` is rejected with an error rather than silently treated as a preference. Defaults to `True`.
        skip_invalid_rows: Skip rows with an unreadable image, a missing caption or a bad label, and log their count.
            By default such a row raises a `ValueError` that names its index and column. Defaults to `False`.
        caption_column: Prompt column of a Pick-a-Pic-style dataset. TRL-style datasets use `prompt`. Defaults to
            `"caption"`.
        image_columns: The two image columns of a Pick-a-Pic-style dataset. TRL-style datasets use `chosen` and
            `rejected`. Defaults to `["jpg_0", "jpg_1"]`.
        label_column: Label column: 1 if the first image is preferred, 0 if the second is, 0.5 for a tie. Defaults to
            `"label_0"`.
        confidence_column: Optional column of per-pair prior confidence in `[0, 1]` (for example the agreement rate of
            several annotators), used by methods that weight pairs (Adaptive-DPO). Defaults to `None`.
        image_url_timeout: Image cells holding http(s) URLs are fetched in the data-loader workers: seconds each
            attempt may wait for the connection and for each read (see `docs/data.md`). Defaults to `10.0`.
        image_url_retries: Attempts after the first for an image URL that fails (a timeout, a refused connection, a
            5xx status); a 404, 410, 400, 401 or 403 fails at once. Defaults to `3`.
        image_url_backoff: Seconds before the first retry of an image URL; each further retry waits twice as long.
            Defaults to `1.0`.
        skip_unreachable_urls: Skip a pair whose image URL is still unreachable after the retries (logged with its
            row and column, and counted in `data/skipped_rows`) instead of raising an error that names them;
            `skip_invalid_rows` skips such pairs too. Defaults to `False`.
        proportion_empty_prompts: Fraction of pairs whose prompt is replaced by the empty prompt (caption dropout, for
            classifier-free guidance). The prompt is dropped for both images of a pair, never one. Defaults to `0.0`.
        vae_encode_batch_size: Images the VAE encodes at once; lower it to save memory at large resolutions. Defaults
            to `8`.
        timestep_buckets: Number of equal timestep ranges over which the preference accuracy is also logged. Defaults
            to `4`.
        skip_nonfinite_steps: Optimizer steps with a non-finite loss, error or gradient that may be skipped (the update
            is dropped, and `nonfinite/skipped_steps` is logged) before training stops with a `NonFiniteError`. `0`
            stops at the first one. The logged loss is the mean over the finite micro-batches (`nan` if none). The fp16
            `GradScaler`'s own overflow skips are not counted. Defaults to `0`.
        gradient_checkpointing: Enable the denoiser's own gradient checkpointing (`enable_gradient_checkpointing()`),
            trading compute for memory: an alias of transformers' `activation_checkpointing`, which does the same. Both
            default to off (TRL turns it on; a diffusion denoiser trains without it unless memory is short). Defaults
            to `None` (off).
        learning_rate: Initial AdamW learning rate; the default suits LoRA. Full fine-tuning usually wants 1e-7 to
            1e-6. Defaults to `1e-5`.
        dataloader_num_workers: Data-loader worker processes; images are decoded and transformed there, off the
            training process. Defaults to `2`.
        remove_unused_columns: Kept `False`: the trainers select their columns themselves. Defaults to `False`.
        adapter_name_or_path: Train on top of an existing LoRA: a folder or Hub id in a LoRA format the pipeline's
            `load_lora_weights` reads. The policy starts from it (with its own rank and target modules) and the saved
            adapter is the trained version of it. LoRA training only; no copy of the denoiser is made (see
            `docs/training.md`). Defaults to `None`.
        reference: With `adapter_name_or_path`: the reference is the base plus that LoRA, frozen (`"base+adapter"`,
            held as a second, frozen adapter), or the base alone (`"base"`, the adapters disabled). Defaults to
            `"base+adapter"`.
        collapse_warning_accuracy: Warn once (in the logs) when `rewards/chosen` falls below zero while the preference
            accuracy is at least this: a sign of a collapsing run (see `docs/guards.md`). `None` turns the check off.
            Defaults to `0.95`.
        collapse_warning_error_ratio: Warn once when the policy's error on the chosen images exceeds the reference's by
            this factor (`mse/policy_chosen > ratio · mse/ref_chosen`). `None` turns the check off. Defaults to `1.25`.

    Args: Model-family options:
        pretrained_vae_model_name_or_path: SDXL: a VAE folder or Hub id that replaces the pipeline's VAE, such as the
            fp16-fix VAE `madebyollin/sdxl-vae-fp16-fix` (a folder with a `vae` subfolder also works). Defaults to
            `None`.
        upcast_vae: SDXL: run the frozen VAE in float32 whatever the mixed precision, since SDXL's own VAE overflows in
            float16. `None` means `True` for the pipeline's own VAE and `False` (the compute dtype) when
            `pretrained_vae_model_name_or_path` is given. Defaults to `None`.
        weighting_scheme: Flow matching (SD3, Flux): density of the training noise level `σ`, as in the diffusers
            SD3/Flux training examples: `"uniform"`, `"logit_normal"` (`σ = sigmoid(n)`,
            `n ~ N(logit_mean, logit_std²)`) or `"mode"` (`σ = 1 − u − mode_scale·(cos²(πu/2) − 1 + u)`). The
            scheduler's static `shift` is applied afterwards, as the examples do through `scheduler.timesteps`.
            Defaults to `"logit_normal"`.
        logit_mean: Mean of the `"logit_normal"` density. Defaults to `0.0`.
        logit_std: Standard deviation of the `"logit_normal"` density. Defaults to `1.0`.
        mode_scale: Scale of the `"mode"` density (SD3 paper, Eq. 20); it must lie in `[-1, 2/(π − 2)]`. Defaults to
            `1.29`.
        flow_loss_weighting: Flow matching: weight of each velocity error, as the diffusers examples offer it:
            `"none"`, `"sigma_sqrt"` (`σ⁻²`) or `"cosmap"` (`2 / (π·(1 − 2σ + 2σ²))`). Defaults to `"none"`.
        epsilon_equivalent_errors: Flow matching: multiply each velocity error by `(1 − σ)²`, which makes it the error
            of the noise `ε` implied by the velocity prediction (`ε̂ − ε = (1 − σ)·(v̂ − v)`). Errors are then on the
            scale of the ε-prediction families, and so is `beta`. Defaults to `False`.
        max_sequence_length: SD3, Flux: tokens of the T5 prompt embedding. `None` takes the pipeline's default (SD3
            256, Flux 512), capped at the T5 tokenizer's `model_max_length`. Flux.2, Qwen-Image, Z-Image: tokens of the
            chat-formatted prompt (default 512), the fixed length of the embeddings (padding is masked where the model
            has a mask). Defaults to `None`.
        guidance_scale: Flux, Flux.2, Qwen-Image: value fed to the guidance embedding of guidance-distilled
            transformers (`guidance_embeds`, such as FLUX.1 dev and FLUX.2 dev) during training, as the diffusers Flux
            training example does. Unused otherwise. Defaults to `3.5`.
        resolution_shift: Flow matching with a scheduler that shifts its noise levels by image size
            (`use_dynamic_shifting`): shift the training `σ` with the pipeline's `μ` for `resolution`, as the pipeline
            does at inference. `None`: the family's default (on for Flux.2 and Qwen-Image, off for Flux.1 as in the
            diffusers example). `True` is an error for a scheduler with a static shift (SD3, Z-Image). Defaults to
            `None`.

    Args: Video families (Wan):
        num_frames: Frames of each training clip. `None` takes the family's default (Wan: 81, i.e. 5 s at 16 fps); Wan
            needs `4k + 1`. Defaults to `None`.
        frame_stride: Take every `frame_stride`-th frame of the source video, so a clip spans
            `(num_frames − 1)·stride + 1` source frames. A video shorter than that raises an error naming its row and
            column. Defaults to `1`.
        temporal_crop: Where each pair's clip starts, at the same relative position in both videos: `"start"` (the
            first frames; only they are decoded), `"center"`, or `"random"` (one random position per pair and epoch;
            like `random_crop` it turns the encoding cache off). Defaults to `"start"`.
        video_columns: The two video columns of a Pick-a-Pic-style video dataset (TRL-style datasets use `chosen` and
            `rejected`). Each cell is encoded video bytes (mp4, webm...), a video file path, a folder of frame images,
            a list of frames or a `datasets.Video` value. Defaults to `["video_0", "video_1"]`.
        video_size: `[height, width]` of the training frames (Wan 2.1 480p: `[480, 832]`). `None`: `resolution`
            squared. Defaults to `None`.

    Args: Speed and memory:
        precompute_encodings: Encode every pair's images (VAE latents) and prompt (the family's prompt embeddings)
            once, before training (every process its shards; one embedding per distinct prompt), and train from that
            cache: no VAE or text encoder runs during training, and a rerun on the same data and model reuses the
            cache. `None` means on whenever the encodings are a function of the pair alone, i.e. unless `random_crop`
            or `temporal_crop="random"` is set (random crops stay on the per-step path; setting both is an error). With
            `random_flip` both flips are cached (twice the latent storage) and each step picks one per pair. Defaults
            to `None`.
        encodings_cache_dir: Folder of the encoding caches, one that every process sees. `None`: beside the dataset's own cache files (a
            dataset from `load_dataset`), or `<HF_DATASETS_CACHE>/trl_diffusion_encodings` for an in-memory dataset.
            Defaults to `None`.
        precompute_ref_errors: Methods with a reference (Diffusion-DPO, Adaptive-DPO): compute the reference's errors
            of every pair in one no-grad pass before training, store them in the encoding cache, and release the
            reference model, so full fine-tuning holds no reference in memory during training. Each pair's noise,
            timestep, flip and caption dropout are then fixed for the whole run (drawn with `pair_seed(seed, 0, row)`),
            where they otherwise change every step. Needs the encoding cache. Defaults to `False`.
        channels_last: Keep the denoiser's weights and its latent inputs in the channels-last memory format. It speeds
            up UNet convolutions on recent NVIDIA GPUs under bf16/fp16 autocast; it does nothing for the transformer
            families (SD3, Flux) and little on CPU. Defaults to `False`.
        load_in_4bit: QLoRA: load the denoiser's frozen base weights in 4 bits with bitsandbytes (diffusers'
            `BitsAndBytesConfig`) when the model is given as a path or Hub id. Needs a `peft_config` and a GPU.
            Defaults to `False`.
        load_in_8bit: Like `load_in_4bit`, in 8 bits (LLM.int8()). Defaults to `False`.
        bnb_4bit_quant_type: 4-bit data type: `"nf4"` (NormalFloat, the QLoRA paper's) or `"fp4"`. Defaults to `"nf4"`.
        bnb_4bit_compute_dtype: Dtype of the 4-bit layers' matrix multiplications: `"bfloat16"`, `"float16"` or
            `"float32"`. `None` takes the mixed-precision dtype (bf16, fp16, else float32). Defaults to `None`.
        bnb_4bit_use_double_quant: Also quantize the 4-bit quantization constants (about 0.4 bits per parameter saved).
            Defaults to `False`.

    Args: Saving:
        save_lora_format: LoRA files each save of a LoRA run writes. The diffusers file
            (`pytorch_lora_weights.safetensors`, what `load_lora_weights` and resuming read) is always written;
            `"kohya"` adds `pytorch_lora_weights_kohya.safetensors` in the kohya key format that ComfyUI, Forge and
            kohya's scripts load (see `docs/training.md`). A full fine-tune saves the denoiser in the diffusers format
            only. Defaults to `["diffusers"]`.
    """

    resolution: int = field(default=512, metadata={"help": "Side of the square training images."})
    random_crop: bool = field(
        default=False, metadata={"help": "Crop each pair at one random offset instead of the centre."}
    )
    random_flip: bool = field(
        default=False, metadata={"help": "Flip each pair horizontally (both images) with probability 1/2."}
    )
    drop_ties: bool = field(default=True, metadata={"help": "Drop pairs labelled as ties (0.5); the count is logged."})
    skip_invalid_rows: bool = field(
        default=False,
        metadata={
            "help": "Skip rows with unreadable images or bad labels/captions (counted and logged) instead of raising."
        },
    )
    caption_column: str = field(default="caption", metadata={"help": "Prompt column of a Pick-a-Pic-style dataset."})
    image_columns: list[str] = field(
        default_factory=lambda: ["jpg_0", "jpg_1"],
        metadata={"help": "The two image columns of a Pick-a-Pic-style dataset."},
    )
    label_column: str = field(
        default="label_0", metadata={"help": "Label column: 1 if the first image is preferred, 0 if not, 0.5 tie."}
    )
    confidence_column: str | None = field(
        default=None, metadata={"help": "Optional column of per-pair prior confidence in [0, 1]."}
    )
    image_url_timeout: float = field(
        default=10.0, metadata={"help": "Seconds each attempt to fetch an image URL may wait (connection, reads)."}
    )
    image_url_retries: int = field(default=3, metadata={"help": "Retries of an image URL that fails."})
    image_url_backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry of an image URL (doubling after)."}
    )
    skip_unreachable_urls: bool = field(
        default=False,
        metadata={"help": "Skip (and count) pairs whose image URL stays unreachable instead of raising."},
    )
    proportion_empty_prompts: float = field(
        default=0.0, metadata={"help": "Fraction of pairs whose prompt is dropped (for both images)."}
    )
    vae_encode_batch_size: int = field(default=8, metadata={"help": "Images the VAE encodes at once."})
    timestep_buckets: int = field(
        default=4, metadata={"help": "Number of timestep ranges over which accuracy is also logged."}
    )
    skip_nonfinite_steps: int = field(
        default=0,
        metadata={"help": "Non-finite optimizer steps to skip (counted in the logs) before training stops; 0: stop."},
    )
    # TRL turns checkpointing on by default; a diffusion denoiser trains without it unless memory is short, so the
    # transformers default (off) is restored. Either `activation_checkpointing` or its alias enables it.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Alias of `activation_checkpointing`: enable the denoiser's own gradient checkpointing."},
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate."})
    dataloader_num_workers: int = field(
        default=2, metadata={"help": "Data-loader worker processes (images are decoded there)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainers select their columns themselves."}
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Train on top of this LoRA (a folder or Hub id in a format load_lora_weights reads)."},
    )
    reference: str = field(
        default="base+adapter",
        metadata={
            "help": "With adapter_name_or_path: the reference is the base plus that LoRA (frozen) or the base alone.",
            "choices": ["base+adapter", "base"],
        },
    )
    collapse_warning_accuracy: float | None = field(
        default=0.95,
        metadata={"help": "Warn once when rewards/chosen < 0 while accuracy >= this (None: off)."},
    )
    collapse_warning_error_ratio: float | None = field(
        default=1.25,
        metadata={
            "help": "Warn once when the policy's chosen error exceeds the reference's by this factor (None: off)."
        },
    )
    pretrained_vae_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "SDXL: a VAE folder or Hub id replacing the pipeline's (e.g. the fp16-fix VAE)."},
    )
    upcast_vae: bool | None = field(
        default=None,
        metadata={
            "help": "SDXL: run the VAE in float32. None: True, unless pretrained_vae_model_name_or_path is set."
        },
    )
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={
            "help": "Flow matching: density of the noise level sigma.",
            "choices": list(FLOW_TIMESTEP_DENSITIES),
        },
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit_normal density."})
    logit_std: float = field(default=1.0, metadata={"help": "Standard deviation of the logit_normal density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the mode density, in [-1, 2/(pi - 2)]."})
    flow_loss_weighting: str = field(
        default="none",
        metadata={"help": "Flow matching: weight of the velocity errors.", "choices": list(FLOW_LOSS_WEIGHTINGS)},
    )
    epsilon_equivalent_errors: bool = field(
        default=False,
        metadata={"help": "Flow matching: weight velocity errors by (1 - sigma)^2, the error of the implied noise."},
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={"help": "SD3, Flux: T5 prompt tokens. None: the pipeline's default (SD3 256, Flux 512)."},
    )
    guidance_scale: float = field(
        default=3.5, metadata={"help": "Flux: guidance embedding value of guidance-distilled transformers."}
    )
    resolution_shift: bool | None = field(
        default=None,
        metadata={
            "help": "Flow matching with a dynamic-shift scheduler: shift the training sigma by the resolution's mu, "
            "as at inference. None: the family's default (Flux.2, Qwen-Image on; Flux.1 off)."
        },
    )
    num_frames: int | None = field(
        default=None, metadata={"help": "Video: frames per training clip. None: the family's default (Wan: 81)."}
    )
    frame_stride: int = field(default=1, metadata={"help": "Video: take every N-th frame of the source video."})
    temporal_crop: str = field(
        default="start",
        metadata={
            "help": "Video: where each pair's clip starts (same relative position in both videos).",
            "choices": ["start", "center", "random"],
        },
    )
    video_columns: list[str] = field(
        default_factory=lambda: ["video_0", "video_1"],
        metadata={"help": "The two video columns of a Pick-a-Pic-style video dataset."},
    )
    video_size: list[int] | None = field(
        default=None, metadata={"help": "Video: [height, width] of the training frames. None: resolution squared."}
    )
    precompute_encodings: bool | None = field(
        default=None,
        metadata={
            "help": "Encode images and prompts once, before training, and train from that cache. None: on unless "
            "crops are random."
        },
    )
    encodings_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the encoding cache. None: beside the dataset's cache files, else "
            "<HF_DATASETS_CACHE>/trl_diffusion_encodings."
        },
    )
    precompute_ref_errors: bool = field(
        default=False,
        metadata={
            "help": "Compute reference errors once before training (fixed noise and timestep per pair) and release "
            "the reference model."
        },
    )
    channels_last: bool = field(
        default=False, metadata={"help": "Channels-last memory format for the denoiser and its latent inputs."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the denoiser's frozen base in 4 bits (bitsandbytes, GPU)."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the denoiser's frozen base in 8 bits (bitsandbytes, GPU)."}
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Compute dtype of the 4-bit layers. None: the mixed-precision dtype.",
            "choices": ["bfloat16", "float16", "float32"],
        },
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "Also quantize the 4-bit quantization constants."}
    )
    save_lora_format: list[str] = field(
        default_factory=lambda: ["diffusers"],
        metadata={"help": "LoRA files to write: diffusers (always) and/or kohya (ComfyUI, Forge, kohya scripts)."},
    )

    @property
    def uncacheable_reason(self) -> str | None:
        """Why a pair's encodings are not a function of the pair alone (so cannot be cached), or ``None``.

        The one place of the rule: random crops (``random_crop``, ``temporal_crop="random"``) change every epoch;
        flips do not count, since both flips are cached.
        """
        if self.random_crop:
            return "random_crop=True changes each pair's crop every epoch"
        if self.temporal_crop == "random":
            return "temporal_crop='random' changes each pair's clip every epoch"
        return None

    @property
    def encodings_cached(self) -> bool:
        """Whether the trainer trains from the encoding cache: ``precompute_encodings``, and by default (``None``)
        whenever the encodings can be cached (see [`uncacheable_reason`][])."""
        if self.precompute_encodings is None:
            return self.uncacheable_reason is None
        return self.precompute_encodings

    def _check_video_options(self):
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}.")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be at least 1, got {self.frame_stride}.")
        if self.temporal_crop not in ("start", "center", "random"):
            raise ValueError(f"temporal_crop must be 'start', 'center' or 'random', got {self.temporal_crop!r}.")
        if len(self.video_columns) != 2:
            raise ValueError(f"video_columns must name exactly two columns, got {self.video_columns}.")
        if self.video_size is not None and (len(self.video_size) != 2 or min(self.video_size) < 1):
            raise ValueError(f"video_size must be [height, width], got {self.video_size}.")

    def _check_flow_options(self) -> None:
        """The flow-matching timestep density and loss weighting."""
        if self.weighting_scheme not in FLOW_TIMESTEP_DENSITIES:
            hint = ""
            if self.weighting_scheme in FLOW_LOSS_WEIGHTINGS:
                # The diffusers examples name density and weighting with one argument; theirs sample sigma uniformly
                hint = f" The examples' {self.weighting_scheme!r} is flow_loss_weighting="
                hint += f"{self.weighting_scheme!r} with weighting_scheme='uniform'."
            raise ValueError(
                f"weighting_scheme must be one of {FLOW_TIMESTEP_DENSITIES}, got {self.weighting_scheme!r}.{hint}"
            )
        if self.flow_loss_weighting not in FLOW_LOSS_WEIGHTINGS:
            raise ValueError(
                f"flow_loss_weighting must be one of {FLOW_LOSS_WEIGHTINGS}, got {self.flow_loss_weighting!r}."
            )
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {self.logit_std}.")
        if not -1.0 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ValueError(
                f"mode_scale must be in [-1, 2/(pi - 2)] for the mode density to be valid, got {self.mode_scale}."
            )

    def _check_saving_and_quantization_options(self) -> None:
        """The LoRA file formats and the bitsandbytes options."""
        unknown_formats = sorted(set(self.save_lora_format) - {"diffusers", "kohya"})
        if unknown_formats:
            raise ValueError(f"save_lora_format takes 'diffusers' and/or 'kohya', got {unknown_formats}.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("Set at most one of load_in_4bit and load_in_8bit.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}.")
        if self.bnb_4bit_compute_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(
                "bnb_4bit_compute_dtype must be None, 'bfloat16', 'float16' or 'float32', "
                f"got {self.bnb_4bit_compute_dtype!r}."
            )

    def __post_init__(self):
        # TRL resolves an unset `bf16` to `not fp16`, which transformers then rejects on a machine without a bf16
        # accelerator. Resolve it to bf16 only where the hardware has it, so the same config runs on a laptop.
        if self.bf16 is None:
            self.bf16 = not self.fp16 and not self.use_cpu and _bf16_accelerator_available()
        super().__post_init__()
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}.")
        if len(self.image_columns) != 2:
            raise ValueError(f"image_columns must name exactly two columns, got {self.image_columns}.")
        if self.reference not in ("base+adapter", "base"):
            raise ValueError(f"reference must be 'base+adapter' or 'base', got {self.reference!r}.")
        if self.timestep_buckets < 1:
            raise ValueError(f"timestep_buckets must be at least 1, got {self.timestep_buckets}.")
        if self.skip_nonfinite_steps < 0:
            raise ValueError(f"skip_nonfinite_steps must be at least 0, got {self.skip_nonfinite_steps}.")
        if self.vae_encode_batch_size < 1:
            raise ValueError(f"vae_encode_batch_size must be at least 1, got {self.vae_encode_batch_size}.")
        self._check_flow_options()
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be at least 1, got {self.max_sequence_length}.")
        self._check_video_options()
        ImageURLOptions.from_config(self)  # checks the image URL options
        if self.precompute_encodings and self.uncacheable_reason is not None:
            raise ValueError(
                f"precompute_encodings caches one fixed crop of each pair; {self.uncacheable_reason}. Leave "
                "precompute_encodings unset (or False) to train with random crops."
            )
        if self.precompute_ref_errors and not self.encodings_cached:
            raise ValueError(
                "precompute_ref_errors needs the encoding cache (precompute_encodings, no random_crop or "
                "temporal_crop='random'): each pair's stored reference error is for one fixed latent, noise and "
                "timestep."
            )
        self._check_saving_and_quantization_options()
