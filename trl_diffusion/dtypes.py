"""Dtype names, as configs and cache columns spell them, and the compute dtype of a mixed-precision run."""

from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from transformers import TrainingArguments


# The floating-point dtypes the library reads by name (configs, command-line flags, encoding-cache columns)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_dtype(args: "TrainingArguments") -> torch.dtype:
    """The dtype a run computes in: ``bfloat16`` with ``bf16``, ``float16`` with ``fp16``, else ``float32``.

    The frozen networks (VAE, text encoders, a full fine-tune's reference) and a LoRA run's frozen base weights are
    stored in it; trainable weights stay in float32.

    Args:
        args: the training arguments (their ``bf16`` and ``fp16`` flags).

    Returns:
        The compute dtype.
    """
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
