"""trl_diffusion: TRL-style trainers that align text-to-image diffusion models with human preferences."""

__version__ = "0.1.0.dev0"

from .data import DiffusionPreferenceCollator, PreferenceDataset
from .losses import adaptive_dpo_loss, diffusion_dpo_loss, diffusion_kto_loss, mapo_loss, minority_scores
from .model_config import DiffusionModelConfig
from .pair_folders import load_pair_folder
from .preference_pairs import PreferencePairs, generate_preference_pairs, save_preference_pairs
from .streaming import StreamingPreferenceDataset
from .trainer import (
    METHODS,
    AdaptiveDPOConfig,
    AdaptiveDPOTrainer,
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionKTOConfig,
    DiffusionKTOTrainer,
    DiffusionPreferenceConfig,
    DiffusionPreferenceTrainer,
    MaPOConfig,
    MaPOTrainer,
)
from .unpaired import UnpairedPreferenceDataset, unpair_preference_dataset


__all__ = [
    "METHODS",
    "AdaptiveDPOConfig",
    "AdaptiveDPOTrainer",
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionKTOConfig",
    "DiffusionKTOTrainer",
    "DiffusionModelConfig",
    "DiffusionPreferenceCollator",
    "DiffusionPreferenceConfig",
    "DiffusionPreferenceTrainer",
    "MaPOConfig",
    "MaPOTrainer",
    "PreferenceDataset",
    "PreferencePairs",
    "StreamingPreferenceDataset",
    "UnpairedPreferenceDataset",
    "adaptive_dpo_loss",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "generate_preference_pairs",
    "load_pair_folder",
    "mapo_loss",
    "minority_scores",
    "save_preference_pairs",
    "unpair_preference_dataset",
]
