"""Preference-efficacy benchmark: does each method deliver its own claim, at the same budget, over several seeds?

On the synthetic task of `trl_diffusion.testing.synthetic` (a tiny text-to-image model pre-trained on captioned squares; the
true reward, saturation by default, is a property no prompt mentions):

1. pre-train (or reuse) the tiny base model;
2. per training seed, self-generate preference pairs from it, labelled by the true reward, and flip a fraction of the
   labels (``--flip_rates``): by default all the flipped pairs come from one minority annotator who prefers the
   opposite (``--flip_mode minority``);
3. train every method of `trl_diffusion.METHODS` on the clean pairs (Diffusion-KTO unpaired: one desirable and one
   undesirable row per pair, twice the rows per batch), and the noise-robust arms
   (``--noise_arms``: DPO, Adaptive-DPO and DPO's ``robust``/``conservative`` losses, all at the same β) on every flip
   rate, with LoRA at one budget (steps × pairs per step); a small β sweep (``--beta_sweep``) repeats DPO and
   Adaptive-DPO at the clean and the highest flip rate; ``--rewards`` repeats the clean arms with pairs labelled by
   other true rewards (``brightness``, ``-size``...);
4. generate from the base and from base + LoRA, every image with its own unseen seed, on the training prompts and on
   held-out prompts, and report the true-reward win rate; Adaptive-DPO's per-pair minority scores
   (``minority_scores.csv``) give the AUROC of ``u`` against the known flips;
5. "reference mismatch": DPO and MaPO fine-tune the full UNet on pairs whose chosen image has a style the base never
   makes (a white frame); the frame-score win rate and the share of images that show the frame are measured.

Per-step training time of every method is reported relative to DPO's, from the same runs. Every figure is the mean
over the training seeds with its range and a 95% t-interval; method comparisons are paired by seed (same pairs, same
evaluation seeds). Results (JSON records, markdown tables) go to ``--output_dir``; with ``--results`` the tables are
written into that markdown file between markers, replacing an earlier run's.

    python benchmarks/efficacy.py --results benchmarks/RESULTS.md   # the full benchmark (~1 h, 1 CPU thread)
    python benchmarks/efficacy.py --quick                            # a seconds-long smoke run of every stage

A new method is one line: an entry in `trl_diffusion.METHODS` is trained on the clean pairs automatically; give it
settings in `method_settings` (for example the shared DPO-family β) and name it in ``--noise_arms`` to add it to the
noise experiment.
"""

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import diffusers
import numpy as np
import torch
import transformers
from common import command_line, rows_per_pair, write_section
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image

import trl_diffusion
from trl_diffusion import METHODS
from trl_diffusion.evaluation import generate_paired, summarize
from trl_diffusion.testing.synthetic import (
    GUIDANCE_SCALE,
    HELD_OUT_COLOURS,
    TRAIN_COLOURS,
    add_frame,
    caption,
    flip_labels,
    frame_scorer,
    get_reward,
    is_mirror_invariant,
    mismatched_pairs,
    pretrain_base_model,
    render_squares,
    self_generated_pairs,
    train_on_task,
)


START, END = "<!-- efficacy:start -->", "<!-- efficacy:end -->"
RECORDS = "records.jsonl"  # one JSON record per trained arm, appended as each finishes
EVAL_SEED_OFFSET = 10_000  # evaluation seeds: never used to generate training pairs (those are drawn from 2^31)
# 1: every prompt of a split with the same seeds; 2: every (prompt, seed) its own seed. --resume keeps only records
# of the current protocol, so that one table never mixes the two.
EVAL_PROTOCOL = 2
# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: the normal's 1.96 is within 3%).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def method_settings(args) -> dict[str, dict]:
    """Per-method config overrides: the DPO family shares one β. Methods not listed train with their defaults."""
    mapo = {"beta": args.mapo_beta} if args.mapo_beta is not None else {}
    if args.mapo_learning_rate is not None:
        mapo["learning_rate"] = args.mapo_learning_rate
    return {
        "dpo": {"beta": args.beta},
        "adaptive": {"beta": args.beta, "save_minority_scores": True},
        "mapo": mapo,
    }


@dataclass
class Arm:
    """One trained configuration: a method of `METHODS` with config overrides."""

    name: str
    method: str
    settings: dict = field(default_factory=dict)


