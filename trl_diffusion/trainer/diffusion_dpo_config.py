from dataclasses import dataclass, field

from ..losses import DPO_LOSS_TYPES
from .base_config import DiffusionPreferenceConfig


@dataclass
class DiffusionDPOConfig(DiffusionPreferenceConfig):
    """Configuration class for the [`DiffusionDPOTrainer`][] (Wallace et al. 2023, arXiv 2311.12908).

    Only the parameters specific to Diffusion-DPO are listed here; see [`DiffusionPreferenceConfig`][] for the data and
    step options and `transformers.TrainingArguments` for the rest. The guards against collapse are explained in
    `docs/guards.md`.

    Args:
        beta: KL-regularisation strength on the library-wide scale, where the loss is `-log σ(β·ℓ)`. The paper's
            official code writes `-(β'/2)·(...)` with `β' = 5000` (SDXL) or `2000` (SD1.5): divide their number by 2.
            The diffusers research script's `beta_dpo = 2500` is already on our scale. Defaults to `2500.0`.
        loss_type: `"sigmoid"` (the paper), `"hinge"`, `"ipo"`, `"conservative"` (cDPO) or `"robust"` (rDPO). Defaults
            to `"sigmoid"`.
        label_smoothing: Assumed label-flip probability ε of the `"conservative"` and `"robust"` losses, in `[0, 0.5)`.
            Defaults to `0.0`.
        sync_ref_model: TR-DPO ([Gorbatovski et al. 2024](https://huggingface.co/papers/2404.09656)): every
            `ref_model_sync_steps` steps, move the frozen reference towards the policy, `θ_ref ← α·θ + (1 − α)·θ_ref`,
            with TRL's `SyncRefModelCallback`. Full fine-tuning only: with LoRA the reference is the base network with
            adapters disabled, and there is no separate copy to update. Defaults to `False`.
        ref_model_mixup_alpha: α of the TR-DPO update, in `(0, 1]`. Defaults to `0.6`.
        ref_model_sync_steps: τ of the TR-DPO update: optimizer steps between reference updates. Defaults to `512`.

    Args: Guards against collapse:
        sft_weight: Weight `λ` of a supervised anchor on the chosen images, `L += λ·mean(e_w)`: it keeps the policy's
            error on the chosen images from rising while DPO pushes the rejected ones away. `0` turns it off. Defaults
            to `0.0`.
        max_margin: Cap on the scaled margin `β·ℓ` the loss sees: a pair whose margin is above it gives no gradient, so
            DPO stops pushing pairs that are already well separated (SimpleTuner caps the margin for the same reason).
            `None` turns it off. Defaults to `None`.
    """

    beta: float = field(
        default=2500.0,
        metadata={
            "help": "KL strength; the loss is -log sigmoid(beta * margin). The official code's 5000 is our 2500."
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "Loss on beta * margin.", "choices": list(DPO_LOSS_TYPES)},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label-flip probability of the conservative and robust losses, in [0, 0.5)."}
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "TR-DPO: every ref_model_sync_steps, mix the policy into the reference (full fine-tuning)."},
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "TR-DPO alpha: ref = alpha * policy + (1 - alpha) * ref."}
    )
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO tau: steps between reference updates."})
    sft_weight: float = field(
        default=0.0, metadata={"help": "Guard: weight of a supervised anchor on the chosen images (0: off)."}
    )
    max_margin: float | None = field(
        default=None, metadata={"help": "Guard: cap on beta * margin; pairs above it give no gradient (None: off)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}.")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be non-negative, got {self.sft_weight}.")
        if self.max_margin is not None and self.max_margin <= 0:
            raise ValueError(f"max_margin must be positive (or None to turn the cap off), got {self.max_margin}.")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be at least 1, got {self.ref_model_sync_steps}.")
