"""Speed and memory benchmark: every method of `trl_diffusion.METHODS`, with LoRA and with full fine-tuning, in our
trainers and in a per-step baseline, on the same model, data and batch.

Runners, for every (method, fine-tuning) configuration (``--configurations``: ``dpo-lora``, ``dpo-full``,
``mapo-lora``, ... ``kto-full``):

- ``baseline`` (Diffusion-DPO and MaPO): `benchmarks/baseline.py`, a training loop that works the way the public
  diffusers Diffusion-DPO scripts (``examples/research_projects/diffusion_dpo/train_diffusion_dpo{,_sdxl}.py``) do;
  MaPO's is the same loop with the MaPO authors' loss and no reference. The other methods have no public loop to
  compare with: their baseline columns show ``–``.
- ``trainer``: our trainer with its defaults (encoding cache, data-loader workers, fused AdamW, logging every 10 steps).
- ``trainer_nocache``: our trainer with ``precompute_encodings=False``, to isolate what the cache is worth.

Every runner sees the same images per step: an unpaired method (Diffusion-KTO) reads each pair as two rows, so its
batch has twice the rows. The DPO family (Diffusion-DPO, Adaptive-DPO) trains at one β; the others at their defaults.

Each runner runs in a fresh subprocess (``--in-process`` runs them in this one, for smoke tests), so each peak
memory figure is its own: the CUDA allocator's peak on a GPU, the process's peak RSS on a CPU (the main process;
data-loader workers are separate processes). Times are wall-clock over ``--steps`` optimizer steps after
``--warmup`` steps (CUDA-synchronised at both ends only); the trainer's one-time set-up (including computing the
encoding cache) is reported apart. On a GPU one more step runs under ``torch.utils.flop_counter.FlopCounterMode`` for
the executed FLOPs per step, and MFU = FLOPs / (s/step) / the device's dense bf16 peak.

Sizes: ``tiny`` (the tests' tiny SD pipeline at 64 px: a CPU/CI smoke size), ``sd15`` and ``sdxl`` (random weights
in the real architectures' configurations: SD 1.5 at 512 px, SDXL at 1024 px; for a GPU).

    python benchmarks/speed.py --size tiny --threads 1                   # CPU figures, appended to RESULTS.md
    python benchmarks/speed.py --size sd15 --json sd15.json               # on a GPU

The markdown table is appended to ``--results`` (default ``benchmarks/RESULTS.md``) with the device, versions and
command; ``--json PATH`` also writes the rows as a JSON list.
"""

import argparse
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

import baseline
import numpy as np
import torch
from common import (
    ClockCallback,
    StepClock,
    device_name,
    library_versions,
    peak_flops,
    peak_memory_bytes,
    rows_per_pair,
)
from datasets import Dataset
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trl_diffusion import METHODS
from trl_diffusion.testing.tiny_models import build_tiny_clip_tokenizer, build_tiny_stable_diffusion


HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "RESULTS.md")

# resolution, source image size (width, height), pairs per batch, timed steps, warm-up steps
SIZES = {
    "tiny": {"resolution": 64, "source": (80, 64), "batch": 4, "steps": 10, "warmup": 2},
    "sd15": {"resolution": 512, "source": (640, 512), "batch": 4, "steps": 20, "warmup": 3},
    "sdxl": {"resolution": 1024, "source": (1280, 1024), "batch": 2, "steps": 10, "warmup": 3},
}
FINETUNING = ("lora", "full")
# "dpo-lora": ("dpo", "lora"), ... for every method of METHODS
CONFIGURATIONS = {f"{method}-{finetune}": (method, finetune) for method in METHODS for finetune in FINETUNING}
BASELINES = ("dpo", "mapo")  # the methods the baseline loop implements
RUNNERS = ("baseline", "trainer", "trainer_nocache")
LORA_RANK = 8
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LEARNING_RATE = 1e-5
DPO_BETA = 2500.0  # our scale; the diffusers script's `beta_dpo` multiplies its loss by -0.5, so it takes 5000
MAPO_BETA = 0.1
# Per-method config overrides: the DPO family shares one β; the other methods train with their defaults.
METHOD_SETTINGS = {"dpo": {"beta": DPO_BETA}, "adaptive": {"beta": DPO_BETA}, "mapo": {"beta": MAPO_BETA}}


# ----- model and data -----


