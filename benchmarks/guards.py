"""Guard benchmark: a Diffusion-DPO run pushed too far collapses without a guard and holds with one.

On the synthetic task of `trl_diffusion.testing.synthetic` (a tiny text-to-image model pre-trained on captioned squares; the
true reward is saturation), for each seed:

1. self-generate preference pairs from the base model, labelled by the true reward (as `benchmarks/efficacy.py`);
2. train Diffusion-DPO with LoRA far past a sane budget (a large learning rate, many steps), once without a guard and
   once with each guard asked for (``--guards``: ``sft`` is ``sft_weight``, ``cap`` is ``max_margin``);
3. generate from base and base + LoRA with fixed seeds on the training captions, and measure
   - the true-reward win rate over the base (what the preferences ask for),
   - prompt fidelity: the mean circular distance between each image's hue and its caption's hue, in degrees
     (a collapsed model stops drawing the colour it is asked for),
   - the denoising error of the tuned model on fresh squares of every colour, relative to the base's (a collapsed
     model loses the data distribution, the chosen images included),
   - the last logged ``mse/policy_chosen / mse/ref_chosen`` and whether the collapse warnings fired.

Results go to ``--output_dir`` (JSON lines); with ``--results`` a markdown section is written into that file between
markers, replacing an earlier run's.

    python benchmarks/guards.py --results benchmarks/RESULTS.md     # 5 seeds, about 15 minutes on one CPU thread
    python benchmarks/guards.py --quick                            # a seconds-long smoke run of every stage
"""

import argparse
import colorsys
import json
import logging
import os
import platform
import sys
import time

import diffusers
import numpy as np
import torch
import transformers
from common import command_line, write_section
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig

import trl_diffusion
from trl_diffusion.evaluation import generate_images, saturation_scorer, win_rate
from trl_diffusion.testing.synthetic import (
    HUES,
    TRAIN_COLOURS,
    caption,
    pretrain_base_model,
    render_squares,
    self_generated_pairs,
    train_on_task,
)


