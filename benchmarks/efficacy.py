"""Preference-efficacy benchmark: do the trainers move a model towards what the preferences ask for?

On the synthetic task of `trl_diffusion.synthetic` (a tiny text-to-image model pre-trained on captioned squares; the
true reward is saturation, which the prompts never mention):

1. pre-train (or reuse) the tiny base model;
2. self-generate preference pairs from it, labelled by the true reward, and flip a fraction of the labels
   (``--flip_rates``), scattered or all from one minority annotator (``--flip_mode``);
3. train every method of `trl_diffusion.METHODS` with LoRA at the same budget (Diffusion-KTO on the same pairs,
   unpaired: one desirable and one undesirable row per pair, twice the rows per batch);
4. generate from base and base + LoRA with fixed seeds on held-out prompts, and report the true-reward win rate.

A second experiment, "reference mismatch", trains DPO and MaPO on pairs whose chosen image has a style the base model
never makes (a white frame) and reports the win rate on that style.

Results (a JSON list, a markdown table and a PNG plot) go to ``--output_dir``; with ``--results`` the table and plot
are written into that markdown file between markers, replacing an earlier run's.

    python benchmarks/efficacy.py                 # the full benchmark, about an hour on 2 CPU cores
    python benchmarks/efficacy.py --quick         # a seconds-long smoke run of the whole pipeline
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time

import diffusers
import numpy as np
import torch
import transformers
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

import trl_diffusion
from trl_diffusion import METHODS, UnpairedPreferenceDataset
from trl_diffusion.evaluation import evaluate_preference, saturation_scorer
from trl_diffusion.synthetic import (
    GUIDANCE_SCALE,
    HELD_OUT_COLOURS,
    SIZE,
    TRAIN_COLOURS,
    caption,
    flip_labels,
    frame_scorer,
    mismatched_pairs,
    pretrain_base_model,
    self_generated_pairs,
)


START, END = "<!-- efficacy:start -->", "<!-- efficacy:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/output/efficacy")
    parser.add_argument("--results", default=None, help="Markdown file to write the table and plot into.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--flip_rates", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    parser.add_argument("--flip_mode", choices=["scattered", "minority"], default="scattered")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_pairs", type=int, default=512)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--num_eval_seeds", type=int, default=8, help="Evaluation seeds per prompt.")
    parser.add_argument("--skip_mismatch", action="store_true", help="Skip the reference-mismatch experiment.")
    parser.add_argument("--quick", action="store_true", help="A tiny smoke run of every stage.")
    args = parser.parse_args(argv)
    if args.quick:
        args.flip_rates, args.seeds, args.num_pairs, args.max_steps = [0.0, 0.4], [0], 8, 2
        args.pretrain_steps, args.num_eval_seeds, args.batch_size = 4, 2, 4
    return args


def train_lora(method: str, base_path: str, dataset, output_dir: str, args, seed: int) -> str:
    """Train one method with LoRA at the shared budget; return the adapter folder."""
    trainer_class, config_class = METHODS[method]
    # An unpaired method (Diffusion-KTO) reads each pair as two rows: twice the rows is the same images per step.
    rows_per_pair = 2 if issubclass(trainer_class.dataset_class, UnpairedPreferenceDataset) else 1
    trainer = trainer_class(
        model=base_path,
        args=config_class(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size * rows_per_pair,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            resolution=SIZE,
            random_flip=True,
            logging_steps=max(1, args.max_steps // 10),
            dataloader_num_workers=0,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=seed,
        ),
        train_dataset=dataset,
        peft_config=LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian"),
    )
    trainer.train()
    trainer.save_model()
    return output_dir


def evaluate(base: StableDiffusionPipeline, adapter: str, scorer, num_eval_seeds: int) -> dict:
    """Win rate of base + LoRA over base on the training captions with unseen seeds, and on held-out captions."""
    record = {}
    for split, colours in (("", TRAIN_COLOURS), ("heldout_", HELD_OUT_COLOURS)):
        seeds = list(range(10_000, 10_000 + num_eval_seeds))
        result = evaluate_preference(
            base,
            [caption(c) for c in colours],
            scorer,
            lora=adapter,
            seeds=seeds,
            num_inference_steps=20,
            guidance_scale=GUIDANCE_SCALE,
        )
        record.update(
            {
                f"{split}win_rate": result.win_rate,
                f"{split}score_difference": result.mean_difference,
                f"{split}ci_low": result.ci_low,
                f"{split}ci_high": result.ci_high,
                f"{split}num_images": len(result.rows),
            }
        )
    return record


def run(args) -> list[dict]:
    os.makedirs(args.output_dir, exist_ok=True)
    base_path = pretrain_base_model(os.path.join(args.output_dir, "base-model"), steps=args.pretrain_steps)
    base = StableDiffusionPipeline.from_pretrained(base_path)
    base.set_progress_bar_config(disable=True)
    records = []
    for seed in args.seeds:
        clean = self_generated_pairs(base, args.num_pairs, seed=seed)
        for flip_rate in args.flip_rates:
            dataset = flip_labels(clean, flip_rate, args.flip_mode, seed=seed)
            for method in args.methods:
                start = time.time()
                folder = os.path.join(args.output_dir, f"{method}-flip{flip_rate:g}-seed{seed}")
                adapter = train_lora(method, base_path, dataset, folder, args, seed)
                record = {"experiment": "flips", "method": method, "flip_rate": flip_rate, "seed": seed}
                record.update(evaluate(base, adapter, saturation_scorer, args.num_eval_seeds))
                record["seconds"] = time.time() - start
                records.append(record)
                print(json.dumps(record), flush=True)
    if not args.skip_mismatch:
        for seed in args.seeds:
            dataset = mismatched_pairs(base, args.num_pairs, seed=seed)
            for method in ("dpo", "mapo"):
                start = time.time()
                folder = os.path.join(args.output_dir, f"mismatch-{method}-seed{seed}")
                adapter = train_lora(method, base_path, dataset, folder, args, seed)
                record = {"experiment": "mismatch", "method": method, "flip_rate": 0.0, "seed": seed}
                record.update(evaluate(base, adapter, frame_scorer, args.num_eval_seeds))
                record["seconds"] = time.time() - start
                records.append(record)
                print(json.dumps(record), flush=True)
    return records


def summary_table(records: list[dict]) -> str:
    """Mean ± standard deviation over seeds of the win rate, per method and flip rate, plus the mismatch runs."""
    lines = []
    flips = [r for r in records if r["experiment"] == "flips"]
    rates = sorted({r["flip_rate"] for r in flips})
    for key, title in (("win_rate", "training prompts, unseen seeds"), ("heldout_win_rate", "held-out prompts")):
        if not flips:
            break
        lines += ["", f"| win rate ({title}) | " + " | ".join(f"{rate:.0%} flipped" for rate in rates) + " |"]
        lines += ["|---|" + "---|" * len(rates)]
        for method in dict.fromkeys(r["method"] for r in flips):
            cells = []
            for rate in rates:
                wins = [r[key] for r in flips if r["method"] == method and r["flip_rate"] == rate]
                cells.append(f"{np.mean(wins):.1%} ± {np.std(wins):.1%}" if wins else "—")
            lines.append(f"| {METHODS[method][0]._name} | " + " | ".join(cells) + " |")
    mismatch = [r for r in records if r["experiment"] == "mismatch"]
    if mismatch:
        lines += ["", "| reference mismatch (frame style, training prompts) | win rate | score difference |"]
        lines += ["|---|---|---|"]
        for method in dict.fromkeys(r["method"] for r in mismatch):
            runs = [r for r in mismatch if r["method"] == method]
            wins, diffs = [r["win_rate"] for r in runs], [r["score_difference"] for r in runs]
            lines.append(
                f"| {METHODS[method][0]._name} | {np.mean(wins):.1%} ± {np.std(wins):.1%} | "
                f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f} |"
            )
    return "\n".join(lines).strip("\n")


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flips = [r for r in records if r["experiment"] == "flips"]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(r["method"] for r in flips):
        rates = sorted({r["flip_rate"] for r in flips if r["method"] == method})
        means = [
            np.mean([r["win_rate"] for r in flips if r["method"] == method and r["flip_rate"] == x]) for x in rates
        ]
        stds = [np.std([r["win_rate"] for r in flips if r["method"] == method and r["flip_rate"] == x]) for x in rates]
        axis.errorbar(
            [100 * x for x in rates], means, yerr=stds, marker="o", capsize=3, label=METHODS[method][0]._name
        )
    axis.axhline(0.5, color="grey", linestyle=":", label="no change")
    axis.set_xlabel("labels flipped (%)")
    axis.set_ylabel("true-reward win rate vs base")
    axis.set_ylim(0, 1)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(records: list[dict], args, argv: list[str], elapsed: float) -> str:
    table = summary_table(records)
    # Beside the results file (so it can be committed with it), else in the output folder.
    plot_path = os.path.join(os.path.dirname(args.results) if args.results else args.output_dir, "efficacy.png")
    plot(records, plot_path)
    with open(os.path.join(args.output_dir, "efficacy.json"), "w") as f:
        json.dump(records, f, indent=1)
    command = "python benchmarks/efficacy.py " + shlex.join(argv)
    section = "\n".join(
        [
            START,
            "## Preference efficacy (synthetic task, CPU)",
            "",
            f"Command: `{command.strip()}`  ",
            f"Device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
            f"trl_diffusion {trl_diffusion.__version__}; {elapsed / 60:.0f} min.  ",
            f"{args.num_pairs} self-generated pairs, {args.max_steps} LoRA steps of {args.batch_size} pairs, "
            f"lr {args.learning_rate:g}, each method's default β; flips: {args.flip_mode}; seeds {args.seeds}; "
            f"evaluation: {len(TRAIN_COLOURS)} training prompts and {len(HELD_OUT_COLOURS)} held-out prompts × "
            f"{args.num_eval_seeds} unseen seeds. Win rate: fraction of images where base + LoRA has the higher true "
            "reward than the base with the same prompt and seed (ties ½), mean ± std over training seeds.",
            "",
            table,
            "",
            f"![win rate against flip rate]({os.path.relpath(plot_path, os.path.dirname(args.results or '.'))})",
            END,
        ]
    )
    if args.results:
        text = open(args.results).read() if os.path.exists(args.results) else "# Benchmark results\n"
        if START in text and END in text:
            text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        with open(args.results, "w") as f:
            f.write(text)
    return section


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # The tiny model gains nothing from intra-op threads; several of them on a busy 2-core machine slow it down.
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    start = time.time()
    records = run(args)
    print(write_results(records, args, argv, time.time() - start))
    return records


if __name__ == "__main__":
    main()
