"""A few-minute CPU demo: align a tiny text-to-image model with a preference no prompt mentions.

1. Pre-train a tiny Stable Diffusion model from scratch on captioned pictures of a square ("a teal square"), or reuse
   the one cached for the same seed. It follows its prompt loosely and makes squares of every saturation, brightness,
   size and position (see `trl_diffusion.testing.synthetic`).
2. Self-generate preference pairs from it and label each by the true reward (``--reward``: by default ``size``, the
   fraction of the picture the square covers). Every pair matches an image from the upper half of its caption's
   images, by reward, with one from the lower half.
3. Train `DiffusionDPOTrainer` (or ``--method mapo|adaptive``) with LoRA on the pairs.
4. Generate with unseen seeds from the base model and from base + LoRA, and report the win rate of the tuned images
   by the true reward, the mean gain with its 95% bootstrap interval, and a before/after image grid.

The demo exits with status 1 when it shows no effect: when the interval of the mean gain is not above 0.

Run it with `make demo`, or `python examples/demo.py --output_dir demo_output [--reward saturation] [--seed 3]`.
"""

import argparse
import os
import sys
import time

import datasets
import diffusers
import huggingface_hub
import numpy as np
import torch
import transformers
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from trl_diffusion import METHODS
from trl_diffusion.evaluation import PreferenceEvaluation, Scorer, evaluate_preference, image_grid, summarize
from trl_diffusion.testing.synthetic import (
    GUIDANCE_SCALE,
    REWARDS,
    TRAIN_COLOURS,
    caption,
    get_reward,
    pretrain_base_model,
    self_generated_pairs,
    train_on_task,
)


# The attention projections (the family's default) and the ResNet convolutions: a prompt-independent property such as
# colour or size is made by the convolutions as much as by attention.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--method", choices=list(METHODS), default="dpo")
    parser.add_argument(
        "--reward",
        default="size",
        help=f"The true reward: one of {', '.join(REWARDS)}; a leading '-' prefers the opposite (--reward=-size).",
    )
    parser.add_argument("--num_pairs", type=int, default=384)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=500.0, help="The method's beta (MaPO: its own default).")
    parser.add_argument("--pretrain_steps", type=int, default=350)
    parser.add_argument("--num_eval_seeds", type=int, default=16, help="Unseen seeds per prompt for the evaluation.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the pre-training, the pairs and the LoRA.")
    args = parser.parse_args(argv)
    get_reward(args.reward)  # fail now, with the list of rewards, rather than after pre-training
    return args


def train(args: argparse.Namespace, base_path: str, dataset) -> str:
    """Train the chosen method with LoRA on ``dataset``; print its loss and preference accuracy; return the adapter."""
    method_options = {} if args.method == "mapo" else {"beta": args.beta}
    adapter_path = os.path.join(args.output_dir, f"{args.method}-lora")
    trainer, _ = train_on_task(
        args.method,
        base_path,
        dataset,
        adapter_path,
        batch_size=16,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        seed=args.seed,
        peft_config=LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
        num_logs=6,
        print_logs=False,  # the demo prints its own table of the logged loss and accuracy
        dataloader_pin_memory=False,
        **method_options,
    )
    accuracy_key = trainer.accuracy_metric
    print(f"      step   loss    {accuracy_key}")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"      {entry['step']:>4}   {entry['loss']:.4f}  {entry[accuracy_key]:.3f}")
    return adapter_path


