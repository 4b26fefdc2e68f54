from dataclasses import dataclass, field

from .base_config import DiffusionPreferenceConfig


@dataclass
class MaPOConfig(DiffusionPreferenceConfig):
    """Configuration class for the [`MaPOTrainer`][] (Hong et al. 2024, arXiv 2406.06424).

    Only the parameters specific to MaPO are listed here; see [`DiffusionPreferenceConfig`][] for the data and step
    options and `transformers.TrainingArguments` for the rest.

    Args:
        beta: Weight of the margin term: `L = mean(e_w) − β·mean log σ(T·(f(e_w) − f(e_l)))`. MaPO has no reference
            model, so this β is not on the DPO scale. Defaults to `0.1`.
        mapo_snr_value: The constant `s` of the likelihood stand-in `f(e) = s·e / (exp(s·e) − 1)`. Defaults to `0.5`.
    """

    beta: float = field(default=0.1, metadata={"help": "Weight of MaPO's margin term."})
    mapo_snr_value: float = field(
        default=0.5, metadata={"help": "Constant s of the likelihood stand-in f(e) = s*e / (exp(s*e) - 1)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}.")
        if self.mapo_snr_value <= 0:
            raise ValueError(f"mapo_snr_value must be positive, got {self.mapo_snr_value}.")
