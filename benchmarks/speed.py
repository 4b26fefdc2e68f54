"""Speed and memory benchmark: trl_diffusion's trainers against a per-step baseline, same model, data and batch.

Runners, for every (method, configuration):

- ``baseline``: a training loop written here that works the way the public diffusers Diffusion-DPO scripts
  (``examples/research_projects/diffusion_dpo/train_diffusion_dpo{,_sdxl}.py``) do: images decoded, resized and
  tokenized in the main process (their default ``dataloader_num_workers=0``), the VAE and the text encoder(s) run on
  every step, the reference is the same UNet with its LoRA adapters disabled (or, for full fine-tuning, a separate
  frozen copy), ``torch.optim.AdamW``, bf16 autocast on a GPU, gradient clipping and per-step logging of the loss and
  implicit accuracy with ``.item()``. MaPO's baseline is the same loop with the MaPO authors' loss and no reference.
- ``trainer``: our trainer with its defaults (encoding cache, data-loader workers, fused AdamW, logging every 10 steps).
- ``trainer_nocache``: our trainer with ``precompute_encodings=False``, to isolate what the cache is worth.

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
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime


HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "RESULTS.md")

# resolution, source image size (width, height), pairs per batch, timed steps, warm-up steps
SIZES = {
    "tiny": {"resolution": 64, "source": (80, 64), "batch": 4, "steps": 10, "warmup": 2},
    "sd15": {"resolution": 512, "source": (640, 512), "batch": 4, "steps": 20, "warmup": 3},
    "sdxl": {"resolution": 1024, "source": (1280, 1024), "batch": 2, "steps": 10, "warmup": 3},
}
CONFIGURATIONS = {"dpo-lora": ("dpo", "lora"), "dpo-full": ("dpo", "full"), "mapo-lora": ("mapo", "lora")}
RUNNERS = ("baseline", "trainer", "trainer_nocache")
LORA_RANK = 8
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LEARNING_RATE = 1e-5
DPO_BETA = 2500.0  # our scale; the diffusers script's `beta_dpo` multiplies its loss by -0.5, so it takes 5000
MAPO_BETA = 0.1
# Dense bf16 peak FLOP/s (no sparsity), by device-name fragment, for MFU
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


# ----- model and data -----


def _clip_text_model(tokenizer, hidden, layers, heads, intermediate, act, projection=None, seed=0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
    import torch
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


def build_model(size: str, directory: str) -> str:
    """Save the benchmark's pipeline (random weights) to ``directory`` once; return its path."""
    if os.path.isfile(os.path.join(directory, "model_index.json")):
        return directory
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from trl_diffusion.testing.tiny_models import build_tiny_clip_tokenizer, build_tiny_stable_diffusion

    if size == "tiny":
        return build_tiny_stable_diffusion(directory, sample_size=SIZES["tiny"]["resolution"] // 2)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    tokenizer = build_tiny_clip_tokenizer(os.path.join(directory, "tokenizer"), model_max_length=77)
    if size == "sd15":  # the SD 1.5 configuration: CLIP ViT-L/14 text encoder, 860M-parameter UNet
        text_encoder = _clip_text_model(tokenizer, 768, 12, 12, 3072, "quick_gelu")
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        pipeline = StableDiffusionPipeline(
            vae=_sd_vae(0.18215),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif size == "sdxl":  # SDXL base: CLIP ViT-L + OpenCLIP bigG, 2.6B-parameter UNet
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
        pipeline = StableDiffusionXLPipeline(
            vae=_sd_vae(0.13025, force_upcast=True),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        raise ValueError(f"Unknown size {size!r}; expected one of {sorted(SIZES)}.")
    pipeline.to(torch.bfloat16).save_pretrained(directory)  # the trainers cast what they train back to float32
    return directory


def build_dataset(size: str, num_pairs: int, seed: int = 0):
    """Pick-a-Pic-style rows with JPEG images of the size's source resolution (smooth colours plus noise)."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

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


# ----- measuring -----


class _Measure:
    """Wall time of ``steps`` steps after ``warmup`` ones, and the executed FLOPs of one more step (GPU only)."""

    def __init__(self, warmup: int, steps: int, count_flops: bool):
        self.warmup, self.steps, self.count_flops = warmup, steps, count_flops
        self.start = self.end = None
        self.flops = None
        self._counter = None

    def _sync(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def step_done(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based) has finished."""
        if step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        if step == self.warmup + self.steps:
            self._sync()
            self.end = time.perf_counter()
            if self.count_flops:
                from torch.utils.flop_counter import FlopCounterMode

                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()
        if self._counter is not None and step == self.warmup + self.steps + 1:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()
            self._counter = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + (1 if self.count_flops else 0)

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def _peak_flops(device: str) -> float | None:
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in device:
            return flops
    return None


# ----- the baseline: the diffusers Diffusion-DPO script's way -----


def run_baseline(spec: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    method, finetune = CONFIGURATIONS[spec["configuration"]]
    size = SIZES[spec["size"]]
    resolution, batch_size = size["resolution"], spec["batch"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = device.type == "cuda" and torch.cuda.is_bf16_supported()
    weight_dtype = torch.bfloat16 if mixed else torch.float32
    torch.manual_seed(0)

    pipeline = DiffusionPipeline.from_pretrained(spec["model"])
    sdxl = hasattr(pipeline, "text_encoder_2")
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    vae, unet = pipeline.vae, pipeline.unet
    text_encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if sdxl else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if sdxl else [])
    vae.requires_grad_(False).to(device, torch.float32 if sdxl else weight_dtype)  # SDXL's VAE stays float32
    for encoder in text_encoders:
        encoder.requires_grad_(False).to(device, weight_dtype)
    reference = None
    if finetune == "lora":
        unet.requires_grad_(False).to(device, weight_dtype)
        unet.add_adapter(
            LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    else:
        unet.to(device, torch.float32).requires_grad_(True)
        if method == "dpo":
            reference = type(unet).from_config(unet.config)
            reference.load_state_dict(unet.state_dict())
            reference.requires_grad_(False).to(device, weight_dtype)
    unet.train()
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)

    # Data: decoded, resized, cropped and tokenized in the main process, as the script's `preprocess_train` does.
    dataset = build_dataset(spec["size"], spec["pairs"])

    def to_tensor(data: bytes) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        original = (image.height, image.width)
        scale = resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        top, left = (image.height - resolution) // 2, (image.width - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(array).permute(2, 0, 1), original, (top, left)

    def preprocess(examples):
        pixels, originals, crops = [], [], []
        for first, second, label in zip(examples["jpg_0"], examples["jpg_1"], examples["label_0"], strict=True):
            pair = [to_tensor(first), to_tensor(second)]
            if label == 0:
                pair.reverse()
            pixels.append(torch.cat([pair[0][0], pair[1][0]]))  # (6, H, W): chosen, then rejected
            originals.append([pair[0][1], pair[1][1]])
            crops.append([pair[0][2], pair[1][2]])
        examples["pixel_values"], examples["original_sizes"], examples["crop_top_lefts"] = pixels, originals, crops
        examples["input_ids"] = [
            tokenizer(
                examples["caption"],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tokenizer in tokenizers
        ]
        examples["input_ids"] = list(zip(*examples["input_ids"], strict=True))
        return examples

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": [torch.stack([e["input_ids"][i] for e in examples]) for i in range(len(tokenizers))],
            "original_sizes": [e["original_sizes"] for e in examples],
            "crop_top_lefts": [e["crop_top_lefts"] for e in examples],
        }

    loader = torch.utils.data.DataLoader(
        dataset.with_transform(preprocess), batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=collate
    )

    def encode_prompt(input_ids):
        if not sdxl:
            return text_encoders[0](input_ids[0].to(device))[0], None
        outputs = [
            enc(ids.to(device), output_hidden_states=True) for enc, ids in zip(text_encoders, input_ids, strict=True)
        ]
        return torch.cat([o.hidden_states[-2] for o in outputs], dim=-1), outputs[1].text_embeds

    def unet_forward(network, noisy, timesteps, hidden, pooled, time_ids):
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} if sdxl else {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            return network(noisy, timesteps, hidden, **kwargs).sample

    measure = _Measure(spec["warmup"], spec["steps"], spec["count_flops"])
    step, iterator = 0, iter(loader)
    while step < measure.total_steps:
        batch = next(iterator, None)
        if batch is None:
            iterator = iter(loader)
            continue
        pixel_values = batch["pixel_values"].to(device, vae.dtype)
        feed = torch.cat(pixel_values.chunk(2, dim=1))  # (2B, 3, H, W)
        with torch.no_grad():
            latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in feed.split(8)])
            latents = latents * vae.config.scaling_factor
            hidden, pooled = encode_prompt(batch["input_ids"])
        latents = latents.to(weight_dtype if finetune == "lora" else torch.float32)
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), device=device)
        timesteps = timesteps.long().repeat(2)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = hidden.repeat(2, 1, 1)
        time_ids = None
        if sdxl:
            pooled = pooled.repeat(2, 1)
            ids = [
                list(batch["original_sizes"][i][half])
                + list(batch["crop_top_lefts"][i][half])
                + [resolution, resolution]
                for half in (0, 1)
                for i in range(batch_size)
            ]
            time_ids = torch.tensor(ids, device=device, dtype=weight_dtype)
        model_pred = unet_forward(unet, noisy, timesteps, hidden, pooled, time_ids)
        model_losses = F.mse_loss(model_pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        losses_w, losses_l = model_losses.chunk(2)
        raw_model_loss = 0.5 * (losses_w.mean() + losses_l.mean())
        if method == "dpo":
            with torch.no_grad():
                if reference is None:
                    unet.disable_adapters()
                ref_pred = unet_forward(
                    reference if reference is not None else unet, noisy, timesteps, hidden, pooled, time_ids
                )
                if reference is None:
                    unet.enable_adapters()
                ref_losses = F.mse_loss(ref_pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
                ref_w, ref_l = ref_losses.chunk(2)
                raw_ref_loss = ref_losses.mean()
            inside = -0.5 * (2 * DPO_BETA) * ((losses_w - losses_l) - (ref_w - ref_l))
            implicit_acc = (inside > 0).sum().float() / inside.size(0)
            loss = -F.logsigmoid(inside).mean()
        else:  # the MaPO authors' loss
            snr = 0.5
            log_odds = (snr * losses_w) / (torch.exp(snr * losses_w) - 1) - (snr * losses_l) / (
                torch.exp(snr * losses_l) - 1
            )
            ratio = F.logsigmoid(log_odds * noise_scheduler.config.num_train_timesteps)
            loss = losses_w.mean() - MAPO_BETA * ratio.mean()
            implicit_acc, raw_ref_loss = (log_odds > 0).float().mean(), torch.zeros(())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The script logs these on every step (progress bar postfix): four device-to-host copies.
        logs = {
            "loss": loss.detach().item(),
            "raw_model_loss": raw_model_loss.detach().item(),
            "ref_loss": raw_ref_loss.detach().item(),
            "implicit_acc": implicit_acc.detach().item(),
        }
        assert math.isfinite(logs["loss"])
        step += 1
        measure.step_done(step)
    return {"s_per_step": measure.seconds_per_step, "peak_bytes": _peak_bytes(), "flops_per_step": measure.flops}


# ----- our trainers, with their defaults -----


def run_trainer(spec: dict, cache: bool) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer, MaPOConfig, MaPOTrainer

    method, finetune = CONFIGURATIONS[spec["configuration"]]
    trainer_class, config_class = {
        "dpo": (DiffusionDPOTrainer, DiffusionDPOConfig),
        "mapo": (MaPOTrainer, MaPOConfig),
    }[method]
    measure = _Measure(spec["warmup"], spec["steps"], spec["count_flops"])
    dataset = build_dataset(spec["size"], spec["pairs"])
    workdir = tempfile.mkdtemp(prefix="trl-diffusion-speed-")
    settings = {
        "output_dir": os.path.join(workdir, "out"),
        "encodings_cache_dir": os.path.join(workdir, "encodings"),  # fresh: set-up includes computing the cache
        "max_steps": measure.total_steps,
        "per_device_train_batch_size": spec["batch"],
        "resolution": SIZES[spec["size"]]["resolution"],
        "learning_rate": LEARNING_RATE,
        "beta": DPO_BETA if method == "dpo" else MAPO_BETA,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
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

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            measure.step_done(state.global_step)

    start = time.perf_counter()
    trainer = trainer_class(
        model=spec["model"], args=config_class(**settings), train_dataset=dataset, peft_config=peft_config
    )
    setup = time.perf_counter() - start
    trainer.add_callback(Timer())
    trainer.train()
    return {
        "s_per_step": measure.seconds_per_step,
        "peak_bytes": _peak_bytes(),
        "flops_per_step": measure.flops,
        "setup_s": setup,
        "cached": type(trainer.train_dataset).__name__ == "EncodedPreferenceDataset",
        "optim": str(trainer.args.optim),
        "dataloader_num_workers": trainer.args.dataloader_num_workers,
        "torch_threads": torch.get_num_threads(),
    }


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["runner"] == "baseline":
        return run_baseline(spec)
    return run_trainer(spec, cache=spec["runner"] == "trainer")


def _run_isolated(spec: dict) -> dict:
    """Run one measurement in a fresh Python process, so that its peak memory is its own."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as output:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            json.dumps(spec),
            "--worker-output",
            output.name,
        ]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"{spec['runner']} ({spec['configuration']}) failed:\n{completed.stderr[-4000:]}")
        return json.load(output)


# ----- report -----


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time per step, with the largest peak memory of all runs."""
    ordered = sorted(runs, key=lambda result: result["s_per_step"])
    return {**ordered[len(ordered) // 2], "peak_bytes": max(result["peak_bytes"] for result in runs)}


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    import trl_diffusion

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "trl_diffusion": getattr(trl_diffusion, "__version__", "dev"),
        "python": platform.python_version(),
    }


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
            f"| {row['method']} | {row['configuration']} | {row['baseline_s_per_step']:.4f} | "
            f"{row['trainer_s_per_step']:.4f} | {row['speedup']:.2f}x | {row['trainer_nocache_s_per_step']:.4f} | "
            f"{row['cache_speedup']:.2f}x | {row['baseline_images_per_s']:.1f} | {row['trainer_images_per_s']:.1f} | "
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


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        result = run(json.loads(args.worker))
        with open(args.worker_output, "w") as f:
            json.dump(result, f)
        return []
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    steps, warmup = args.steps or size["steps"], args.warmup if args.warmup is not None else size["warmup"]
    batch = args.batch or size["batch"]
    count_flops = torch.cuda.is_available()
    model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f"trl-diffusion-speed-{args.size}")
    model = build_model(args.size, model_dir)
    device = _device_name()
    base = {
        "size": args.size,
        "model": model,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        # every step reads new pairs, as in a real epoch (the flop-counting step included)
        "pairs": batch * (steps + warmup + 1),
        "threads": args.threads or torch.get_num_threads(),
        "num_workers": args.num_workers,
        "count_flops": count_flops,
    }
    peak = _peak_flops(device) if count_flops else None
    rows = []
    for configuration in args.configurations:
        repeats = {runner: [] for runner in RUNNERS}
        for repeat in range(args.repeats):  # interleaved, so that a burst of load on a shared machine hits all
            for runner in RUNNERS:
                spec = {**base, "configuration": configuration, "runner": runner}
                print(f"[speed] {args.size} {configuration}: {runner} ({repeat + 1}/{args.repeats})", file=sys.stderr)
                repeats[runner].append(run(spec) if args.in_process else _run_isolated(spec))
        results = {runner: _median_run(runs) for runner, runs in repeats.items()}
        baseline, trainer, nocache = results["baseline"], results["trainer"], results["trainer_nocache"]
        method, finetune = CONFIGURATIONS[configuration]

        def mfu(result):
            if peak is None or result["flops_per_step"] is None:
                return None
            return result["flops_per_step"] / result["s_per_step"] / peak

        rows.append(
            {
                "method": method,
                "configuration": finetune,
                "size": args.size,
                "device": device,
                "baseline_s_per_step": baseline["s_per_step"],
                "trainer_s_per_step": trainer["s_per_step"],
                "speedup": baseline["s_per_step"] / trainer["s_per_step"],
                "baseline_peak_bytes": baseline["peak_bytes"],
                "trainer_peak_bytes": trainer["peak_bytes"],
                "trainer_nocache_s_per_step": nocache["s_per_step"],
                "trainer_nocache_peak_bytes": nocache["peak_bytes"],
                "cache_speedup": nocache["s_per_step"] / trainer["s_per_step"],
                "baseline_images_per_s": 2 * batch / baseline["s_per_step"],
                "trainer_images_per_s": 2 * batch / trainer["s_per_step"],
                "trainer_setup_s": trainer["setup_s"],
                "trainer_nocache_setup_s": nocache["setup_s"],
                "baseline_flops_per_step": baseline["flops_per_step"],
                "trainer_flops_per_step": trainer["flops_per_step"],
                "baseline_mfu": mfu(baseline),
                "trainer_mfu": mfu(trainer),
                "memory_kind": "cuda" if torch.cuda.is_available() else "rss",
                "isolated": not args.in_process,
                "repeats": args.repeats,
                "batch": batch,
                "resolution": size["resolution"],
                "steps": steps,
                "warmup": warmup,
                "trainer_optim": trainer["optim"],
                "trainer_dataloader_num_workers": trainer["dataloader_num_workers"],
                "torch_threads": trainer["torch_threads"],
            }
        )
    command = "python benchmarks/speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    versions = _versions()
    table = markdown(rows, command, versions)
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
