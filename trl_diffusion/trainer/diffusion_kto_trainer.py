import logging
import textwrap

from ..losses import diffusion_kto_loss, kto_reference_point
from ..unpaired import UnpairedPreferenceDataset
from .base_trainer import DiffusionPreferenceTrainer
from .diffusion_kto_config import DiffusionKTOConfig


logger = logging.getLogger(__name__)


class DiffusionKTOTrainer(DiffusionPreferenceTrainer):
    """Trainer for Diffusion-KTO (Li et al. 2024, arXiv 2404.04465): alignment from per-image likes and dislikes.

    It trains on unpaired rows (prompt, image, desirable) (see `trl_diffusion.unpaired`); a pairwise dataset is
    unpaired on the way in. Each image has its own noise and timestep, as in the authors' code. The loss is ``L =
    mean(λ_y·(1 − σ(±β·(g − z₀))))`` with the implicit reward ``g = r − e`` and the KL estimate ``z₀ = max(0, mean
    g)``, averaged over processes (see [`diffusion_kto_loss`][]). With LoRA the reference is the base network with
    adapters disabled; with full fine-tuning it is a frozen copy.

    Example:
        ```python
        from datasets import load_dataset
        from peft import LoraConfig
        from trl_diffusion import DiffusionKTOConfig, DiffusionKTOTrainer

        # pairs, unpaired into likes and dislikes
        dataset = load_dataset("data-is-better-together/open-image-preferences-v1-binarized", split="train")
        trainer = DiffusionKTOTrainer(
            model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            args=DiffusionKTOConfig(output_dir="sd15-kto", per_device_train_batch_size=16, max_steps=2000),
            train_dataset=dataset,
            peft_config=LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian"),
        )
        trainer.train()
        ```

    See [`DiffusionPreferenceTrainer`][] for the arguments.
    """

    _tag_names = ["trl", "trl-diffusion", "diffusion-kto"]
    _name = "Diffusion-KTO"
    _paper = {
        "title": "Aligning Diffusion Models by Optimizing Human Utility",
        "id": "2404.04465",
        "citation": textwrap.dedent(
            """\
            @inproceedings{li2024aligning,
                title     = {{Aligning Diffusion Models by Optimizing Human Utility}},
                author    = {Shufan Li and Konstantinos Kallidromitis and Akash Gokul and Yusuke Kato and Kazuki Kozuka},
                booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
                year      = 2024
            }"""
        ),
    }
    config_class = DiffusionKTOConfig
    args: DiffusionKTOConfig
    dataset_class = UnpairedPreferenceDataset
    accuracy_metric = "kto/accuracy"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dataset = getattr(self.train_dataset, "source", self.train_dataset)  # the encoding cache keeps its source
        if isinstance(dataset, UnpairedPreferenceDataset):
            self._check_balance(dataset)

    def _check_balance(self, dataset: UnpairedPreferenceDataset) -> None:
        """Warn, as TRL's KTO trainer does, when ``λ_D·n_D / (λ_U·n_U)`` is outside the KTO paper's ``[1, 4/3]``."""
        num_desirable = dataset.num_desirable
        num_undesirable = len(dataset) - num_desirable
        logger.info("Diffusion-KTO data: %d desirable and %d undesirable images.", num_desirable, num_undesirable)
        if num_desirable == 0 or num_undesirable == 0:
            logger.warning(
                "The training data has only %s images.", "undesirable" if num_desirable == 0 else "desirable"
            )
            return
        ratio = self.args.desirable_weight * num_desirable / (self.args.undesirable_weight * num_undesirable)
        if not 1.0 <= ratio <= 4 / 3:
            logger.warning(
                "desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = %.3g is outside [1, 4/3], "
                "the range the KTO paper recommends; adjust desirable_weight or undesirable_weight.",
                ratio,
            )

    def preference_loss(self, step, policy_errors):
        # The KL estimate z₀: this batch's mean implicit reward, averaged over processes, clamped at 0 (no gradient)
        local = kto_reference_point(policy_errors, step.ref_errors)
        reference_point = self.accelerator.reduce(local, reduction="mean").clamp(min=0)
        return diffusion_kto_loss(
            policy_errors,
            step.ref_errors,
            step.inputs["desirable"],
            beta=self.args.beta,
            desirable_weight=self.args.desirable_weight,
            undesirable_weight=self.args.undesirable_weight,
            reference_point=reference_point,
        )

    def model_card_hyperparameters(self):
        args = self.args
        return {
            "beta": args.beta,
            "desirable_weight": args.desirable_weight,
            "undesirable_weight": args.undesirable_weight,
            **super().model_card_hyperparameters(),
        }
