"""
Minority-aware Adaptive-DPO (arXiv 2503.16921): Diffusion-DPO with per-pair weights from EMA annotators.

# LoRA on Stable Diffusion 1.5, 8 GPUs
```bash
accelerate launch --config_file multi_gpu.yaml trl_diffusion/scripts/adaptive_dpo.py \
    --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
    --dataset_name data-is-better-together/open-image-preferences-v1-binarized \
    --dataset_train_split train \
    --use_peft --lora_r 8 --lora_alpha 8 \
    --beta 1000 --rho 15 \
    --annotator_ema_decays 0.5 0.9999 \
    --save_minority_scores \
    --learning_rate 1e-5 \
    --per_device_train_batch_size 8 \
    --max_steps 2000 \
    --output_dir sd15-adaptive-dpo
```

# Full fine-tuning with FSDP2 (the reference and the EMA annotators are sharded like the policy)
```bash
trl-diffusion adaptive --accelerate_config fsdp2 --config examples/scripts/sd15_adaptive_dpo.yaml --use_peft false
```

# A CPU smoke run on the bundled tiny data
```bash
trl-diffusion adaptive --config examples/scripts/sd15_dpo_tiny.yaml --beta 1000 --output_dir tiny-adaptive
```
"""

import argparse


def main(script_args, training_args, model_args):
    from trl_diffusion import AdaptiveDPOTrainer
    from trl_diffusion.scripts.utils import run_training

    return run_training(AdaptiveDPOTrainer, script_args, training_args, model_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl_diffusion import AdaptiveDPOConfig
    from trl_diffusion.scripts.utils import make_script_parser

    return make_script_parser(AdaptiveDPOConfig, "adaptive", "Run Adaptive-DPO training", subparsers, prog)


def cli_main(argv: list[str] | None = None):
    """Parse ``argv`` (the command line when `None`) as the script's command line and run it: trains Adaptive-DPO.

    Tests and other programs call this rather than copy the ``__main__`` block. Returns the trainer.
    """
    from trl_diffusion.scripts.utils import run_script

    return run_script(make_parser, main, argv)


if __name__ == "__main__":
    cli_main()
