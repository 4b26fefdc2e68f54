import textwrap

from trl.trainer.callbacks import SyncRefModelCallback

from ..losses import diffusion_dpo_loss
from .base_trainer import DiffusionPreferenceTrainer
from .diffusion_dpo_config import DiffusionDPOConfig


class DiffusionDPOTrainer(DiffusionPreferenceTrainer):
    """Trainer for Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908).

    The per-sample denoising error stands in for the negative log-likelihood, measured against a frozen reference:
    ``L = -mean log σ(β·((r_w − r_l) − (e_w − e_l)))`` (Eq. 14; see [`diffusion_dpo_loss`][] for the other loss types).
    With LoRA the reference is the base network with adapters disabled; with full fine-tuning it is a frozen copy.

    Example:
        ```python
        from datasets import load_dataset
        from peft import LoraConfig
        from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer

        dataset = load_dataset("data-is-better-together/open-image-preferences-v1-binarized", split="train")
        trainer = DiffusionDPOTrainer(
            model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            args=DiffusionDPOConfig(output_dir="sd15-dpo", per_device_train_batch_size=8, max_steps=2000),
            train_dataset=dataset,
            peft_config=LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian"),
        )
        trainer.train()
        ```

    See [`DiffusionPreferenceTrainer`][] for the arguments.
    """

    _tag_names = ["trl", "trl-diffusion", "diffusion-dpo"]
    _name = "Diffusion-DPO"
    _paper = {
        "title": "Diffusion Model Alignment Using Direct Preference Optimization",
        "id": "2311.12908",
        "citation": textwrap.dedent(
            """\
            @inproceedings{wallace2024diffusion,
                title     = {{Diffusion Model Alignment Using Direct Preference Optimization}},
                author    = {Bram Wallace and Meihua Dang and Rafael Rafailov and Linqi Zhou and Aaron Lou and Senthil Purushwalkam and Stefano Ermon and Caiming Xiong and Shafiq Joty and Nikhil Naik},
                booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
                year      = 2024
            }"""
        ),
    }
    config_class = DiffusionDPOConfig
    args: DiffusionDPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.sync_ref_model:
            if self.is_peft:
                raise ValueError(
                    "sync_ref_model=True needs full fine-tuning: with LoRA the reference is the base network with its "
                    "adapters disabled, so there is no separate reference copy to update."
                )
            # TRL's own callback: `ref ← α·policy + (1 − α)·ref` every `ref_model_sync_steps` (ZeRO-3 aware).
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))

    def preference_loss(self, step, policy_errors):
        policy_chosen, policy_rejected = policy_errors.chunk(2)
        ref_chosen, ref_rejected = step.ref_errors.chunk(2)
        return diffusion_dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=self.args.beta,
            loss_type=self.args.loss_type,
            label_smoothing=self.args.label_smoothing,
            sft_weight=self.args.sft_weight,
            max_margin=self.args.max_margin,
        )

    def model_card_hyperparameters(self):
        args = self.args
        return {
            "beta": args.beta,
            "loss_type": args.loss_type,
            "label_smoothing": args.label_smoothing,
            **({"sft_weight": args.sft_weight} if args.sft_weight else {}),
            **({"max_margin": args.max_margin} if args.max_margin is not None else {}),
            **super().model_card_hyperparameters(),
        }