def evaluate(base: StableDiffusionPipeline, reward: Scorer, adapter_path: str, num_seeds: int) -> PreferenceEvaluation:
    """Compare base and base + LoRA on every training prompt, each with its own ``num_seeds`` unseen seeds.

    The tiny model follows its prompt loosely (guidance 1), so one seed gives much the same picture under every
    prompt: with the seeds shared across prompts, 8 prompts × 16 seeds would be about 16 independent images, not
    128. Distinct seeds make every image an independent draw, for the win rate and for the bootstrap interval.
    """
    parts = [
        evaluate_preference(
            base,
            [caption(colour)],
            reward,
            lora=adapter_path,
            seeds=range(10_000 + index * num_seeds, 10_000 + (index + 1) * num_seeds),
            batch_size=64,
            num_inference_steps=20,
            guidance_scale=GUIDANCE_SCALE,
        )
        for index, colour in enumerate(TRAIN_COLOURS)
    ]
    rows = [row for part in parts for row in part.rows]
    summary = summarize([row["base_score"] for row in rows], [row["tuned_score"] for row in rows])
    base_images = [image for part in parts for image in part.base_images]
    tuned_images = [image for part in parts for image in part.tuned_images]
    return PreferenceEvaluation(*summary, rows, base_images, tuned_images)


def report(args: argparse.Namespace, result: PreferenceEvaluation, adapter_path: str) -> bool:
    """Print the figures and write the grid; return whether the effect is real (interval of the gain above 0)."""
    base_mean = np.mean([row["base_score"] for row in result.rows])
    tuned_mean = np.mean([row["tuned_score"] for row in result.rows])
    grid_path = os.path.join(args.output_dir, "before_after.png")
    # Sixteen different (prompt, seed) pairs, every prompt twice: top row base, bottom row base + LoRA.
    num_prompts = len(result.rows) // args.num_eval_seeds
    shown = [(k % num_prompts) * args.num_eval_seeds + k % args.num_eval_seeds for k in range(16)]
    rows = [[result.base_images[i] for i in shown], [result.tuned_images[i] for i in shown]]
    image_grid(rows, scale=4).save(grid_path)
    print(f"\nTrue reward ({args.reward}) of generated images: {base_mean:.3f} before -> {tuned_mean:.3f} after")
    print(
        f"Win rate of base + LoRA over the base model, same prompts and seeds: {result.win_rate:.0%} "
        f"({len(result.rows)} images; 50% = no change; mean gain {result.mean_difference:+.3f}, 95% CI "
        f"[{result.ci_low:+.3f}, {result.ci_high:+.3f}])"
    )
    print(f"LoRA adapter and model card: {adapter_path}")
    print(f"Image grid (top: base, bottom: base + LoRA): {grid_path}")
    return result.ci_low > 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the tiny model gains nothing from intra-op threads
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    start, cpu_start = time.time(), time.process_time()
    reward = get_reward(args.reward)

    base_path = os.path.join(args.output_dir, f"base-model-seed{args.seed}")
    print(f"[1/4] Pre-training a tiny text-to-image model on captioned squares (cached in {base_path}) ...")
    pretrain_base_model(base_path, steps=args.pretrain_steps, seed=args.seed)
    base = StableDiffusionPipeline.from_pretrained(base_path)
    base.set_progress_bar_config(disable=True)
    print(f"      ({time.time() - start:.0f} s)")

    print(f"[2/4] Self-generating {args.num_pairs} pairs from it, labelled by the true reward ({args.reward}) ...")
    dataset = self_generated_pairs(base, args.num_pairs, seed=args.seed, reward=reward)
    gaps = np.abs(np.asarray(dataset["reward_0"]) - np.asarray(dataset["reward_1"]))
    print(
        f"      mean reward gap of a pair {gaps.mean():.3f} (smallest {gaps.min():.3f}) ({time.time() - start:.0f} s)"
    )

    print(f"[3/4] Training {METHODS[args.method][0].__name__} with LoRA for {args.max_steps} steps ...")
    adapter_path = train(args, base_path, dataset)
    print(f"      ({time.time() - start:.0f} s)")

    print("[4/4] Generating with unseen seeds from the base model and from base + LoRA ...")
    result = evaluate(base, reward, adapter_path, args.num_eval_seeds)
    effect = report(args, result, adapter_path)
    print(f"Total time: {time.time() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU")
    if not effect:
        print(
            f"NO EFFECT: the 95% interval of the mean {args.reward} gain, [{result.ci_low:+.3f}, "
            f"{result.ci_high:+.3f}], is not above 0, so base + LoRA is not shown to beat the base model.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