def _clip_text_model(tokenizer, hidden, layers, heads, intermediate, act, projection=None, seed=0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _sd_vae(scaling_factor: float, seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=scaling_factor,
        **overrides,
    )


def _sd15(directory: str, scheduler) -> StableDiffusionPipeline:
    """The SD 1.5 configuration: CLIP ViT-L/14 text encoder, 860M-parameter UNet."""
    tokenizer = build_tiny_clip_tokenizer(os.path.join(directory, "tokenizer"), model_max_length=77)
    text_encoder = _clip_text_model(tokenizer, 768, 12, 12, 3072, "quick_gelu")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return StableDiffusionPipeline(
        vae=_sd_vae(0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(directory: str, scheduler) -> StableDiffusionXLPipeline:
    """SDXL base: CLIP ViT-L + OpenCLIP bigG, 2.6B-parameter UNet."""
    tokenizer = build_tiny_clip_tokenizer(os.path.join(directory, "tokenizer"), model_max_length=77)
    tokenizer_2 = build_tiny_clip_tokenizer(os.path.join(directory, "tokenizer_2"), model_max_length=77)
    text_encoder = _clip_text_model(tokenizer, 768, 12, 12, 3072, "quick_gelu")
    text_encoder_2 = _clip_text_model(tokenizer_2, 1280, 32, 20, 5120, "gelu", projection=1280, seed=1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return StableDiffusionXLPipeline(
        vae=_sd_vae(0.13025, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_model(size: str, directory: str) -> str:
    """Save the benchmark's pipeline (random weights) to ``directory`` once; return its path."""
    if os.path.isfile(os.path.join(directory, "model_index.json")):
        return directory
    if size == "tiny":
        return build_tiny_stable_diffusion(directory, sample_size=SIZES["tiny"]["resolution"] // 2)
    if size not in ("sd15", "sdxl"):
        raise ValueError(f"Unknown size {size!r}; expected one of {sorted(SIZES)}.")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipeline = (_sd15 if size == "sd15" else _sdxl)(directory, scheduler)
    pipeline.to(torch.bfloat16).save_pretrained(directory)  # the trainers cast what they train back to float32
    return directory


def build_dataset(size: str, num_pairs: int, seed: int = 0) -> Dataset:
    """Pick-a-Pic-style rows with JPEG images of the size's source resolution (smooth colours plus noise)."""
    width, height = SIZES[size]["source"]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)

    def jpeg() -> bytes:
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], axis=-1))
        array = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    for i in range(num_pairs):
        rows["jpg_0"].append(jpeg())
        rows["jpg_1"].append(jpeg())
        rows["label_0"].append(float(i % 2))
        rows["caption"].append(f"a photo of item {i} in a scene, detailed")
    return Dataset.from_dict(rows)


# ----- the runners -----


def run_baseline(spec: dict) -> dict:
    """`benchmarks/baseline.py` on the spec's configuration (Diffusion-DPO or MaPO)."""
    method, finetune = CONFIGURATIONS[spec["configuration"]]
    arguments = baseline.BaselineArguments(
        pretrained_model_name_or_path=spec["model"],
        resolution=SIZES[spec["size"]]["resolution"],
        train_batch_size=spec["batch"],
        learning_rate=LEARNING_RATE,
        beta_dpo=2 * DPO_BETA,
        rank=LORA_RANK,
        lora_target_modules=LORA_TARGETS,
        method=method,
        full_finetune=finetune == "full",
        mapo_beta=MAPO_BETA,
    )
    clock = StepClock(spec["warmup"], spec["steps"], spec["count_flops"])
    baseline.main(arguments, build_dataset(spec["size"], spec["pairs"]), clock)
    return {"s_per_step": clock.seconds_per_step, "peak_bytes": peak_memory_bytes(), "flops_per_step": clock.flops}


def run_trainer(spec: dict, cache: bool) -> dict:
    """Our trainer of the spec's method, with its defaults (``cache=False``: without the encoding cache)."""
    method, finetune = CONFIGURATIONS[spec["configuration"]]
    trainer_class, config_class = METHODS[method]
    clock = StepClock(spec["warmup"], spec["steps"], spec["count_flops"])
    workdir = tempfile.mkdtemp(prefix="trl-diffusion-speed-")
    settings = {
        "output_dir": os.path.join(workdir, "out"),
        "encodings_cache_dir": os.path.join(workdir, "encodings"),  # fresh: set-up includes computing the cache
        "max_steps": clock.total_steps,
        "per_device_train_batch_size": spec["batch"] * rows_per_pair(method),
        "resolution": SIZES[spec["size"]]["resolution"],
        "learning_rate": LEARNING_RATE,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **METHOD_SETTINGS.get(method, {}),
    }
    if not cache:
        settings["precompute_encodings"] = False
    if spec.get("num_workers") is not None:
        settings["dataloader_num_workers"] = spec["num_workers"]
    peft_config = None
    if finetune == "lora":
        peft_config = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    dataset = build_dataset(spec["size"], spec["pairs"])
    start = time.perf_counter()
    trainer = trainer_class(
        model=spec["model"], args=config_class(**settings), train_dataset=dataset, peft_config=peft_config
    )
    setup = time.perf_counter() - start
    trainer.add_callback(ClockCallback(clock))
    trainer.train()
    return {
        "s_per_step": clock.seconds_per_step,
        "peak_bytes": peak_memory_bytes(),
        "flops_per_step": clock.flops,
        "setup_s": setup,
        "cached": type(trainer.train_dataset).__name__ == "EncodedPreferenceDataset",
        "optim": str(trainer.args.optim),
        "dataloader_num_workers": trainer.args.dataloader_num_workers,
        "torch_threads": torch.get_num_threads(),
    }


def run(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    if spec["runner"] == "baseline":
        return run_baseline(spec)
    return run_trainer(spec, cache=spec["runner"] == "trainer")


def _run_isolated(spec: dict) -> dict:
    """Run one measurement in a fresh Python process, so that its peak memory is its own."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as output:
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--worker-output"]
        completed = subprocess.run([*command, output.name], capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"{spec['runner']} ({spec['configuration']}) failed:\n{completed.stderr[-4000:]}")
        return json.load(output)


def runners(configuration: str) -> tuple[str, ...]:
    """The runners of ``configuration``: the baseline only for the methods it implements."""
    method, _ = CONFIGURATIONS[configuration]
    return RUNNERS if method in BASELINES else tuple(runner for runner in RUNNERS if runner != "baseline")


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time per step, with the largest peak memory of all runs."""
    ordered = sorted(runs, key=lambda result: result["s_per_step"])
    return {**ordered[len(ordered) // 2], "peak_bytes": max(result["peak_bytes"] for result in runs)}


def measure(configuration: str, base: dict, repeats: int, in_process: bool) -> dict[str, dict]:
    """The median run of each runner of ``configuration``, the runners interleaved over the ``repeats`` so that a
    burst of load on a shared machine hits all of them."""
    results = {runner: [] for runner in runners(configuration)}
    for repeat in range(repeats):
        for runner in results:
            spec = {**base, "configuration": configuration, "runner": runner}
            print(f"[speed] {base['size']} {configuration}: {runner} ({repeat + 1}/{repeats})", file=sys.stderr)
            results[runner].append(run(spec) if in_process else _run_isolated(spec))
    return {runner: _median_run(runs) for runner, runs in results.items()}


# ----- report -----


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def result_row(configuration: str, results: dict[str, dict], base: dict, peak: float | None) -> dict:
    """The table row of one configuration (``baseline_*`` fields `None` where the method has no baseline)."""
    method, finetune = CONFIGURATIONS[configuration]
    trainer, nocache, none = results["trainer"], results["trainer_nocache"], {}
    reference = results.get("baseline", none)
    images = 2 * base["batch"]

    def mfu(result):
        if peak is None or result.get("flops_per_step") is None:
            return None
        return result["flops_per_step"] / result["s_per_step"] / peak

    return {
        "method": method,
        "configuration": finetune,
        "size": base["size"],
        "device": base["device"],
        "baseline_s_per_step": reference.get("s_per_step"),
        "trainer_s_per_step": trainer["s_per_step"],
        "speedup": _ratio(reference.get("s_per_step"), trainer["s_per_step"]),
        "baseline_peak_bytes": reference.get("peak_bytes"),
        "trainer_peak_bytes": trainer["peak_bytes"],
        "trainer_nocache_s_per_step": nocache["s_per_step"],
        "trainer_nocache_peak_bytes": nocache["peak_bytes"],
        "cache_speedup": nocache["s_per_step"] / trainer["s_per_step"],
        "baseline_images_per_s": _ratio(images, reference.get("s_per_step")),
        "trainer_images_per_s": images / trainer["s_per_step"],
        "trainer_setup_s": trainer["setup_s"],
        "trainer_nocache_setup_s": nocache["setup_s"],
        "baseline_flops_per_step": reference.get("flops_per_step"),
        "trainer_flops_per_step": trainer["flops_per_step"],
        "baseline_mfu": mfu(reference),
        "trainer_mfu": mfu(trainer),
        "memory_kind": "cuda" if torch.cuda.is_available() else "rss",
        "isolated": not base["in_process"],
        "repeats": base["repeats"],
        "batch": base["batch"],
        "resolution": SIZES[base["size"]]["resolution"],
        "steps": base["steps"],
        "warmup": base["warmup"],
        "trainer_optim": trainer["optim"],
        "trainer_dataloader_num_workers": trainer["dataloader_num_workers"],
        "torch_threads": trainer["torch_threads"],
    }


def _cell(value: float | None, fmt: str, unit: str = "") -> str:
    return "–" if value is None else format(value, fmt) + unit


def _gib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**30:.2f} GiB"


def _mfu(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(rows: list[dict], command: str, versions: dict[str, str]) -> str:
    device = rows[0]["device"]
    memory = "CUDA allocator peak" if rows[0]["memory_kind"] == "cuda" else "peak RSS of the training process"
    lines = [
        f"### Speed: `--size {rows[0]['size']}` on {device} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{command}`  ",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + "  ",
        f"Batch: {rows[0]['batch']} pairs ({2 * rows[0]['batch']} images) at {rows[0]['resolution']} px; "
        f"{rows[0]['steps']} timed steps after {rows[0]['warmup']} warm-up steps, median of {rows[0]['repeats']} "
        f"run(s); memory: {memory}; each runner in a "
        f"{'fresh process' if rows[0]['isolated'] else 'shared process (not isolated)'}.",
        "",
        "| method | configuration | baseline s/step | trainer s/step | speed-up | trainer without cache s/step | "
        "cache speed-up | baseline img/s | trainer img/s | baseline peak | trainer peak | trainer set-up s | "
        "baseline MFU | trainer MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['configuration']} | {_cell(row['baseline_s_per_step'], '.4f')} | "
            f"{row['trainer_s_per_step']:.4f} | {_cell(row['speedup'], '.2f', 'x')} | "
            f"{row['trainer_nocache_s_per_step']:.4f} | {row['cache_speedup']:.2f}x | "
            f"{_cell(row['baseline_images_per_s'], '.1f')} | {row['trainer_images_per_s']:.1f} | "
            f"{_gib(row['baseline_peak_bytes'])} | {_gib(row['trainer_peak_bytes'])} | {row['trainer_setup_s']:.1f} | "
            f"{_mfu(row['baseline_mfu'])} | {_mfu(row['trainer_mfu'])} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--steps", type=int, help="timed steps (default: per size)")
    parser.add_argument("--warmup", type=int, help="warm-up steps before timing (default: per size)")
    parser.add_argument("--batch", type=int, help="pairs per batch (default: per size)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per runner; the median time is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--num-workers", type=int, default=None, help="override the trainer's data-loader workers")
    parser.add_argument("--model-dir", help="where the benchmark's pipeline is saved (default: a temp folder)")
    parser.add_argument("--in-process", action="store_true", help="run every runner here (peak memory not isolated)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help="markdown file the table is appended to")
    parser.add_argument("--no-results", action="store_true", help="do not write the markdown table")
    parser.add_argument("--json", help="also write the rows as a JSON list to this path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_settings(args) -> dict:
    """What every runner of this invocation shares: the size, model, batch, step counts, threads and device."""
    size = SIZES[args.size]
    steps, warmup = args.steps or size["steps"], args.warmup if args.warmup is not None else size["warmup"]
    batch = args.batch or size["batch"]
    model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f"trl-diffusion-speed-{args.size}")
    return {
        "size": args.size,
        "model": build_model(args.size, model_dir),
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        # every step reads new pairs, as in a real epoch (the flop-counting step included)
        "pairs": batch * (steps + warmup + 1),
        "threads": args.threads or torch.get_num_threads(),
        "num_workers": args.num_workers,
        "count_flops": torch.cuda.is_available(),
        "device": device_name(),
        "repeats": args.repeats,
        "in_process": args.in_process,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        result = run(json.loads(args.worker))
        with open(args.worker_output, "w") as f:
            json.dump(result, f)
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    base = run_settings(args)
    peak = peak_flops(base["device"]) if base["count_flops"] else None
    rows = []
    for configuration in args.configurations:
        results = measure(configuration, base, args.repeats, args.in_process)
        rows.append(result_row(configuration, results, base, peak))
    command = "python benchmarks/speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command, library_versions())
    print(table)
    if not args.no_results:
        with open(args.results, "a") as f:
            f.write("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
