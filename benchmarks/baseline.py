"""The baseline of `benchmarks/speed.py`: Diffusion-DPO (and MaPO) trained the way the public diffusers scripts do.

Read it side by side with diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (and
``train_diffusion_dpo_sdxl.py``): the functions come in the script's order and under its names
(``tokenize_captions``, ``encode_prompt``, ``preprocess_train``, ``collate_fn``, then the loop of ``main``), and each
step of the loop is the script's:

- images decoded, resized, centre-cropped and tokenized in the main process (``dataloader_num_workers=0``, the
  script's default), chosen and rejected stacked on the channel axis;
- the VAE and the text encoder(s) run on every step; one noise and one timestep per pair, shared by its two images;
- the reference is the same UNet with its LoRA adapters disabled (for full fine-tuning, a separate frozen copy);
- ``torch.optim.AdamW``, bf16 autocast on a GPU, gradient clipping at 1, and the four logged values (loss, raw
  model and reference losses, implicit accuracy) fetched with ``.item()`` on every step, as its progress bar does.

What differs, and why: no `accelerate.Accelerator` (one process; bf16 autocast by hand), no torchvision (PIL's
bilinear resize and a centre crop, the script's defaults), no horizontal flip, no learning-rate scheduler
(``constant``), no checkpoints, validation or Hub upload; SDXL's VAE stays float32 (the script's default without the
fp16-fix VAE), and MaPO is the same loop with the MaPO authors' loss and no reference. The loss scale is the older
script's ``-0.5 * beta_dpo * (model_diff - ref_diff)`` (so ``beta_dpo`` is twice our β).
"""

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from common import StepClock
from diffusers import DDPMScheduler, DiffusionPipeline
from peft import LoraConfig
from PIL import Image


@dataclass
class BaselineArguments:
    """The script's arguments this loop uses (under the script's names), plus the method and fine-tuning mode."""

    pretrained_model_name_or_path: str
    resolution: int
    train_batch_size: int
    learning_rate: float
    beta_dpo: float
    rank: int
    lora_target_modules: list[str]
    method: str = "dpo"  # or "mapo"
    full_finetune: bool = False
    mapo_beta: float = 0.1
    max_grad_norm: float = 1.0
    vae_encode_batch_size: int = 8


def tokenize_captions(tokenizers, examples) -> list[torch.Tensor]:
    """Padded token ids of the captions, one tensor per tokenizer."""
    return [
        tokenizer(
            examples["caption"],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in tokenizers
    ]


@torch.no_grad()
def encode_prompt(text_encoders, input_ids, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD: the text encoder's last hidden states. SDXL: both encoders' penultimate hidden states, concatenated, and
    the second one's pooled projection."""
    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[0].to(device))[0], None
    outputs = [
        encoder(ids.to(device), output_hidden_states=True)
        for encoder, ids in zip(text_encoders, input_ids, strict=True)
    ]
    return torch.cat([output.hidden_states[-2] for output in outputs], dim=-1), outputs[1].text_embeds


def train_transform(data: bytes, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize (bilinear, shorter side to ``resolution``), centre crop, scale to [-1, 1]; also return the original
    size and the crop's top-left corner (SDXL's micro-conditioning)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    top, left = (image.height - resolution) // 2, (image.width - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1), original, (top, left)


def preprocess_train(examples, tokenizers, resolution: int):
    """Each pair's two images, chosen first, stacked on the channel axis ``(6, H, W)``, and the captions' ids."""
    pixels, originals, crops = [], [], []
    for first, second, label in zip(examples["jpg_0"], examples["jpg_1"], examples["label_0"], strict=True):
        pair = [train_transform(first, resolution), train_transform(second, resolution)]
        if label == 0:
            pair.reverse()
        pixels.append(torch.cat([pair[0][0], pair[1][0]]))
        originals.append([pair[0][1], pair[1][1]])
        crops.append([pair[0][2], pair[1][2]])
    examples["pixel_values"], examples["original_sizes"], examples["crop_top_lefts"] = pixels, originals, crops
    examples["input_ids"] = list(zip(*tokenize_captions(tokenizers, examples), strict=True))
    return examples


def collate_fn(examples, num_tokenizers: int) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": [torch.stack([e["input_ids"][i] for e in examples]) for i in range(num_tokenizers)],
        "original_sizes": [e["original_sizes"] for e in examples],
        "crop_top_lefts": [e["crop_top_lefts"] for e in examples],
    }


def load_models(args: BaselineArguments, device: torch.device, weight_dtype: torch.dtype):
    """The pipeline with frozen VAE and text encoder(s) on ``device``, the UNet to train (LoRA adapters in float32,
    or all of it in float32), and for full-fine-tuning DPO a frozen copy of it as the reference."""
    pipeline = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
    sdxl = hasattr(pipeline, "text_encoder_2")
    pipeline.vae.requires_grad_(False).to(device, torch.float32 if sdxl else weight_dtype)  # SDXL's VAE stays fp32
    for encoder in [pipeline.text_encoder] + ([pipeline.text_encoder_2] if sdxl else []):
        encoder.requires_grad_(False).to(device, weight_dtype)
    unet, reference = pipeline.unet, None
    if not args.full_finetune:
        unet.requires_grad_(False).to(device, weight_dtype)
        lora = LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=args.lora_target_modules
        )
        unet.add_adapter(lora)
        for parameter in unet.parameters():  # only the trainable (LoRA) parameters in float32
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    else:
        unet.to(device, torch.float32).requires_grad_(True)
        if args.method == "dpo":
            reference = type(unet).from_config(unet.config)
            reference.load_state_dict(unet.state_dict())
            reference.requires_grad_(False).to(device, weight_dtype)
    return pipeline, reference


