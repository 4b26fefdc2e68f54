"""
MaPO (Hong et al. 2024): margin-aware preference optimization, no reference model.

# LoRA on SDXL, 8 GPUs
```bash
accelerate launch --config_file multi_gpu.yaml trl_diffusion/scripts/mapo.py \
    --model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
    --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \
    --dataset_name data-is-better-together/open-image-preferences-v1-binarized \
    --dataset_train_split train \
    --use_peft --lora_r 8 --lora_alpha 8 \
    --beta 0.1 \
    --resolution 1024 \
    --learning_rate 1e-5 \
    --per_device_train_batch_size 4 \
    --max_steps 2000 \
    --output_dir sdxl-mapo
```

# With a YAML config, through the CLI
```bash
trl-diffusion mapo --accelerate_config multi_gpu --config examples/scripts/sdxl_mapo.yaml
```

# A CPU smoke run on the bundled tiny data
```bash
trl-diffusion mapo --config examples/scripts/sd15_dpo_tiny.yaml --beta 0.1 --output_dir tiny-mapo
```
"""

import argparse


def main(script_args, training_args, model_args):
    from trl_diffusion import MaPOTrainer
    from trl_diffusion.scripts.utils import run_training

    return run_training(MaPOTrainer, script_args, training_args, model_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl_diffusion import MaPOConfig
    from trl_diffusion.scripts.utils import make_script_parser

    return make_script_parser(MaPOConfig, "mapo", "Run MaPO training", subparsers, prog)


def cli_main(argv: list[str] | None = None):
    """Parse ``argv`` (the command line when `None`) as the script's command line and run it: trains MaPO.

    Tests and other programs call this rather than copy the ``__main__`` block. Returns the trainer.
    """
    from trl_diffusion.scripts.utils import run_script

    return run_script(make_parser, main, argv)


if __name__ == "__main__":
    cli_main()