def make_arm(spec: str, args) -> Arm:
    """``method``, ``method:loss_type`` (a DPO-family loss) or either with ``@beta``, e.g. ``dpo:robust@2500``."""
    name, _, beta = spec.partition("@")
    method, _, loss_type = name.partition(":")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r} in arm {spec!r}; expected one of {list(METHODS)}.")
    settings = dict(method_settings(args).get(method, {}))
    if loss_type:
        settings.update(loss_type=loss_type, label_smoothing=args.label_smoothing)
    if beta:
        settings["beta"] = float(beta)
    return Arm(spec, method, settings)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/output/efficacy")
    parser.add_argument("--results", default=None, help="Markdown file to write the tables into.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--flip_rates", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    parser.add_argument("--flip_mode", choices=["scattered", "minority"], default="minority")
    parser.add_argument("--clean_arms", nargs="*", default=list(METHODS), help="Arms trained on the clean pairs.")
    parser.add_argument(
        "--noise_arms",
        nargs="*",
        default=["dpo", "adaptive", "dpo:robust", "dpo:conservative"],
        help="Arms trained at every flip rate above 0.",
    )
    parser.add_argument("--beta", type=float, default=1000.0, help="The DPO family's shared β.")
    parser.add_argument("--beta_sweep", nargs="*", type=float, default=[], help="Extra β for DPO and Adaptive-DPO.")
    parser.add_argument("--mapo_beta", type=float, default=None, help="MaPO's β; default: MaPOConfig's.")
    parser.add_argument("--mapo_learning_rate", type=float, default=None, help="MaPO's lr; default: --learning_rate.")
    parser.add_argument(
        "--rewards",
        nargs="+",
        action="extend",
        default=[],
        help="Further true rewards (names of the task's REWARDS): every clean arm, 0%% flips. A leading '-' negates "
        "one, given as --rewards=-size (repeat --rewards for more).",
    )
    parser.add_argument("--label_smoothing", type=float, default=0.2, help="ε of the robust/conservative losses.")
    parser.add_argument("--num_pairs", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--num_eval_seeds", type=int, default=8, help="Seeds per training prompt (×4 held-out).")
    parser.add_argument("--skip_mismatch", action="store_true", help="Skip the reference-mismatch experiment.")
    parser.add_argument("--mismatch_arms", nargs="+", default=["dpo", "mapo"])
    parser.add_argument("--mismatch_learning_rate", type=float, default=3e-4, help="Full fine-tuning's lr.")
    parser.add_argument(
        "--mismatch_lora",
        action="store_true",
        help="Reference mismatch with LoRA at the shared lr, not the full UNet.",
    )
    parser.add_argument("--quick", action="store_true", help="A tiny smoke run of every stage.")
    parser.add_argument(
        "--resume", action="store_true", help=f"Keep the runs already in output_dir/{RECORDS}; train the others."
    )
    parser.add_argument(
        "--summarize", action="store_true", help=f"Only write the tables from the records in output_dir/{RECORDS}."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.flip_rates, args.seeds, args.num_pairs, args.max_steps = [0.0, 0.4], [0, 1], 8, 2
        args.pretrain_steps, args.num_eval_seeds, args.batch_size, args.beta_sweep = 4, 1, 4, []
        args.noise_arms, args.rewards = ["dpo", "adaptive"], ["-size"]
    return args


def train(arm: Arm, base_path: str, dataset, output_dir: str, args, seed: int, full: bool = False):
    """Train one arm at the shared budget (LoRA, or the full UNet with ``full``); return the trainer and its seconds
    per step. An unpaired method (Diffusion-KTO) reads each pair as two rows: twice the rows, the same images. The
    arm's settings may override the learning rate (``--mapo_learning_rate``), never the budget, and say whether the
    pairs are mirrored at random (``random_flip``, on for a reward a mirror image does not change)."""
    settings = {"learning_rate": args.mismatch_learning_rate if full else args.learning_rate, **arm.settings}
    return train_on_task(
        arm.method,
        base_path,
        dataset,
        output_dir,
        batch_size=args.batch_size * rows_per_pair(arm.method),
        max_steps=args.max_steps,
        seed=seed,
        peft_config=None if full else LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian"),
        **settings,
    )


class Evaluator:
    """Win rate of a tuned model over the base, with the same unseen seeds, on training and held-out prompts.

    Every (prompt, seed) of the evaluation has a seed of its own, never reused under another prompt: the tiny model
    follows its prompt loosely, so one seed under 8 prompts gives nearly one picture 8 times (docs/evaluation.md).
    The base images and scores are generated once per split and scorer, and reused for every tuned model.
    """

    def __init__(self, base: StableDiffusionPipeline, num_eval_seeds: int):
        self.base = base
        self.splits = {}
        next_seed = EVAL_SEED_OFFSET
        for split, colours, per_prompt in (
            ("", TRAIN_COLOURS, num_eval_seeds),
            ("heldout_", HELD_OUT_COLOURS, 4 * num_eval_seeds),
        ):
            prompts = [caption(colour) for colour in colours for _ in range(per_prompt)]
            self.splits[split] = (prompts, list(range(next_seed, next_seed + len(prompts))))
            next_seed += len(prompts)
        self._base_scores: dict[tuple, np.ndarray] = {}

    def _scores(self, pipeline, prompts, seeds, scorer) -> np.ndarray:
        images = generate_paired(
            pipeline, prompts, seeds, batch_size=64, num_inference_steps=20, guidance_scale=GUIDANCE_SCALE
        )
        return np.asarray(scorer(images, prompts), dtype=np.float64)

    def __call__(
        self, scorer, scorer_name: str, lora: str | None = None, unet: str | None = None, style: float | None = None
    ) -> dict:
        """The record of one tuned model (``scorer_name`` keys the base's scores); with ``style``, also the share of
        its images scoring above it."""
        record = {"eval_protocol": EVAL_PROTOCOL}
        for split, (prompts, seeds) in self.splits.items():
            key = (split, scorer_name)
            if key not in self._base_scores:
                self._base_scores[key] = self._scores(self.base, prompts, seeds, scorer)
            if lora is not None:
                self.base.load_lora_weights(lora, adapter_name="evaluated")
                try:
                    tuned = self._scores(self.base, prompts, seeds, scorer)
                finally:
                    self.base.delete_adapters("evaluated")
            else:
                components = {**self.base.components, "unet": UNet2DConditionModel.from_pretrained(unet)}
                pipeline = StableDiffusionPipeline(**components)
                pipeline.set_progress_bar_config(disable=True)
                tuned = self._scores(pipeline, prompts, seeds, scorer)
            rate, mean, low, high = summarize(self._base_scores[key], tuned)
            if style is not None:
                record[f"{split}style_rate"] = float((tuned > style).mean())
                record[f"{split}base_style_rate"] = float((self._base_scores[key] > style).mean())
            record.update(
                {
                    f"{split}win_rate": rate,
                    f"{split}score_difference": mean,
                    f"{split}ci_low": low,
                    f"{split}ci_high": high,
                    f"{split}num_images": len(tuned),
                }
            )
        return record


def frame_threshold(num_pictures: int = 256) -> float:
    """The frame score above which an image shows the mismatch style: midway between the mean `frame_scorer` of the
    task's pictures without the frame and with it (the rejected and the chosen style of the mismatch pairs)."""
    rng = np.random.default_rng(0)
    pictures = render_squares(list(rng.choice(TRAIN_COLOURS, num_pictures)), rng)
    plain = frame_scorer([Image.fromarray(p) for p in pictures]).mean()
    framed = frame_scorer([Image.fromarray(p) for p in add_frame(pictures)]).mean()
    return float((plain + framed) / 2)


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (Mann-Whitney, ties count ½)."""
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    pos, neg = scores[positives], scores[~positives]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def minority_auroc(output_dir: str, flipped: list[bool], from_step: int) -> float:
    """AUROC of each pair's mean ``u`` over the steps ``>= from_step`` against the known flips."""
    sums, counts = np.zeros(len(flipped)), np.zeros(len(flipped))
    with open(os.path.join(output_dir, "minority_scores.csv")) as f:
        for row in csv.DictReader(f):
            if int(row["global_step"]) >= from_step:
                sums[int(row["row_index"])] += float(row["minority_score"])
                counts[int(row["row_index"])] += 1
    seen = counts > 0
    return auroc(sums[seen] / counts[seen], np.asarray(flipped)[seen])


def record_run(experiment, arm, flip_rate, seed, trainer, seconds_per_step, evaluation, dataset) -> dict:
    """The run's record, also appended to ``RECORDS`` in the output folder (a partial run can be summarised)."""
    record = {"experiment": experiment, "arm": arm.name, "method": arm.method, "flip_rate": flip_rate, "seed": seed}
    record.update(evaluation, seconds_per_step=seconds_per_step, settings=arm.settings)
    if arm.settings.get("save_minority_scores") and flip_rate > 0:
        # Every score the loss used: all steps after the warm-up (u = 0 during it).
        warmup = trainer.args.minority_warmup_steps
        record["auroc_u"] = minority_auroc(trainer.args.output_dir, dataset["flipped"], warmup)
    with open(os.path.join(os.path.dirname(trainer.args.output_dir), RECORDS), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def stages(args) -> list[tuple[str, float, list[Arm]]]:
    """``(experiment, flip_rate, arms)`` in the order they run: the targets' core first, so that a run stopped early
    has every seed of the most important arms (clean pairs, the highest flip rate, mismatch, then the rest)."""
    clean = [make_arm(spec, args) for spec in args.clean_arms]
    noise = [make_arm(spec, args) for spec in args.noise_arms]
    sweep = [make_arm(f"{m}@{beta:g}", args) for beta in args.beta_sweep for m in ("dpo", "adaptive")]
    noisy_rates = sorted((rate for rate in args.flip_rates if rate > 0), reverse=True)
    order = [("flips", 0.0, clean)] if 0.0 in args.flip_rates else []
    order += [("flips", rate, noise) for rate in noisy_rates[:1]]
    if not args.skip_mismatch:
        order.append(("mismatch", 0.0, [make_arm(spec, args) for spec in args.mismatch_arms]))
    order += [("flips", rate, noise) for rate in noisy_rates[1:]]
    order += [("flips", rate, sweep) for rate in ([0.0] if 0.0 in args.flip_rates else []) + noisy_rates[:1]]
    order += [(f"reward:{name}", 0.0, clean) for name in args.rewards]
    return [stage for stage in order if stage[2]]


def resumed_records(records_path: str, resume: bool) -> list[dict]:
    """The records to keep: with ``resume``, those of the current `EVAL_PROTOCOL` (the file is rewritten without the
    others, which are trained again); without it, none (the file is removed)."""
    if not resume or not os.path.exists(records_path):
        if os.path.exists(records_path):
            os.remove(records_path)
        return []
    with open(records_path) as f:
        records = [json.loads(line) for line in f]
    current = [r for r in records if r.get("eval_protocol", 1) == EVAL_PROTOCOL]
    if len(current) < len(records):
        print(f"Retraining {len(records) - len(current)} runs evaluated under an earlier protocol.", flush=True)
        with open(records_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in current)
    return current


def experiment_reward(experiment: str) -> tuple[str, Callable]:
    """The true reward an experiment is labelled and scored by: ``flips`` saturation, ``mismatch`` the frame,
    ``reward:NAME`` the task's reward ``NAME`` (see `get_reward`)."""
    if experiment == "mismatch":
        return "frame", frame_scorer
    name = experiment.partition(":")[2] or "saturation"
    return name, get_reward(name)


def run(args) -> list[dict]:
    os.makedirs(args.output_dir, exist_ok=True)
    records = resumed_records(os.path.join(args.output_dir, RECORDS), args.resume)
    done = {(r["experiment"], r["arm"], r["flip_rate"], r["seed"]) for r in records}
    with open(os.path.join(args.output_dir, "command.txt"), "w") as f:
        f.write(command_line("efficacy.py", [a for a in args.argv if a != "--resume"]))
    # The VAE also learns framed pictures, for the reference-mismatch experiment (see `pretrain_base_model`).
    base_path = pretrain_base_model(
        os.path.join(args.output_dir, "base-model"), steps=args.pretrain_steps, framed_fraction=0.5
    )
    base = StableDiffusionPipeline.from_pretrained(base_path)
    base.set_progress_bar_config(disable=True)
    evaluate = Evaluator(base, args.num_eval_seeds)
    pairs: dict[tuple, object] = {}  # (experiment, seed) -> the pairs before any flips
    for experiment, flip_rate, arms in stages(args):
        # What the whole stage shares: its reward, whether its pairs may be mirrored, how its models are tuned.
        reward_name, scorer = experiment_reward(experiment)
        random_flip = is_mirror_invariant(scorer)
        arms = [Arm(arm.name, arm.method, {**arm.settings, "random_flip": random_flip}) for arm in arms]
        full = experiment == "mismatch" and not args.mismatch_lora
        style = frame_threshold() if experiment == "mismatch" else None
        prefix = "" if experiment == "flips" else experiment.replace(":", "-") + "-"
        for seed in args.seeds:
            for arm in [arm for arm in arms if (experiment, arm.name, flip_rate, seed) not in done]:
                if (experiment, seed) not in pairs:
                    pairs[experiment, seed] = (
                        mismatched_pairs(base, args.num_pairs, seed=seed)
                        if experiment == "mismatch"
                        else self_generated_pairs(base, args.num_pairs, seed=seed, reward=scorer)
                    )
                dataset = pairs[experiment, seed]
                if experiment != "mismatch":  # the mismatch pairs are labelled by construction, never flipped
                    dataset = flip_labels(dataset, flip_rate, args.flip_mode, seed=seed)
                folder = os.path.join(
                    args.output_dir, f"{prefix}{arm.name.replace(':', '-')}-flip{flip_rate:g}-seed{seed}"
                )
                trainer, seconds = train(arm, base_path, dataset, folder, args, seed, full=full)
                tuned = {"unet": folder} if full else {"lora": folder}
                evaluation = evaluate(scorer, reward_name, style=style, **tuned)
                records.append(record_run(experiment, arm, flip_rate, seed, trainer, seconds, evaluation, dataset))
    return records


# ----- summaries -----


def mean_interval(values) -> tuple[float, float, float, float, float]:
    """``(mean, min, max, ci_low, ci_high)``: a 95% Student-t interval of the mean over the seeds."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean, float("nan"), float("nan")
    quantile = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    half = quantile * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, float(values.min()), float(values.max()), mean - half, mean + half


def fmt(values, percent: bool = True, signed: bool = False) -> str:
    mean, low, high, ci_low, ci_high = mean_interval(values)
    if percent:
        sign = "+" if signed else ""
        return (
            f"{100 * mean:{sign}.1f} [{100 * ci_low:{sign}.1f}, {100 * ci_high:{sign}.1f}] "
            f"(range {100 * low:{sign}.1f}…{100 * high:{sign}.1f})"
        )
    return f"{mean:+.4f} [{ci_low:+.4f}, {ci_high:+.4f}] (range {low:+.4f}…{high:+.4f})"


def runs(records, experiment, arm, flip_rate=None) -> list[dict]:
    selected = [r for r in records if r["experiment"] == experiment and r["arm"] == arm]
    selected = [r for r in selected if flip_rate is None or r["flip_rate"] == flip_rate]
    return sorted(selected, key=lambda r: r["seed"])


def paired(records, experiment, arm_a, arm_b, flip_rate, key) -> list[float]:
    """Per-seed differences ``a − b`` of ``key``, over the seeds both arms ran."""
    a = {r["seed"]: r[key] for r in runs(records, experiment, arm_a, flip_rate)}
    b = {r["seed"]: r[key] for r in runs(records, experiment, arm_b, flip_rate)}
    return [a[s] - b[s] for s in sorted(a.keys() & b.keys())]


def win_rate_tables(records) -> list[str]:
    flips = [r for r in records if r["experiment"] == "flips"]
    rates = sorted({r["flip_rate"] for r in flips})
    lines = []
    for key, title in (("win_rate", "training prompts, unseen seeds"), ("heldout_win_rate", "held-out prompts")):
        lines += ["", f"Win rate (%), {title}: mean [95% CI] (range over seeds)", ""]
        lines += ["| arm | " + " | ".join(f"{rate:.0%} flipped" for rate in rates) + " |"]
        lines += ["|---|" + "---|" * len(rates)]
        for arm in dict.fromkeys(r["arm"] for r in flips):
            selected = [runs(records, "flips", arm, rate) for rate in rates]
            cells = [fmt([r[key] for r in rows]) if rows else "—" for rows in selected]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def comparison_tables(records, args) -> list[str]:
    flips = [r for r in records if r["experiment"] == "flips"]
    rates = sorted({r["flip_rate"] for r in flips})
    lines = ["", "Paired differences in win rate (points), training prompts; same seeds, pairs and evaluation:", ""]
    lines += ["| comparison | " + " | ".join(f"{rate:.0%} flipped" for rate in rates) + " |"]
    lines += ["|---|" + "---|" * len(rates)]
    comparisons = [("adaptive", "dpo"), ("adaptive", "dpo:robust"), ("adaptive", "dpo:conservative")]
    comparisons += [(f"adaptive@{b:g}", f"dpo@{b:g}") for b in args.beta_sweep]
    for a, b in comparisons:
        cells = []
        for rate in rates:
            differences = paired(records, "flips", a, b, rate, "win_rate")
            cells.append(fmt(differences, signed=True) if differences else "—")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    adaptive = {rate: runs(records, "flips", "adaptive", rate) for rate in rates}
    if adaptive.get(0.0):
        lines += [
            "",
            "Adaptive-DPO: gain kept under flips (win rate − 50%, relative to its clean gain, per seed):",
            "",
        ]
        clean = {r["seed"]: r["win_rate"] - 0.5 for r in adaptive[0.0]}
        for rate in rates[1:]:
            paired_runs = [r for r in adaptive[rate] if r["seed"] in clean]  # seeds with a clean run too
            if not paired_runs:
                continue
            kept = [r["win_rate"] - 0.5 for r in paired_runs]
            ratios = [k / clean[r["seed"]] for k, r in zip(kept, paired_runs) if clean[r["seed"]] > 0]
            ratio_of_means = np.mean(kept) / np.mean([clean[r["seed"]] for r in paired_runs])
            lines.append(
                f"- {rate:.0%} flipped: {100 * ratio_of_means:.0f}% of the clean gain (ratio of the means over seeds "
                f"{[r['seed'] for r in paired_runs]}); per seed {', '.join(f'{100 * x:.0f}%' for x in ratios)}"
            )
        aurocs = [(rate, [r["auroc_u"] for r in adaptive[rate] if "auroc_u" in r]) for rate in rates[1:]]
        lines += [
            "",
            "AUROC of Adaptive-DPO's u against the known flips (each pair's mean u over all steps after the warm-up):",
            "",
        ]
        for rate, values in aurocs:
            if values:
                lines.append(f"- {rate:.0%} flipped: {fmt(values, percent=False)}")
    return lines


def reward_tables(records) -> list[str]:
    """Every clean arm's win rate under each true reward: saturation (the clean flips runs) and ``--rewards``."""
    experiments = list(dict.fromkeys(r["experiment"] for r in records if r["experiment"].startswith("reward:")))
    if not experiments:
        return []
    columns = [("flips", "saturation")] + [(e, e.partition(":")[2]) for e in experiments]
    lines = []
    for key, title in (("win_rate", "training prompts, unseen seeds"), ("heldout_win_rate", "held-out prompts")):
        lines += ["", f"Win rate (%) by true reward, 0% flipped, {title}: mean [95% CI] (range over seeds)", ""]
        lines += ["| arm | " + " | ".join(name for _, name in columns) + " |", "|---|" + "---|" * len(columns)]
        for arm in dict.fromkeys(r["arm"] for r in records if r["experiment"] in experiments):
            cells = []
            for experiment, _ in columns:
                selected = runs(records, experiment, arm, 0.0)
                cells.append(fmt([r[key] for r in selected]) if selected else "—")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def mismatch_tables(records, args) -> list[str]:
    mismatch = [r for r in records if r["experiment"] == "mismatch"]
    if not mismatch:
        return []
    lines = ["", f"Reference mismatch (white frame, {mismatch_description(args)}):", ""]
    lines += ["| arm | measure | training prompts | held-out prompts |", "|---|---|---|---|"]
    measures = [("win_rate", "frame-score win rate over the base (%)")]
    if all("style_rate" in r for r in mismatch):
        measures.append(("style_rate", "images with the frame (%)"))
    for arm in dict.fromkeys(r["arm"] for r in mismatch):
        selected = runs(records, "mismatch", arm)
        for key, title in measures:
            lines.append(
                f"| {arm} | {title} | {fmt([r[key] for r in selected])} | {fmt([r['heldout_' + key] for r in selected])} |"
            )
        lines.append(
            f"| {arm} | frame-score difference | {fmt([r['score_difference'] for r in selected], percent=False)} | "
            f"{fmt([r['heldout_score_difference'] for r in selected], percent=False)} |"
        )
    if measures[1:]:
        base = [r["base_style_rate"] for r in mismatch] + [r["heldout_base_style_rate"] for r in mismatch]
        lines += [
            "",
            f"An image has the frame when its frame score exceeds {frame_threshold():.3f}, midway between "
            "the task's pictures without and with the frame; "
            + (
                "none of the base's images has it."
                if max(base) == 0
                else f"{100 * min(base):.1f}–{100 * max(base):.1f}% of the base's images have it."
            ),
        ]
    lines += [""]
    for key, title in measures:
        differences = paired(records, "mismatch", "mapo", "dpo", 0.0, key)
        if differences:
            lines.append(f"- MaPO − DPO, {title.split(' (')[0]} (points, paired): {fmt(differences, signed=True)}")
    return lines


def speed_lines(records) -> list[str]:
    lines = []
    clean = [r for r in records if r["experiment"] == "flips" and r["flip_rate"] == 0.0]
    if any(r["arm"] == "dpo" for r in clean):
        lines += [
            "",
            "Seconds per training step relative to DPO's, per seed (same seeds, clean pairs, LoRA): mean [95% CI]:",
            "",
        ]
        for arm in dict.fromkeys(r["arm"] for r in clean):
            ratios = [
                r["seconds_per_step"] / d["seconds_per_step"]
                for r in runs(records, "flips", arm, 0.0)
                for d in runs(records, "flips", "dpo", 0.0)
                if d["seed"] == r["seed"]
            ]
            seconds = np.mean([r["seconds_per_step"] for r in runs(records, "flips", arm, 0.0)])
            mean, low, high, ci_low, ci_high = mean_interval(ratios)
            lines.append(
                f"- {arm}: {mean:.2f}× [{ci_low:.2f}, {ci_high:.2f}] (range {low:.2f}…{high:.2f}; "
                f"{seconds:.3f} s/step)"
            )
    return lines


def mapo_description(args) -> str:
    beta = f"β = {args.mapo_beta:g}" if args.mapo_beta is not None else "its default β"
    rate = f", lr {args.mapo_learning_rate:g}" if args.mapo_learning_rate is not None else ""
    return f"MaPO at {beta}{rate}"


def mismatch_description(args) -> str:
    if args.mismatch_lora:
        return f"LoRA r=8, lr {args.learning_rate:g}"
    return f"full fine-tuning, lr {args.mismatch_learning_rate:g}"


def write_results(records: list[dict], args, argv: list[str], elapsed: float | None) -> str:
    with open(os.path.join(args.output_dir, "efficacy.json"), "w") as f:
        json.dump(records, f, indent=1)
    command = command_line("efficacy.py", argv)
    command_file = os.path.join(args.output_dir, "command.txt")
    if elapsed is None and os.path.exists(command_file):  # summarising: name the run that made the records
        command = open(command_file).read().strip()
    section = "\n".join(
        [
            START,
            "## Preference efficacy (synthetic task, CPU)",
            "",
            f"Command: `{command.strip()}`  ",
            f"Device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread); "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
            f"trl_diffusion {trl_diffusion.__version__}; {len(records)} training runs"
            + (f" in {elapsed / 60:.0f} min.  " if elapsed is not None else f" (summarised from `{RECORDS}`).  "),
            f"Seeds {sorted({r['seed'] for r in records})}; {args.num_pairs} self-generated pairs per seed; every arm {args.max_steps} steps of "
            f"{args.batch_size} pairs, lr {args.learning_rate:g} (LoRA r=8); DPO family at β = {args.beta:g} "
            f"(sweep: {', '.join(f'{b:g}' for b in args.beta_sweep) or 'none'}), robust/conservative "
            f"ε = {args.label_smoothing:g}, {mapo_description(args)}; flips: {args.flip_mode}; reference mismatch: "
            f"{mismatch_description(args)}, {args.max_steps} steps. Evaluation: "
            f"{len(TRAIN_COLOURS)} training prompts × {args.num_eval_seeds} unseen seeds and {len(HELD_OUT_COLOURS)} "
            f"held-out prompts × {4 * args.num_eval_seeds} seeds. Win rate: share of images where the tuned model "
            "has the higher true reward than the base with the same prompt and seed (ties ½).",
            *win_rate_tables(records),
            *comparison_tables(records, args),
            *reward_tables(records),
            *mismatch_tables(records, args),
            *speed_lines(records),
            END,
        ]
    )
    if args.results:
        write_section(args.results, section, START, END)
    return section


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    # The tiny model gains nothing from intra-op threads; several of them on a busy 2-core machine slow it down.
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.summarize:
        with open(os.path.join(args.output_dir, RECORDS)) as f:
            records = [json.loads(line) for line in f]
        print(write_results(records, args, argv, None))
        return records
    start = time.time()
    records = run(args)
    print(write_results(records, args, argv, time.time() - start))
    return records


if __name__ == "__main__":
    main()