def time_ids(batch, resolution: int, device, dtype) -> torch.Tensor:
    """SDXL's added time ids of the ``2B`` images, chosen half first: original size, crop corner, target size."""
    halves = [
        list(original[half]) + list(crop[half]) + [resolution, resolution]
        for half in (0, 1)
        for original, crop in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)
    ]
    return torch.tensor(halves, device=device, dtype=dtype)


def dpo_loss(losses_w, losses_l, ref_w, ref_l, beta_dpo: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The script's sigmoid loss and implicit accuracy."""
    inside = -0.5 * beta_dpo * ((losses_w - losses_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean(), (inside > 0).sum().float() / inside.size(0)


def mapo_loss(losses_w, losses_l, num_train_timesteps: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The MaPO authors' loss (odds-ratio margin of the errors, ``snr = 0.5``) and the share of positive margins."""
    snr = 0.5
    log_odds = (snr * losses_w) / (torch.exp(snr * losses_w) - 1) - (snr * losses_l) / (torch.exp(snr * losses_l) - 1)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    return losses_w.mean() - beta * ratio.mean(), (log_odds > 0).float().mean()


def predict(network, noisy, timesteps, hidden, pooled, ids, mixed: bool) -> torch.Tensor:
    """The denoiser's prediction, under bf16 autocast with ``mixed``; SDXL's added conditioning with ``pooled``."""
    kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}} if pooled is not None else {}
    with torch.autocast(noisy.device.type, dtype=torch.bfloat16, enabled=mixed):
        return network(noisy, timesteps, hidden, **kwargs).sample


def compute_loss(args: BaselineArguments, pipeline, reference, noise_scheduler, batch, mixed: bool) -> dict:
    """One step's loss, implicit accuracy and raw model and reference losses, as the script's loop body."""
    vae, unet, device = pipeline.vae, pipeline.unet, pipeline.unet.device
    sdxl = hasattr(pipeline, "text_encoder_2")
    text_encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if sdxl else [])
    weight_dtype = torch.bfloat16 if mixed else torch.float32
    # (B, 2 x 3, H, W) -> (2B, 3, H, W): the chosen images, then the rejected ones
    feed_pixel_values = torch.cat(batch["pixel_values"].to(device, vae.dtype).chunk(2, dim=1))
    with torch.no_grad():
        chunks = feed_pixel_values.split(args.vae_encode_batch_size)
        latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in chunks])
        latents = latents * vae.config.scaling_factor
        hidden, pooled = encode_prompt(text_encoders, batch["input_ids"], device)
    latents = latents.to(torch.float32 if args.full_finetune else weight_dtype)
    noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
    bsz = latents.shape[0] // 2
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long().repeat(2)
    noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = hidden.repeat(2, 1, 1)
    ids = None
    if sdxl:
        pooled, ids = pooled.repeat(2, 1), time_ids(batch, args.resolution, device, weight_dtype)
    model_pred = predict(unet, noisy_model_input, timesteps, hidden, pooled, ids, mixed)
    model_losses = F.mse_loss(model_pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    if args.method == "dpo":
        with torch.no_grad():
            if reference is None:
                unet.disable_adapters()
            network = reference if reference is not None else unet
            ref_preds = predict(network, noisy_model_input, timesteps, hidden, pooled, ids, mixed)
            if reference is None:
                unet.enable_adapters()
            ref_loss = F.mse_loss(ref_preds.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
            raw_ref_loss = ref_loss.mean()
        loss, implicit_acc = dpo_loss(model_losses_w, model_losses_l, *ref_loss.chunk(2), args.beta_dpo)
    else:
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        loss, implicit_acc = mapo_loss(model_losses_w, model_losses_l, num_train_timesteps, args.mapo_beta)
        raw_ref_loss = torch.zeros(())
    return {"loss": loss, "raw_model_loss": raw_model_loss, "ref_loss": raw_ref_loss, "implicit_acc": implicit_acc}


def main(args: BaselineArguments, dataset, clock: StepClock) -> None:
    """Train until ``clock.total_steps`` optimizer steps have run, telling ``clock`` after each."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    pipeline, reference = load_models(args, device, torch.bfloat16 if mixed else torch.float32)
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if hasattr(pipeline, "tokenizer_2") else [])
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    pipeline.unet.train()
    params_to_optimize = [p for p in pipeline.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params_to_optimize, lr=args.learning_rate)
    train_dataloader = torch.utils.data.DataLoader(
        dataset.with_transform(lambda examples: preprocess_train(examples, tokenizers, args.resolution)),
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=lambda examples: collate_fn(examples, len(tokenizers)),
    )
    global_step, batches = 0, iter(train_dataloader)
    while global_step < clock.total_steps:
        batch = next(batches, None)
        if batch is None:  # a new epoch
            batches = iter(train_dataloader)
            continue
        losses = compute_loss(args, pipeline, reference, noise_scheduler, batch, mixed)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The script's progress-bar postfix: four device-to-host copies per step.
        logs = {name: value.detach().item() for name, value in losses.items()}
        assert math.isfinite(logs["loss"])
        global_step += 1
        clock.step_done(global_step)
