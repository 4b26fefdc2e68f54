"""
On-policy preference pairs: sample a pipeline N times per prompt, score the images with a reward model, pair them.

# PickScore pairs from SDXL on 8 GPUs, pushed to the Hub
```bash
trl-diffusion generate-pairs --accelerate_config multi_gpu --num_processes 8 \
    --model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --dtype bfloat16 \
    --dataset_name pickapic-anonymous/pickapic_v1 --dataset_split "validation_unique" --prompt_column caption \
    --scorer pickscore --images_per_prompt 4 --min_reward_gap 0.5 \
    --num_inference_steps 30 --output_dir sdxl-pickscore-pairs \
    --push_to_hub --hub_dataset_id me/sdxl-pickscore-pairs
```

# A CPU smoke run with the offline tiny model and a rule-based reward
```bash
trl-diffusion generate-pairs --config examples/pairs/generate_pairs_tiny.yaml
```

The output folder trains directly: `trl-diffusion dpo --dataset_name sdxl-pickscore-pairs ...`.
"""

import argparse
import logging
import os
from dataclasses import dataclass, field


logger = logging.getLogger(__name__)


@dataclass
class GeneratePairsConfig:
    """Arguments of `trl-diffusion generate-pairs` (the model to sample comes from [`DiffusionModelConfig`][]).

    Args:
        prompts: Prompts to sample. Exactly one of `prompts`, `prompts_file` and `dataset_name` must be given. Defaults
            to `None`.
        prompts_file: A text file with one prompt per line (blank lines are skipped). Defaults to `None`.
        dataset_name: A dataset (Hub id, folder or data file) whose `prompt_column` holds the prompts. Defaults to
            `None`.
        dataset_config: Configuration name of `dataset_name`. Defaults to `None`.
        dataset_split: Split of `dataset_name`. Defaults to `"train"`.
        prompt_column: Prompt column of `dataset_name`. Defaults to `"caption"`.
        max_prompts: Use at most this many prompts (after removing duplicates). Defaults to `None`.
        deduplicate_prompts: Sample each distinct prompt once (Pick-a-Pic repeats captions); the number removed is
            logged. Defaults to `True`.
        lora_name_or_path: A LoRA (diffusers format) loaded into the pipeline before sampling, to sample a tuned
            policy. Defaults to `None`.
        scorer: Reward model: `pickscore`, `hpsv2`, `imagereward`, `aesthetic`, `clip`, or a rule-based `redness`,
            `saturation`, `frame`. Defaults to `"pickscore"`.
        scorer_model_name_or_path: The scorer's model: a CLIP folder or Hub id (`pickscore`, `clip`, `aesthetic`), or
            the checkpoint file of `hpsv2` and `imagereward`. `None` takes the scorer's published default. Defaults to
            `None`.
        scorer_processor_name_or_path: `pickscore`, `clip`: the CLIP processor, when it is not beside the model.
            Defaults to `None`.
        aesthetic_head: `aesthetic`: the head's weights (file or URL); `None` takes the published LAION head. Defaults
            to `None`.
        hps_version: `hpsv2` without a checkpoint: which published checkpoint to download (`v2.1` or `v2.0`). Defaults
            to `"v2.1"`.
        images_per_prompt: Images sampled per prompt. Defaults to `4`.
        min_reward_gap: Drop pairs whose score gap is below this (and ties); the count is logged. Defaults to `0.0`.
        pairing: `best_worst` (one pair per prompt) or `all` (every pair above the gap). Defaults to `"best_worst"`.
        seed: Image `j` of prompt `i` uses seed `seed + i * images_per_prompt + j`. Defaults to `0`.
        batch_size: Images generated at once. Defaults to `8`.
        num_inference_steps: Denoising steps per image. Defaults to `30`.
        guidance_scale: Classifier-free guidance scale; `None` keeps the pipeline's default. Defaults to `None`.
        height: Image height; `None` keeps the pipeline's default. Defaults to `None`.
        width: Image width; `None` keeps the pipeline's default. Defaults to `None`.
        output_dir: Where the dataset is written. Defaults to `"preference_pairs"`.
        output_format: `disk` (`Dataset.save_to_disk`) or `parquet` (one `train-*.parquet` file per process). Defaults
            to `"disk"`.
        push_to_hub: Also upload the dataset to `hub_dataset_id`. Defaults to `False`.
        hub_dataset_id: Hub dataset repository to push to. Defaults to `None`.
        hub_private: Create the Hub repository private. Defaults to `None`.
        use_cpu: Run on the CPU even where an accelerator is present; with `--multi_gpu --num_processes N` it starts N
            CPU processes that talk over gloo. Defaults to `False`.
    """

    prompts: list[str] | None = field(default=None, metadata={"help": "Prompts to sample."})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file with one prompt per line."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset whose prompt_column holds the prompts."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of dataset_name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name."})
    prompt_column: str = field(default="caption", metadata={"help": "Prompt column of dataset_name."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts."})
    deduplicate_prompts: bool = field(default=True, metadata={"help": "Sample each distinct prompt once."})
    lora_name_or_path: str | None = field(default=None, metadata={"help": "LoRA loaded before sampling."})
    scorer: str = field(
        default="pickscore",
        metadata={
            "help": "Reward model.",
            "choices": ["pickscore", "hpsv2", "imagereward", "aesthetic", "clip", "redness", "saturation", "frame"],
        },
    )
    scorer_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The scorer's CLIP model, or the hpsv2/imagereward checkpoint file."}
    )
    scorer_processor_name_or_path: str | None = field(default=None, metadata={"help": "pickscore/clip: processor."})
    aesthetic_head: str | None = field(default=None, metadata={"help": "aesthetic: the head's weights."})
    hps_version: str = field(default="v2.1", metadata={"help": "hpsv2: published checkpoint to download."})
    images_per_prompt: int = field(default=4, metadata={"help": "Images sampled per prompt."})
    min_reward_gap: float = field(default=0.0, metadata={"help": "Drop pairs with a smaller score gap."})
    pairing: str = field(
        default="best_worst", metadata={"help": "How pairs are formed.", "choices": ["best_worst", "all"]}
    )
    seed: int = field(default=0, metadata={"help": "Base seed of the images."})
    batch_size: int = field(default=8, metadata={"help": "Images generated at once."})
    num_inference_steps: int = field(default=30, metadata={"help": "Denoising steps per image."})
    guidance_scale: float | None = field(default=None, metadata={"help": "Guidance scale (None: pipeline default)."})
    height: int | None = field(default=None, metadata={"help": "Image height (None: pipeline default)."})
    width: int | None = field(default=None, metadata={"help": "Image width (None: pipeline default)."})
    output_dir: str = field(default="preference_pairs", metadata={"help": "Where the dataset is written."})
    output_format: str = field(
        default="disk", metadata={"help": "Dataset format on disk.", "choices": ["disk", "parquet"]}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Also push the dataset to hub_dataset_id."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repository."})
    hub_private: bool | None = field(default=None, metadata={"help": "Create the Hub repository private."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU (gloo processes under --multi_gpu)."})

    def __post_init__(self):
        sources = [name for name in ("prompts", "prompts_file", "dataset_name") if getattr(self, name)]
        if len(sources) != 1:
            raise ValueError(f"Give exactly one of prompts, prompts_file and dataset_name; got {sources or 'none'}.")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("push_to_hub needs hub_dataset_id (e.g. `me/my-pairs`).")


def load_prompts(args: GeneratePairsConfig) -> list[str]:
    """The prompts ``args`` names, deduplicated (first occurrence kept) and capped at ``max_prompts``."""
    if args.prompts:
        prompts = list(args.prompts)
    elif args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        from trl import ScriptArguments

        from trl_diffusion.scripts.utils import load_preference_dataset, select_split

        dataset = load_preference_dataset(ScriptArguments(args.dataset_name, dataset_config=args.dataset_config))
        dataset = select_split(dataset, args.dataset_split)
        if args.prompt_column not in dataset.column_names:
            raise ValueError(
                f"{args.dataset_name} has no column {args.prompt_column!r}; it has {dataset.column_names}."
            )
        prompts = list(dataset[args.prompt_column])
    if args.deduplicate_prompts:
        distinct = list(dict.fromkeys(prompts))
        if len(distinct) < len(prompts):
            logger.info("Removed %d duplicate prompts; %d remain.", len(prompts) - len(distinct), len(distinct))
        prompts = distinct
    return prompts[: args.max_prompts] if args.max_prompts is not None else prompts


def build_scorer(args: GeneratePairsConfig, device):
    """The scorer ``args.scorer`` names, with its model options."""
    from trl_diffusion.scorers import get_scorer

    kwargs = {}
    if args.scorer in ("pickscore", "clip", "aesthetic"):
        kwargs["device"] = device
        if args.scorer_model_name_or_path:
            kwargs["model_name_or_path"] = args.scorer_model_name_or_path
    if args.scorer in ("pickscore", "clip") and args.scorer_processor_name_or_path:
        kwargs["processor_name_or_path"] = args.scorer_processor_name_or_path
    if args.scorer == "aesthetic" and args.aesthetic_head:
        kwargs["head"] = args.aesthetic_head
    if args.scorer == "hpsv2":
        kwargs.update(device=device, checkpoint=args.scorer_model_name_or_path, version=args.hps_version)
    if args.scorer == "imagereward":
        kwargs.update(device=device, checkpoint=args.scorer_model_name_or_path)
    return get_scorer(args.scorer, **kwargs)


def main(args: GeneratePairsConfig, model_args):
    from accelerate import PartialState

    from trl_diffusion.model_config import load_pipeline
    from trl_diffusion.preference_pairs import generate_preference_pairs, save_preference_pairs

    state = PartialState(cpu=args.use_cpu)
    prompts = load_prompts(args)
    pipeline = load_pipeline(model_args).to(state.device)
    if args.lora_name_or_path:
        pipeline.load_lora_weights(args.lora_name_or_path)
    generation_kwargs = {"num_inference_steps": args.num_inference_steps}
    for name in ("guidance_scale", "height", "width"):
        if getattr(args, name) is not None:
            generation_kwargs[name] = getattr(args, name)
    pairs = generate_preference_pairs(
        pipeline,
        prompts,
        build_scorer(args, state.device),
        images_per_prompt=args.images_per_prompt,
        min_reward_gap=args.min_reward_gap,
        pairing=args.pairing,
        seed=args.seed,
        batch_size=args.batch_size,
        **generation_kwargs,
    )
    save_preference_pairs(
        pairs, args.output_dir, args.output_format, args.push_to_hub, args.hub_dataset_id, args.hub_private
    )
    state.print(
        f"Kept {pairs.num_pairs} pairs from {pairs.num_prompts} prompts; dropped {pairs.num_dropped} of "
        f"{pairs.num_candidate_pairs} candidate pairs below the reward gap {args.min_reward_gap}. "
        f"Dataset written to {os.path.abspath(args.output_dir)}."
    )
    return pairs


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import TrlParser

    from trl_diffusion.model_config import DiffusionModelConfig

    dataclass_types = (GeneratePairsConfig, DiffusionModelConfig)
    if subparsers is not None:
        return subparsers.add_parser(
            "generate-pairs", help="Generate on-policy pairs", dataclass_types=dataclass_types
        )
    return TrlParser(dataclass_types, prog=prog)


def cli_main(argv: list[str] | None = None):
    """Parse ``argv`` (the command line when `None`) as the script's command line and run it: generates the pairs.

    Tests and other programs call this rather than copy the ``__main__`` block. Returns the `PreferencePairs`.
    """
    from trl_diffusion.scripts.utils import run_script

    return run_script(make_parser, main, argv)


if __name__ == "__main__":
    cli_main()
