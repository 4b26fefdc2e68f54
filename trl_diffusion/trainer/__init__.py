from .adaptive_dpo_config import AdaptiveDPOConfig
from .adaptive_dpo_trainer import AdaptiveDPOTrainer
from .base_config import DiffusionPreferenceConfig
from .base_trainer import DiffusionPreferenceTrainer
from .diffusion_dpo_config import DiffusionDPOConfig
from .diffusion_dpo_trainer import DiffusionDPOTrainer
from .diffusion_kto_config import DiffusionKTOConfig
from .diffusion_kto_trainer import DiffusionKTOTrainer
from .mapo_config import MaPOConfig
from .mapo_trainer import MaPOTrainer


# Every method by short name: (trainer class, config class). Used by the demo, the benchmarks and the tests.
METHODS: dict[str, tuple[type[DiffusionPreferenceTrainer], type[DiffusionPreferenceConfig]]] = {
    "dpo": (DiffusionDPOTrainer, DiffusionDPOConfig),
    "mapo": (MaPOTrainer, MaPOConfig),
    "adaptive": (AdaptiveDPOTrainer, AdaptiveDPOConfig),
    "kto": (DiffusionKTOTrainer, DiffusionKTOConfig),
}

__all__ = [
    "METHODS",
    "AdaptiveDPOConfig",
    "AdaptiveDPOTrainer",
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionKTOConfig",
    "DiffusionKTOTrainer",
    "DiffusionPreferenceConfig",
    "DiffusionPreferenceTrainer",
    "MaPOConfig",
    "MaPOTrainer",
]
