from dataclasses import dataclass, field

from .base_config import DiffusionPreferenceConfig


@dataclass
class DiffusionKTOConfig(DiffusionPreferenceConfig):
    """Configuration class for the [`DiffusionKTOTrainer`][] (Li et al. 2024, arXiv 2404.04465).

    Only the parameters specific to Diffusion-KTO are listed here; see [`DiffusionPreferenceConfig`][] for the data and
    step options and `transformers.TrainingArguments` for the rest. `per_device_train_batch_size` counts images
    (rows), where the pairwise methods count pairs: give KTO twice the pairwise batch for the same images per step.

    Args:
        beta: Scale of the implicit reward `g = r − e` inside the utility, `σ(±β·(g − z₀))`. The authors' code uses the
            same error scale (means over channels and pixels) and the default 1000. Defaults to `1000.0`.
        desirable_weight: `λ_D`, the weight of a desirable image's loss. With unbalanced data, choose the weights so
            that `λ_D·n_D / (λ_U·n_U)` lies in `[1, 4/3]` (the KTO paper's advice; the trainer warns outside it).
            Defaults to `1.0`.
        undesirable_weight: `λ_U`, the weight of an undesirable image's loss. Defaults to `1.0`.
        prompt_column: Prompt column of the unpaired rows. Defaults to `"prompt"`.
        image_column: Image column of the unpaired rows (TRL's `completion` is accepted when this one is missing).
            Defaults to `"image"`.
        desirable_column: Label column: `True` (or 1) for a desirable image, `False` (or 0) for an undesirable one. A
            pairwise dataset (Pick-a-Pic or TRL-style columns) is unpaired instead, each pair giving one row of each.
            Defaults to `"label"`.
    """

    beta: float = field(default=1000.0, metadata={"help": "Scale of the implicit reward inside the utility."})
    desirable_weight: float = field(default=1.0, metadata={"help": "lambda_D: weight of desirable images' losses."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "lambda_U: weight of undesirable images' losses."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of the unpaired rows."})
    image_column: str = field(default="image", metadata={"help": "Image column of the unpaired rows."})
    desirable_column: str = field(
        default="label", metadata={"help": "Label column: True for a desirable image, False for an undesirable one."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError(
                "desirable_weight and undesirable_weight must be non-negative, got "
                f"{self.desirable_weight} and {self.undesirable_weight}."
            )
