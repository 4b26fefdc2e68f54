"""Every training callback of the library: validation images, evaluation against the base, run watchdogs.

- [`ValidationImagesCallback`][]: images from the policy every few steps, for the trackers and the model card.
- [`EvaluationCallback`][]: the win rate of the policy over the model it started from, during training.
- [`CollapseWarningCallback`][]: warns when the logged metrics show a collapsing preference run.
- [`NonFiniteGuard`][]: stops (or skips) a step with non-finite values and refuses non-finite saves (its checks are in
  `trl_diffusion.nonfinite`).
- [`AnnotatorEMACallback`][]: updates Adaptive-DPO's EMA annotators after each optimizer step.

The two image callbacks share [`PolicyImagesCallback`][]: one schedule, one way to generate from the weights in
training ([`generating_with_policy`][]) and one way to send images to the trackers ([`log_images`][]).
"""

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import DistributedType, gather_object
from PIL import Image
from transformers import TrainerCallback

from .evaluation import Scorer, generate_images, image_grid, summarize
from .nonfinite import HINT, NonFiniteError, all_finite, nonfinite_rows


if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .trainer.adaptive_dpo_trainer import AdaptiveDPOTrainer
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


# ----- images from the policy -----


@contextmanager
def generating_with_policy(trainer: "DiffusionPreferenceTrainer") -> Iterator["DiffusionPipeline"]:
    """The trainer's own pipeline, ready to generate from the weights in training.

    The denoiser (LoRA adapters active) is put in eval mode and restored afterwards; generation runs without
    gradients, without progress bars, and under autocast to the trainer's compute dtype.

    Args:
        trainer: a trl_diffusion trainer.

    Yields:
        The pipeline (``trainer.family.pipeline``).
    """
    pipeline = trainer.family.pipeline
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    was_training = denoiser.training
    denoiser.eval()
    pipeline.set_progress_bar_config(disable=True)
    dtype, device = trainer.weight_dtype, trainer.accelerator.device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            yield pipeline
    finally:
        denoiser.train(was_training)


def log_images(
    trainer: "DiffusionPreferenceTrainer",
    tag: str,
    images: Sequence[Image.Image],
    step: int,
    captions: Sequence[str] | None = None,
) -> None:
    """Send images to the trainer's active trackers: TensorBoard (one batch of images) and Weights & Biases.

    Args:
        trainer: the trainer whose tracker callbacks receive the images.
        tag: the images' name in the trackers.
        images: equally sized images.
        step: the optimizer step they show (W&B attaches them to the step's next log).
        captions: one caption per image for W&B, or ``None``.
    """
    from transformers.integrations import TensorBoardCallback, WandbCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
            callback.tb_writer.add_images(tag, arrays, step, dataformats="NHWC")
            callback.tb_writer.flush()
        elif isinstance(callback, WandbCallback):
            import wandb

            if wandb.run is not None:
                captions = captions if captions is not None else [None] * len(images)
                logged = [wandb.Image(image, caption=caption) for image, caption in zip(images, captions, strict=True)]
                wandb.log({tag: logged}, commit=False)


