import csv
import os
import textwrap

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerState
from transformers.utils import logging

from ..callbacks import AnnotatorEMACallback
from ..losses import adaptive_dpo_loss_from_errors, annotator_ema_decay, minority_warmup
from .adaptive_dpo_config import AdaptiveDPOConfig
from .base_trainer import DiffusionPreferenceTrainer
from .distributed import gathered_parameters, prepare_frozen_model


ANNOTATORS_FILE = "ema_annotators.safetensors"
MINORITY_SCORES_FILE = "minority_scores.csv"
NUM_UPDATES_KEY = "num_updates"

logger = logging.get_logger(__name__)


class AdaptiveDPOTrainer(DiffusionPreferenceTrainer):
    """Trainer for minority-aware Adaptive-DPO (arXiv 2503.16921, "When Preferences Diverge").

    A Diffusion-DPO loss that weights each pair by how reliable its label looks. Annotators (the policy and EMA copies
    of it, `annotator_ema_decays`) each judge a pair by their implicit reward margin; their agreement gives a minority
    score ``u`` per pair (see [`minority_scores`][]), and the loss
    ``L = −mean(w·log σ(β·ℓ − γ))`` down-weights pairs with a high ``u`` (see [`adaptive_dpo_loss`][]).

    The EMA annotators follow the authors' schedule (diffusers `EMAModel`, see [`annotator_ema_decay`][]): the first
    update after an optimizer step makes each a copy of the policy, later ones average with decay
    ``min(d, (1 + s)/(10 + s))``. With LoRA each EMA annotator is an extra adapter on the same network, updated after
    every optimizer step: one no-grad forward each and almost no memory. With full fine-tuning each is a full copy of
    the denoiser in float32 (4 bytes per parameter each: 3.4 GB per annotator for an SD1.5 UNet).

    See [`DiffusionPreferenceTrainer`][] for the arguments.
    """

    _tag_names = ["trl", "trl-diffusion", "adaptive-dpo"]
    _name = "Adaptive-DPO"
    _paper = {
        "title": "When Preferences Diverge: Aligning Diffusion Models with Minority-Aware Adaptive DPO",
        "id": "2503.16921",
        "citation": textwrap.dedent(
            """\
            @article{zhang2025preferences,
                title   = {{When Preferences Diverge: Aligning Diffusion Models with Minority-Aware Adaptive DPO}},
                author  = {Lingfan Zhang and Chen Liu and Chengming Xu and Kai Hu and Donghao Luo and Chengjie Wang and Yanwei Fu and Yuan Yao},
                journal = {arXiv preprint arXiv:2503.16921},
                year    = 2025
            }"""
        ),
    }
    config_class = AdaptiveDPOConfig
    args: AdaptiveDPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        denoiser = self.accelerator.unwrap_model(self.model)
        self.annotator_names = [f"ema_{i}" for i in range(len(self.args.annotator_ema_decays))]
        self.ema_annotators: list[torch.nn.Module] = []
        if self.is_peft:
            config = denoiser.peft_config["default"]
            for name in self.annotator_names:
                denoiser.add_adapter(config, adapter_name=name)
            denoiser.set_adapter("default")
        else:
            for _ in self.annotator_names:
                copy = type(denoiser).from_config(denoiser.config)
                copy.load_state_dict(denoiser.state_dict())
                # Placed like the reference: replicated under DDP and ZeRO-1/2, sharded under ZeRO-3 and FSDP.
                self.ema_annotators.append(prepare_frozen_model(copy.requires_grad_(False).eval(), self.accelerator))
        self.pair_annotators(denoiser)
        if self.is_peft:
            with torch.no_grad():
                for policy_params, annotator_params, _ in self.annotator_pairs:
                    for target, source in zip(annotator_params, policy_params, strict=True):
                        target.data = source.detach().float().clone()
        self.annotator_updates = 0  # EMAModel's `optimization_step`: updates so far, saved with the annotators
        self.add_callback(AnnotatorEMACallback(self))
        self._minority_rows: list[torch.Tensor] = []

    def pair_annotators(self, denoiser: torch.nn.Module) -> None:
        """Set ``annotator_pairs``: ``(policy parameters, annotator parameters, decay)`` for each EMA annotator, in
        matching order. Called again when training begins: FSDP and DeepSpeed replace the policy's parameters."""
        pairs = []
        if self.is_peft:
            named = dict(denoiser.named_parameters())
            policy_names = [name for name in named if ".default." in name]
            for name, decay in zip(self.annotator_names, self.args.annotator_ema_decays, strict=True):
                annotator_names = [policy.replace(".default.", f".{name}.") for policy in policy_names]
                pairs.append(([named[p] for p in policy_names], [named[a] for a in annotator_names], decay))
        else:
            policy = [p for p in denoiser.parameters()]
            for annotator, decay in zip(self.ema_annotators, self.args.annotator_ema_decays, strict=True):
                pairs.append((policy, list(annotator.parameters()), decay))
        self.annotator_pairs: list[tuple[list[torch.nn.Parameter], list[torch.nn.Parameter], float]] = pairs

    @torch.no_grad()
    def update_annotators(self):
        """``θ_ema ← d_s·θ_ema + (1 − d_s)·θ`` for every annotator after an optimizer step, ``d_s`` on the authors'
        schedule ([`annotator_ema_decay`][]: 0 at the first update, so the annotator becomes a copy of the policy)."""
        self.annotator_updates += 1
        # ZeRO-3 partitions parameters: gather them whole for the update (rank 0's result is re-partitioned).
        with gathered_parameters(self.model, *self.ema_annotators, accelerator=self.accelerator):
            for policy_params, annotator_params, decay in self.annotator_pairs:
                sources = [p.detach().to(a.dtype) for p, a in zip(policy_params, annotator_params, strict=True)]
                current = annotator_ema_decay(decay, self.annotator_updates)
                if current == 0.0:
                    torch._foreach_copy_(annotator_params, sources)
                else:
                    torch._foreach_lerp_(annotator_params, sources, 1 - current)

    def auxiliary_errors(self, model, step):
        errors = {}
        if self.is_peft:
            denoiser = self.accelerator.unwrap_model(model)
            try:
                for name in self.annotator_names:
                    denoiser.set_adapter(name)
                    errors[name] = self.denoising_errors(denoiser, step)
            finally:
                denoiser.set_adapter("default")
        else:
            for name, annotator in zip(self.annotator_names, self.ema_annotators, strict=True):
                errors[name] = self.denoising_errors(annotator, step)
        return errors

    def preference_loss(self, step, policy_errors):
        args = self.args
        warmup = minority_warmup(self.state.global_step, args.minority_warmup_steps, len(self.annotator_names))
        loss, metrics = adaptive_dpo_loss_from_errors(
            policy_errors,
            step.ref_errors,
            step.auxiliary_errors,
            beta=args.beta,
            rho=args.rho,
            normalize=args.normalize_margins,
            prior_confidence=step.inputs.get("confidence"),
            warmup=step.mode == "train" and warmup,
            weight_type=args.weight_type,
            k=args.weight_scale,
            c=args.weight_offset,
            margin_type=args.margin_type,
            flip_threshold=args.minority_flip_threshold if args.flip_minority_labels else None,
        )
        if args.save_minority_scores and step.mode == "train":
            self._buffer_minority_scores(step.inputs["row_index"], metrics["adaptive/u_mean"])
        return loss, metrics

    def _buffer_minority_scores(self, row_index: torch.Tensor, u: torch.Tensor) -> None:
        """Keep ``(global_step, dataset row, u)`` of each pair on the device until ``flush_minority_scores``."""
        rows = row_index.to(u.device, torch.float64)
        step_column = torch.full_like(rows, self.state.global_step)
        self._minority_rows.append(torch.stack([step_column, rows, u.double()], dim=1))

    def flush_minority_scores(self):
        """Append the buffered per-pair minority scores (step, dataset row, u) to ``minority_scores.csv``."""
        if not self._minority_rows:
            return
        rows = self.accelerator.gather(torch.cat(self._minority_rows)).tolist()
        self._minority_rows.clear()
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, MINORITY_SCORES_FILE)
        is_new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if is_new:
                writer.writerow(["global_step", "row_index", "minority_score"])
            writer.writerows([int(step), int(row), score] for step, row, score in rows)

    def _annotator_state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            f"{name}.{i}": parameter.detach().contiguous()
            for name, (_, annotator_params, _) in zip(self.annotator_names, self.annotator_pairs, strict=True)
            for i, parameter in enumerate(annotator_params)
        }
        state[NUM_UPDATES_KEY] = torch.tensor(self.annotator_updates, dtype=torch.int64)
        return state

    def save_method_state(self, checkpoint):
        if self.annotator_names:
            save_file(self._annotator_state_dict(), os.path.join(checkpoint, ANNOTATORS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, ANNOTATORS_FILE)
        if not (self.annotator_names and os.path.isfile(path)):
            return
        saved = load_file(path)
        with torch.no_grad():
            for name, (_, annotator_params, _) in zip(self.annotator_names, self.annotator_pairs, strict=True):
                for i, parameter in enumerate(annotator_params):
                    parameter.copy_(saved[f"{name}.{i}"])
        if NUM_UPDATES_KEY in saved:
            self.annotator_updates = int(saved[NUM_UPDATES_KEY])
        else:  # a checkpoint written before the counter was saved: one update per optimizer step
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            self.annotator_updates = state.global_step
            logger.warning(f"{path} has no EMA update count; using the checkpoint's step, {state.global_step}.")

    def model_card_hyperparameters(self):
        args = self.args
        return {
            "beta": args.beta,
            "rho": args.rho,
            "annotator_ema_decays": args.annotator_ema_decays,
            "weight_type": args.weight_type,
            "margin_type": args.margin_type,
            **super().model_card_hyperparameters(),
        }