START, END = "<!-- guards:start -->", "<!-- guards:end -->"
GUARDS = {"none": {}, "sft": {"sft_weight": 500.0}, "cap": {"max_margin": 2.0}}
# The learning rate of `benchmarks/efficacy.py`, the sane budget this one exceeds
EFFICACY_LEARNING_RATE = 3e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/output/guards")
    parser.add_argument("--results", default=None, help="Markdown file to write the section into.")
    parser.add_argument("--guards", nargs="+", default=["none", "sft"], choices=list(GUARDS))
    parser.add_argument("--sft_weight", type=float, default=GUARDS["sft"]["sft_weight"])
    parser.add_argument("--max_margin", type=float, default=GUARDS["cap"]["max_margin"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--num_pairs", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-2)
    parser.add_argument("--beta", type=float, default=2500.0)
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--num_eval_seeds", type=int, default=8, help="Evaluation seeds per prompt.")
    parser.add_argument("--quick", action="store_true", help="A tiny smoke run of every stage.")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.num_pairs, args.max_steps, args.pretrain_steps = [0], 8, 2, 4
        args.num_eval_seeds, args.batch_size = 2, 4
    GUARDS["sft"] = {"sft_weight": args.sft_weight}
    GUARDS["cap"] = {"max_margin": args.max_margin}
    return args


def hue_error(images, prompts) -> np.ndarray:
    """Circular distance, in degrees, between each image's mean hue and the hue its caption names."""
    errors = []
    for image, prompt in zip(images, prompts, strict=True):
        red, green, blue = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) / 255
        hue = colorsys.rgb_to_hsv(red, green, blue)[0] * 360
        target = HUES[prompt.removeprefix("a ").removesuffix(" square")]
        errors.append(min(abs(hue - target), 360 - abs(hue - target)))
    return np.asarray(errors)


@torch.no_grad()
def data_error(pipeline: StableDiffusionPipeline, num_images: int = 256, seed: int = 12345) -> float:
    """Mean denoising error of the pipeline's UNet on fresh squares of every colour, fixed noise and timesteps."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    colours = list(rng.choice(list(HUES), num_images))
    pixels = torch.from_numpy(render_squares(colours, rng)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae, unet = pipeline.vae, pipeline.unet
    latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    ids = pipeline.tokenizer(
        [caption(c) for c in colours],
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    text = pipeline.text_encoder(ids)[0]
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (num_images,), generator=generator)
    prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=text).sample
    return float((prediction - noise).pow(2).mean())


def train(base_path: str, dataset, output_dir: str, args, seed: int, guard: str) -> tuple[str, dict]:
    """Train Diffusion-DPO with LoRA and one guard (or none); return the adapter folder and the training record."""
    trainer, _ = train_on_task(
        "dpo",
        base_path,
        dataset,
        output_dir,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        seed=seed,
        peft_config=LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian"),
        beta=args.beta,
        random_flip=True,
        **GUARDS[guard],
    )
    logs = [log for log in trainer.state.log_history if "mse/policy_chosen" in log]
    (warnings,) = [callback for callback in trainer.callback_handler.callbacks if hasattr(callback, "warned")]
    record = {
        "final_accuracy": logs[-1]["rewards/accuracies"],
        "final_chosen_reward": logs[-1]["rewards/chosen"],
        "final_chosen_error_ratio": logs[-1]["mse/policy_chosen"] / logs[-1]["mse/ref_chosen"],
        "warnings": sorted(warnings.warned),
    }
    return output_dir, record


def evaluate(base: StableDiffusionPipeline, adapter: str, num_eval_seeds: int, base_error: float) -> dict:
    prompts = [caption(c) for c in TRAIN_COLOURS]
    seeds = list(range(10_000, 10_000 + num_eval_seeds))
    image_prompts = [p for p in prompts for _ in seeds]
    base_images = generate_images(base, prompts, seeds, 64, num_inference_steps=20)
    base.load_lora_weights(adapter, adapter_name="evaluated")
    try:
        tuned_images = generate_images(base, prompts, seeds, 64, num_inference_steps=20)
        tuned_error = data_error(base)
    finally:
        base.delete_adapters("evaluated")
    return {
        "win_rate": win_rate(saturation_scorer(tuned_images), saturation_scorer(base_images)),
        "hue_error_base": float(hue_error(base_images, image_prompts).mean()),
        "hue_error_tuned": float(hue_error(tuned_images, image_prompts).mean()),
        "data_error_ratio": tuned_error / base_error,
    }


def run(args) -> list[dict]:
    os.makedirs(args.output_dir, exist_ok=True)
    base_path = pretrain_base_model(os.path.join(args.output_dir, "base-model"), steps=args.pretrain_steps)
    base = StableDiffusionPipeline.from_pretrained(base_path)
    base.set_progress_bar_config(disable=True)
    base_error = data_error(base)
    records = []
    for seed in args.seeds:
        dataset = self_generated_pairs(base, args.num_pairs, seed=seed)
        for guard in args.guards:
            start = time.time()
            folder = os.path.join(args.output_dir, f"{guard}-seed{seed}")
            adapter, record = train(base_path, dataset, folder, args, seed, guard)
            record = {
                "guard": guard,
                "seed": seed,
                **record,
                **evaluate(base, adapter, args.num_eval_seeds, base_error),
            }
            record["seconds"] = time.time() - start
            records.append(record)
            print(json.dumps(record), flush=True)
    return records


def markdown(records: list[dict], args, minutes: float) -> str:
    command = command_line("guards.py", sys.argv[1:])
    names = {"none": "no guard", "sft": f"sft_weight={args.sft_weight:g}", "cap": f"max_margin={args.max_margin:g}"}
    lines = [
        START,
        "## Guards against collapse (synthetic task, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Device: CPU ({platform.machine()}, {torch.get_num_threads()} thread); torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, trl_diffusion "
        f"{trl_diffusion.__version__}; {minutes:.0f} min.  ",
        f"Diffusion-DPO with LoRA pushed too far: {args.num_pairs} self-generated pairs, {args.max_steps} steps of "
        f"{args.batch_size} pairs at lr {args.learning_rate:g} ({args.learning_rate / EFFICACY_LEARNING_RATE:.0f}× the "
        f"efficacy benchmark's {EFFICACY_LEARNING_RATE:g}), β {args.beta:g}; "
        f"seeds {args.seeds}; evaluation on the {len(TRAIN_COLOURS)} training prompts × {args.num_eval_seeds} unseen "
        "seeds. Mean ± std over seeds. Hue error: mean distance between an image's hue and its caption's, in degrees "
        "(the base model's is shown for scale). Data error: the tuned UNet's denoising error on 256 fresh squares, "
        "relative to the base's (1 = unchanged). Chosen error ratio: the last logged `mse/policy_chosen / "
        "mse/ref_chosen` on the training pairs. Warned: runs in which each collapse warning fired.",
        "",
        "| run | win rate (saturation) | hue error (°) | base hue error (°) | data error ratio | chosen error ratio "
        "| final accuracy | warned (reward < 0 / chosen error) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for guard in args.guards:
        rows = [r for r in records if r["guard"] == guard]

        def stat(key, fmt, rows=rows):
            values = np.asarray([r[key] for r in rows], dtype=float)
            return f"{values.mean():{fmt}} ± {values.std():{fmt}}"

        hacking = sum("reward_hacking" in r["warnings"] for r in rows)
        chosen = sum("chosen_error" in r["warnings"] for r in rows)
        lines.append(
            f"| {names[guard]} | {stat('win_rate', '.1%')} | {stat('hue_error_tuned', '.1f')} | "
            f"{stat('hue_error_base', '.1f')} | {stat('data_error_ratio', '.2f')} | "
            f"{stat('final_chosen_error_ratio', '.2f')} | {stat('final_accuracy', '.2f')} | "
            f"{hacking}/{len(rows)} / {chosen}/{len(rows)} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> None:
    torch.set_num_threads(1)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    args = parse_args(argv)
    start = time.time()
    records = run(args)
    with open(os.path.join(args.output_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    section = markdown(records, args, (time.time() - start) / 60)
    print(section)
    if args.results:
        write_section(args.results, section, START, END)


if __name__ == "__main__":
    main()
