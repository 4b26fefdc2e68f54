"""
Diffusion-DPO (Wallace et al. 2023) on a Pick-a-Pic-style preference dataset.

# LoRA on Stable Diffusion 1.5, 8 GPUs
```bash
accelerate launch --config_file multi_gpu.yaml trl_diffusion/scripts/diffusion_dpo.py \
    --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
    --dataset_name data-is-better-together/open-image-preferences-v1-binarized \
    --dataset_train_split train \
    --use_peft --lora_r 8 --lora_alpha 8 \
    --beta 2500 \
    --learning_rate 1e-5 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 2 \
    --max_steps 2000 \
    --output_dir sd15-diffusion-dpo
```

# Full fine-tuning of SDXL with DeepSpeed ZeRO-2 (and a TR-DPO reference refresh)
```bash
trl-diffusion dpo --accelerate_config zero2 --config examples/scripts/sdxl_dpo.yaml \
    --sync_ref_model --ref_model_mixup_alpha 0.6 --ref_model_sync_steps 256
```

# A CPU smoke run on the bundled tiny data and the offline tiny model
```bash
trl-diffusion dpo --config examples/scripts/sd15_dpo_tiny.yaml
```
"""

import argparse


def main(script_args, training_args, model_args):
    from trl_diffusion import DiffusionDPOTrainer
    from trl_diffusion.scripts.utils import run_training

    return run_training(DiffusionDPOTrainer, script_args, training_args, model_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl_diffusion import DiffusionDPOConfig
    from trl_diffusion.scripts.utils import make_script_parser

    return make_script_parser(DiffusionDPOConfig, "dpo", "Run Diffusion-DPO training", subparsers, prog)


def cli_main(argv: list[str] | None = None):
    """Parse ``argv`` (the command line when `None`) as the script's command line and run it: trains Diffusion-DPO.

    Tests and other programs call this rather than copy the ``__main__`` block. Returns the trainer.
    """
    from trl_diffusion.scripts.utils import run_script

    return run_script(make_parser, main, argv)


if __name__ == "__main__":
    cli_main()
