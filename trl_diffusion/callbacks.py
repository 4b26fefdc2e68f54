"""Training callbacks: validation images for the trackers, the output folder and the model card's widget."""

import json
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import TrainerCallback


if TYPE_CHECKING:
    from .trainer.base_trainer import DiffusionPreferenceTrainer


logger = logging.getLogger(__name__)

VALIDATION_DIR = "images"
WIDGET_FILE = "widget.json"


def validation_image_name(index: int) -> str:
    return f"validation_{index}.png"


def frame_strip(frames: Sequence[Image.Image], num_frames: int = 4) -> Image.Image:
    """``num_frames`` frames of a clip, spread evenly from its first to its last, side by side in one image."""
    count = min(num_frames, len(frames))
    indices = [round(i * (len(frames) - 1) / max(count - 1, 1)) for i in range(count)]
    width, height = frames[0].size
    strip = Image.new("RGB", (width * count, height))
    for position, index in enumerate(indices):
        strip.paste(frames[index].convert("RGB"), (position * width, 0))
    return strip


class ValidationImagesCallback(TrainerCallback):
    """Generate one image per prompt with the policy every ``every_n_steps`` steps and at the end of training.

    For a video family (Wan) each prompt's clip (``num_frames`` frames of the training frame size) is shown as a
    strip of four frames from its first to its last ([`frame_strip`]).

    The images are made with the trainer's own pipeline (the denoiser being trained, LoRA adapters active), one seeded
    generator per prompt so successive rounds are comparable. Each round is logged to TensorBoard and Weights & Biases
    where they are active, and the latest images are saved as ``output_dir/images/validation_{i}.png`` with
    ``images/widget.json`` (prompt and file of each), which the model card turns into its ``widget`` metadata and
    `push_to_hub` uploads with the weights. Every process generates (a sharded denoiser needs all of them); only the
    main process writes.

    Args:
        trainer: the trl_diffusion trainer whose ``family.pipeline`` generates the images.
        prompts: the validation prompts.
        every_n_steps: optimizer steps between rounds; ``0`` only at the end of training.
        num_inference_steps: denoising steps per image.
        guidance_scale: classifier-free guidance scale; ``None`` keeps the pipeline's default.
        seed: seed of the first prompt's generator (prompt ``i`` uses ``seed + i``).
    """

    def __init__(
        self,
        trainer: "DiffusionPreferenceTrainer",
        prompts: Sequence[str],
        every_n_steps: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        seed: int = 0,
    ):
        if not prompts:
            raise ValueError("ValidationImagesCallback needs at least one prompt.")
        self.trainer = trainer
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.generation_kwargs = {"num_inference_steps": num_inference_steps}
        if guidance_scale is not None:
            self.generation_kwargs["guidance_scale"] = guidance_scale
        self.seed = seed
        self.images: list[Image.Image] = []
        self.history: list[tuple[int, list[Image.Image]]] = []
        self._last_step = -1

    @torch.no_grad()
    def generate(self) -> list[Image.Image]:
        """One image per prompt from the current weights."""
        trainer = self.trainer
        pipeline = trainer.family.pipeline
        denoiser = trainer.accelerator.unwrap_model(trainer.model)
        was_training = denoiser.training
        denoiser.eval()
        pipeline.set_progress_bar_config(disable=True)
        dtype, device = trainer.weight_dtype, trainer.accelerator.device
        family = trainer.family
        if family.is_video:
            height, width = family.frame_size
            shape = {"height": height, "width": width, "num_frames": family.num_frames}
        else:
            shape = {"height": trainer.args.resolution, "width": trainer.args.resolution}
        images = []
        try:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for index, prompt in enumerate(self.prompts):
                    generator = torch.Generator().manual_seed(self.seed + index)
                    output = pipeline(
                        prompt=prompt, generator=generator, output_type="pil", **shape, **self.generation_kwargs
                    )
                    images.append(frame_strip(output.frames[0]) if family.is_video else output.images[0])
        finally:
            denoiser.train(was_training)
        return images

    def run(self, args, state) -> list[Image.Image]:
        self._last_step = state.global_step
        self.images = self.generate()
        self.history.append((state.global_step, self.images))
        if state.is_world_process_zero:
            self._save(args.output_dir)
            self._log_to_trackers(state.global_step)
        return self.images

    def _save(self, output_dir: str):
        folder = os.path.join(output_dir, VALIDATION_DIR)
        os.makedirs(folder, exist_ok=True)
        widget = []
        for index, (prompt, image) in enumerate(zip(self.prompts, self.images, strict=True)):
            name = validation_image_name(index)
            image.save(os.path.join(folder, name))
            widget.append({"text": prompt, "output": {"url": f"{VALIDATION_DIR}/{name}"}})
        with open(os.path.join(folder, WIDGET_FILE), "w") as f:
            json.dump(widget, f, indent=1)

    def _log_to_trackers(self, step: int):
        import numpy as np

        for callback in self.trainer.callback_handler.callbacks:
            name = type(callback).__name__
            if name == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
                arrays = np.stack([np.asarray(image.convert("RGB")) for image in self.images])
                callback.tb_writer.add_images("validation", arrays, step, dataformats="NHWC")
            elif name == "WandbCallback" and getattr(callback, "_initialized", False):
                wandb = callback._wandb
                captioned = [wandb.Image(image, caption=prompt) for image, prompt in zip(self.images, self.prompts)]
                wandb.log({"validation": captioned}, commit=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            self.run(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step != self._last_step:
            self.run(args, state)


def read_widget(output_dir: str) -> list[dict] | None:
    """The widget entries a [`ValidationImagesCallback`] left in ``output_dir``, keeping only images that exist."""
    path = os.path.join(output_dir, VALIDATION_DIR, WIDGET_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        entries = json.load(f)
    entries = [entry for entry in entries if os.path.isfile(os.path.join(output_dir, entry["output"]["url"]))]
    return entries or None


class CollapseWarningCallback(TrainerCallback):
    """Warn, once each and in the logs, when the training metrics show the signs of a collapsing preference run.

    Two signs, checked on every training log (the metrics averaged since the previous one):

    - *reward hacking*: ``rewards/chosen < 0`` while the preference accuracy (``accuracy_metric``) is at least
      ``accuracy``: the policy ranks the pairs right by making every image less likely, the chosen ones too (the sign
      OneTrainer warns about);
    - *chosen error rising*: ``mse/policy_chosen > error_ratio * mse/ref_chosen``: the policy denoises the images it
      should prefer worse than the reference does (the failure Diffusion-SDPO describes).

    A sign whose metrics a method does not log (MaPO has no reference) is never checked. ``None`` turns a check off.

    Args:
        accuracy_metric: the logged accuracy (`rewards/accuracies` for the DPO family, `kto/accuracy` for KTO).
        accuracy: accuracy at or above which a negative chosen reward is reported.
        error_ratio: factor by which the policy's chosen error may exceed the reference's before it is reported.
    """

    def __init__(
        self,
        accuracy_metric: str = "rewards/accuracies",
        accuracy: float | None = 0.95,
        error_ratio: float | None = 1.25,
    ):
        self.accuracy_metric = accuracy_metric
        self.accuracy = accuracy
        self.error_ratio = error_ratio
        self.warned: set[str] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # training logs only
            return
        chosen, accuracy = logs.get("rewards/chosen"), logs.get(self.accuracy_metric)
        if self.accuracy is not None and chosen is not None and accuracy is not None:
            if chosen < 0 and accuracy >= self.accuracy:
                self._warn(
                    "reward_hacking",
                    "Step %d: rewards/chosen = %.4g < 0 while %s = %.3f: the policy separates the pairs by making the "
                    "chosen images less likely too, a sign of collapse. Consider a lower learning rate or beta, fewer "
                    "steps, sft_weight or max_margin (docs/guards.md).",
                    state.global_step,
                    chosen,
                    self.accuracy_metric,
                    accuracy,
                )
        policy, reference = logs.get("mse/policy_chosen"), logs.get("mse/ref_chosen")
        if self.error_ratio is not None and policy is not None and reference is not None:
            if policy > self.error_ratio * reference:
                self._warn(
                    "chosen_error",
                    "Step %d: the policy's error on the chosen images (%.4g) is %.2f times the reference's (%.4g), "
                    "above the warning factor %.2f: the policy is losing the images it should prefer. Consider "
                    "sft_weight or max_margin (docs/guards.md).",
                    state.global_step,
                    policy,
                    policy / reference,
                    reference,
                    self.error_ratio,
                )

    def _warn(self, kind: str, message: str, *values) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            logger.warning(message, *values)


class AnnotatorEMACallback(TrainerCallback):
    """Adaptive-DPO's EMA annotators: update them after every optimizer step, and write the buffered minority scores.

    Args:
        trainer: the [`AdaptiveDPOTrainer`] whose public ``pair_annotators``, ``update_annotators`` and
            ``flush_minority_scores`` it calls.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # FSDP (and DeepSpeed) replace the policy's parameters when `train()` prepares the model: pair them anew.
        self.trainer.pair_annotators(self.trainer.accelerator.unwrap_model(self.trainer.model))

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_annotators()

    def on_log(self, args, state, control, **kwargs):
        self.trainer.flush_minority_scores()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.flush_minority_scores()
