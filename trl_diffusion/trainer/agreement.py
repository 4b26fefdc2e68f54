"""Processes stop together: a data error met by one process becomes the same error on every process.

Under DDP, a process whose data loader raises (an unreadable image in its shard) would leave the others blocked in the
next gradient all-reduce: with gloo until the peer's socket closes, with NCCL until the collective timeout (minutes),
unless a launcher such as torchrun notices the dead process and kills the rest. Here every process reports, after
fetching each optimizer step's batches, whether that failed (one all-reduce of one number), and if any did, all of them
raise a `ValueError` that carries every failing process's message, with its row and column.
"""

from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


T = TypeVar("T")


def fetch_in_agreement(accelerator: Accelerator, fetch: Callable[[], T]) -> T:
    """Run ``fetch`` (the data loading of one optimizer step) on every process; raise on all if it failed on any."""
    if accelerator.num_processes == 1:
        return fetch()
    try:
        result, failure = fetch(), None
    except ValueError as error:  # the data path's errors (they name the row and column)
        result, failure = None, error
    failed = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item() == 0:
        return result
    message = None if failure is None else f"process {accelerator.process_index}: {failure}"
    messages = [text for text in gather_object([message]) if text is not None]
    raise ValueError("Data error on " + "; ".join(messages)) from failure