class PolicyImagesCallback(TrainerCallback):
    """Run a round of images from the policy every ``every_n_steps`` optimizer steps and at the end of training.

    Subclasses implement [`run`][]. ``every_n_steps = 0`` runs only at the end of training; the end-of-training round
    is skipped when the last step already had one.

    Args:
        trainer: the trl_diffusion trainer whose ``family.pipeline`` generates the images.
        every_n_steps: optimizer steps between rounds.
    """

    def __init__(self, trainer: "DiffusionPreferenceTrainer", every_n_steps: int = 0):
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.last_step = -1  # the step of the last round

    def run(self, args, state) -> None:
        """One round at ``state.global_step``."""
        raise NotImplementedError

    def _run_round(self, args, state) -> None:
        self.last_step = state.global_step
        self.run(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            self._run_round(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step != self.last_step:
            self._run_round(args, state)


class ValidationImagesCallback(PolicyImagesCallback):
    """Generate one image per prompt with the policy every ``every_n_steps`` steps and at the end of training.

    For a video family (Wan) each prompt's clip (``num_frames`` frames of the training frame size) is shown as a
    strip of four frames from its first to its last (`frame_strip`).

    The images are made with the trainer's own pipeline (the denoiser being trained, LoRA adapters active), one seeded
    generator per prompt so successive rounds are comparable. Each round is logged to TensorBoard and Weights & Biases
    where they are active ([`log_images`][], tag ``validation``), and the latest images are saved as
    ``output_dir/images/validation_{i}.png`` with ``images/widget.json`` (prompt and file of each), which the model
    card turns into its ``widget`` metadata and `push_to_hub` uploads with the weights. Every process generates (a
    sharded denoiser needs all of them); only the main process writes.

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
        super().__init__(trainer, every_n_steps)
        self.prompts = list(prompts)
        self.generation_kwargs = {"num_inference_steps": num_inference_steps}
        if guidance_scale is not None:
            self.generation_kwargs["guidance_scale"] = guidance_scale
        self.seed = seed
        self.images: list[Image.Image] = []
        self.history: list[tuple[int, list[Image.Image]]] = []

    def generate(self) -> list[Image.Image]:
        """One image per prompt from the current weights."""
        family = self.trainer.family
        if family.is_video:
            height, width = family.frame_size
            shape = {"height": height, "width": width, "num_frames": family.num_frames}
        else:
            shape = {"height": self.trainer.args.resolution, "width": self.trainer.args.resolution}
        images = []
        with generating_with_policy(self.trainer) as pipeline:
            for index, prompt in enumerate(self.prompts):
                generator = torch.Generator().manual_seed(self.seed + index)
                output = pipeline(
                    prompt=prompt, generator=generator, output_type="pil", **shape, **self.generation_kwargs
                )
                images.append(frame_strip(output.frames[0]) if family.is_video else output.images[0])
        return images

    def run(self, args, state) -> list[Image.Image]:
        self.images = self.generate()
        self.history.append((state.global_step, self.images))
        if state.is_world_process_zero:
            self._save(args.output_dir)
            log_images(self.trainer, "validation", self.images, state.global_step, captions=self.prompts)
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


class EvaluationCallback(PolicyImagesCallback):
    """Every ``eval_every_steps`` optimizer steps, compare the model in training with the model it started from.

    Base images are generated once, when training begins, with the trainer's own pipeline (so they show the initial
    weights, whatever the method); tuned images are generated with the same prompts and seeds from the current
    weights. The win rate, mean score difference and its interval are logged through `Trainer.log` (so every
    tracker receives them) as ``preference_eval/...``, and a base-versus-tuned image grid goes to TensorBoard and
    Weights & Biases where they are active ([`log_images`][], tag ``preference_eval/base_vs_tuned``).

    Args:
        trainer: the trl_diffusion trainer to watch (its ``family.pipeline`` generates the images).
        prompts: evaluation prompts, as for [`evaluate_preference`][trl_diffusion.evaluation.evaluate_preference].
        scorer: ``scorer(images, prompts) -> scores``, as for
            [`evaluate_preference`][trl_diffusion.evaluation.evaluate_preference].
        seeds: the seeds of every prompt's images, the same for the base and the tuned model.
        eval_every_steps: optimizer steps between evaluations; it also runs at the end of training.
        max_grid_images: images per row in the logged grid.
        generation_kwargs: passed to the pipeline.
    """

    def __init__(
        self,
        trainer: "DiffusionPreferenceTrainer",
        prompts: Sequence[str],
        scorer: Scorer,
        seeds: Sequence[int] = (0, 1),
        eval_every_steps: int = 100,
        max_grid_images: int = 8,
        **generation_kwargs: Any,
    ):
        super().__init__(trainer, eval_every_steps)
        self.prompts, self.scorer, self.seeds = list(prompts), scorer, list(seeds)
        self.max_grid_images = max_grid_images
        self.generation_kwargs = {"num_inference_steps": 20, **generation_kwargs}
        self.base_images: list[Image.Image] | None = None
        self.base_scores: np.ndarray | None = None

    @property
    def eval_every_steps(self) -> int:
        return self.every_n_steps

    def _generate(self) -> list[Image.Image]:
        with generating_with_policy(self.trainer) as pipeline:
            return generate_images(pipeline, self.prompts, self.seeds, **self.generation_kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.base_images is None:
            self.base_images = self._generate()
            self.base_scores = np.asarray(self.scorer(self.base_images, self._image_prompts()), dtype=np.float64)

    def _image_prompts(self) -> list[str]:
        return [prompt for prompt in self.prompts for _ in self.seeds]

    def run(self, args, state) -> None:
        self.evaluate(state.global_step)

    def evaluate(self, step: int) -> dict[str, float]:
        """Score the current weights against the base: log and return the win rate and score difference."""
        self.last_step = step
        images = self._generate()
        scores = np.asarray(self.scorer(images, self._image_prompts()), dtype=np.float64)
        rate, mean, low, high = summarize(self.base_scores, scores)
        metrics = {
            "preference_eval/win_rate": rate,
            "preference_eval/score_difference": mean,
            "preference_eval/score_difference_ci_low": low,
            "preference_eval/score_difference_ci_high": high,
        }
        # `Trainer.log` clears `control.should_log`; keep the training log this step may have scheduled.
        should_log = self.trainer.control.should_log
        self.trainer.log(dict(metrics))
        self.trainer.control.should_log = should_log
        count = self.max_grid_images
        grid = image_grid([self.base_images[:count], images[:count]])
        log_images(self.trainer, "preference_eval/base_vs_tuned", [grid], step)
        return metrics


def read_widget(output_dir: str) -> list[dict] | None:
    """The widget entries a [`ValidationImagesCallback`][] left in ``output_dir``, keeping only images that exist."""
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


# ----- the non-finite guard -----


@dataclass
class GuardObservation:
    """What one process saw during one optimizer step: per-term non-finite masks and the rows they belong to."""

    rows: list[int] = field(default_factory=list)
    masks: list[tuple[str, torch.Tensor, list[int]]] = field(default_factory=list)


class NonFiniteGuard(TrainerCallback):
    """Stop (or skip) an optimizer step whose loss, errors or gradients are not finite; refuse non-finite saves.

    Args:
        trainer: the [`DiffusionPreferenceTrainer`][] it guards.
        max_skipped_steps: optimizer steps that may be skipped before training stops (``skip_nonfinite_steps``).
    """

    def __init__(self, trainer: "DiffusionPreferenceTrainer", max_skipped_steps: int = 0):
        self.trainer = trainer
        self.max_skipped_steps = max_skipped_steps
        self.num_skipped_steps = 0
        self._observation = GuardObservation()
        # Micro-batches since the last log, and how many of them had a non-finite loss (a device tensor)
        self._window_micro_batches = 0
        self._window_nonfinite = torch.tensor(0)

    # ----- recording (every micro-batch, no host sync) -----

    def observe(self, rows: torch.Tensor, terms: dict[str, torch.Tensor | None]) -> None:
        """Record the finiteness of a micro-batch's loss and per-sample terms, with its dataset rows."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        self._observation.rows.extend(rows)
        for name, values in terms.items():
            if values is not None:
                self._observation.masks.append((name, ~torch.isfinite(values.detach()), rows))

    # ----- the decision, before each optimizer step -----

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        observation, self._observation = self._observation, GuardObservation()
        masks = [mask.any().reshape(1) for _, mask, _ in observation.masks]
        terms_bad = torch.cat(masks).any() if masks else torch.tensor(False)
        grads_bad = ~all_finite([p.grad for p in trainer.model.parameters() if p.grad is not None])
        device = trainer.accelerator.device
        flags = torch.stack([terms_bad.to(device), grads_bad.to(device)]).float()
        if trainer.accelerator.num_processes > 1:
            flags = trainer.accelerator.reduce(flags, reduction="sum")
        terms_bad, grads_bad = (bool(flag > 0) for flag in flags.tolist())
        # fp16: with a finite loss, an overflowing gradient is skipped by the GradScaler itself (legitimate).
        scaler_handles_it = trainer.accelerator.scaler is not None and not terms_bad
        if not terms_bad and (not grads_bad or scaler_handles_it):
            return
        step = state.global_step + 1
        reports = self._describe(observation, grads_bad)
        if trainer.accelerator.num_processes > 1:
            reports = [report for per_rank in gather_object([reports]) for report in per_rank]
        message = f"Non-finite values at optimizer step {step}: " + "; ".join(reports) + "."
        if self.num_skipped_steps >= self.max_skipped_steps or trainer.is_deepspeed_enabled:
            budget = (
                f" {self.num_skipped_steps} earlier ones were skipped (skip_nonfinite_steps={self.max_skipped_steps})."
                if self.max_skipped_steps
                else ""
            )
            applied = (
                "DeepSpeed applied this update during the backward pass; no checkpoint will hold its weights."
                if trainer.is_deepspeed_enabled
                else "Training stopped before this update was applied: the weights (and every checkpoint) are those "
                "of the last finite step."
            )
            raise NonFiniteError(f"{message}{budget} {applied} {HINT}")
        self.num_skipped_steps += 1
        logger.warning(
            "%s Skipping this update (%d of %d non-finite steps allowed).",
            message,
            self.num_skipped_steps,
            self.max_skipped_steps,
        )
        trainer.model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter (and state) be

    def _describe(self, observation: GuardObservation, grads_bad: bool) -> list[str]:
        """Human-readable findings of this process (only computed once something is known to be non-finite)."""
        process = self.trainer.accelerator.process_index
        where = f" (process {process})" if self.trainer.accelerator.num_processes > 1 else ""
        found: dict[str, set[int]] = {}
        for name, mask, rows in observation.masks:
            bad_rows = nonfinite_rows(mask.cpu(), rows)
            if bad_rows:
                found.setdefault(name, set()).update(bad_rows)
        reports = [f"{name} non-finite for dataset rows {sorted(rows)}{where}" for name, rows in found.items()]
        if grads_bad and process == 0:
            reports.append("gradient norm non-finite")
        if reports:
            reports.append(f"batch rows {observation.rows}{where}")
        return reports

    # ----- saving -----

    def check_weights(self, output_dir: str | None) -> None:
        """Raise [`NonFiniteError`][] instead of saving weights that are not all finite (all processes agree)."""
        trainer = self.trainer
        parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        finite = all_finite([getattr(p, "ds_tensor", p) for p in parameters]).to(trainer.accelerator.device)
        sharded = trainer.is_fsdp_enabled or trainer.accelerator.distributed_type == DistributedType.DEEPSPEED
        if sharded and trainer.accelerator.num_processes > 1:  # each process holds a shard; they all call save
            finite = trainer.accelerator.reduce((~finite).float(), reduction="sum") == 0
        if not bool(finite):
            names = [
                name
                for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
                if p.requires_grad and not bool(all_finite([p]))
            ]
            raise NonFiniteError(
                f"Refusing to save to {output_dir}: at step {trainer.state.global_step} the trainable weights are not "
                f"finite ({len(names)} tensors, e.g. {names[:3]}). The last optimizer update overflowed. " + HINT
            )

    # ----- the logged loss -----

    def loss_to_accumulate(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss the Trainer adds to its running total: 0 where it is not finite (no host sync).

        A NaN in the Trainer's running total would make every later logged loss NaN; transformers' own filter would
        log the first step of a window as 0. [`update_logs`][] divides by the finite micro-batches only.
        """
        finite = torch.isfinite(loss)
        self._window_micro_batches += 1
        self._window_nonfinite = self._window_nonfinite.to(loss.device) + (~finite).long()
        return torch.where(finite, loss, torch.zeros_like(loss))

    def update_logs(self, logs: dict[str, float]) -> None:
        """Correct a training log's ``loss`` to the mean over its finite micro-batches (``nan`` if there are none),
        and add ``nonfinite/skipped_steps`` when skipping is allowed. Runs on every process (it all-reduces)."""
        accelerator = self.trainer.accelerator
        counts = torch.stack([torch.tensor(self._window_micro_batches), self._window_nonfinite.cpu()])
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        total, nonfinite = counts.tolist()
        if nonfinite and "loss" in logs:
            logs["loss"] = logs["loss"] * total / (total - nonfinite) if total > nonfinite else float("nan")
        self._window_micro_batches, self._window_nonfinite = 0, torch.tensor(0)
        if self.max_skipped_steps > 0:
            logs["nonfinite/skipped_steps"] = self.num_skipped_steps


class AnnotatorEMACallback(TrainerCallback):
    """Adaptive-DPO's EMA annotators: update them after every optimizer step, and write the buffered minority scores.

    Args:
        trainer: the [`AdaptiveDPOTrainer`][] whose public ``pair_annotators``, ``update_annotators`` and
            ``flush_minority_scores`` it calls.
    """

    def __init__(self, trainer: "AdaptiveDPOTrainer"):
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
