from dataclasses import dataclass, field

from .base_config import DiffusionPreferenceConfig


@dataclass
class AdaptiveDPOConfig(DiffusionPreferenceConfig):
    """Configuration class for the [`AdaptiveDPOTrainer`][] (minority-aware Adaptive-DPO, arXiv 2503.16921).

    Only the parameters specific to Adaptive-DPO are listed here; see [`DiffusionPreferenceConfig`][] for the data and
    step options and `transformers.TrainingArguments` for the rest.

    Args:
        beta: KL-regularisation strength, on the same scale as `DiffusionDPOConfig.beta` (the authors' setting).
            Defaults to `1000.0`.
        rho: Scale ρ of the annotator margins inside the minority score. Defaults to `15` with normalised margins (the
            authors' setting with EMA annotators) and `1e4` with raw ones (their `logits_rho` default, which their
            policy-only path uses).
        normalize_margins: Divide each annotator's margins by their L2 norm over the batch before scaling by ρ.
            Defaults to the authors' choice: on with EMA annotators, off (raw margins) when the policy judges alone.
        annotator_ema_decays: Decays `d` of the EMA copies of the policy that judge each pair beside the policy itself,
            on the authors' schedule (diffusers `EMAModel`'s defaults): the first update after an optimizer step copies
            the policy, update `s + 1` (`s ≥ 1`) uses decay `min(d, (1 + s)/(10 + s))`. With LoRA each is an extra
            adapter on the same network (one no-grad forward each, almost no memory); with full fine-tuning each is a
            full copy of the denoiser. Empty: the policy alone judges, and `u = 1 − σ(ρ·ℓ)`. Defaults to
            `[0.5, 0.9999]`.
        minority_warmup_steps: Optimizer steps during which `u = 0` (plain DPO), while the EMA annotators settle. Only
            with EMA annotators: the policy alone scores pairs from the first step, as in the authors' code. Defaults
            to `2`.
        weight_type: Pair weight `w = 1/(k·u + c)` (`"linear"`) or `1/(k·u² + c)` (`"quadratic"`). Defaults to
            `"linear"`.
        weight_scale: `k` of the pair weight. Defaults to `10.0`.
        weight_offset: `c` of the pair weight. Defaults to `1.0`.
        margin_type: Adaptive margin `γ = −u²/β + mean(ℓ)` (`"quadratic"`), `−u/β + mean(ℓ)` (`"linear"`) or `0`
            (`"none"`). Defaults to `"quadratic"`.
        flip_minority_labels: Beyond the paper: treat pairs with `u > minority_flip_threshold` as mislabelled and
            negate their margin, so the loss pulls towards the other image. Only for data known to hold flipped labels.
            Defaults to `False`.
        minority_flip_threshold: Minority score above which `flip_minority_labels` flips a pair. Defaults to `0.5`.
        save_minority_scores: Append each training pair's `u` with its dataset row index and step to
            `output_dir/minority_scores.csv`, to inspect which pairs were judged minority. Defaults to `False`.
    """

    beta: float = field(default=1000.0, metadata={"help": "KL strength, on the Diffusion-DPO scale."})
    rho: float | None = field(
        default=None,
        metadata={"help": "Scale of the annotator margins; default 15 (normalised margins) or 1e4 (raw margins)."},
    )
    normalize_margins: bool | None = field(
        default=None,
        metadata={"help": "L2-normalise each annotator's margins over the batch; default: only with EMA annotators."},
    )
    annotator_ema_decays: list[float] = field(
        default_factory=lambda: [0.5, 0.9999],
        metadata={
            "help": "Decays of the EMA annotators (diffusers EMAModel schedule); empty: the policy judges alone."
        },
    )
    minority_warmup_steps: int = field(
        default=2, metadata={"help": "Optimizer steps with u = 0 while the annotators settle."}
    )
    weight_type: str = field(
        default="linear",
        metadata={"help": "Pair weight 1/(k*u + c) or 1/(k*u^2 + c).", "choices": ["linear", "quadratic"]},
    )
    weight_scale: float = field(default=10.0, metadata={"help": "k of the pair weight."})
    weight_offset: float = field(default=1.0, metadata={"help": "c of the pair weight."})
    margin_type: str = field(
        default="quadratic",
        metadata={"help": "Adaptive margin gamma.", "choices": ["quadratic", "linear", "none"]},
    )
    flip_minority_labels: bool = field(
        default=False, metadata={"help": "Negate the margin of pairs whose u exceeds minority_flip_threshold."}
    )
    minority_flip_threshold: float = field(
        default=0.5, metadata={"help": "Minority score above which flip_minority_labels flips a pair."}
    )
    save_minority_scores: bool = field(
        default=False, metadata={"help": "Write each pair's u, row index and step to output_dir/minority_scores.csv."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if any(not 0.0 <= decay < 1.0 for decay in self.annotator_ema_decays):
            raise ValueError(f"annotator_ema_decays must lie in [0, 1), got {self.annotator_ema_decays}.")
        if self.normalize_margins is None:
            self.normalize_margins = bool(self.annotator_ema_decays)
        if self.rho is None:
            self.rho = 15.0 if self.normalize_margins else 1e4
        if self.rho <= 0:
            raise ValueError(f"rho must be positive, got {self.rho}.")
        if self.weight_type not in ("linear", "quadratic"):
            raise ValueError(f"weight_type must be 'linear' or 'quadratic', got {self.weight_type!r}.")
        if self.margin_type not in ("quadratic", "linear", "none"):
            raise ValueError(f"margin_type must be 'quadratic', 'linear' or 'none', got {self.margin_type!r}.")
        if self.weight_offset <= 0 or self.weight_scale < 0:
            raise ValueError("weight_offset must be positive and weight_scale non-negative.")
