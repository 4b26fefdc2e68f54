"""A 2-process training run with one fault, for tests/test_distributed_faults.py (run under `accelerate launch`).

    accelerate launch --multi_gpu --use_cpu true --num_processes 2 tests/helpers/faulty_run.py \
        MODEL DATASET_DIR OUTPUT_DIR [--precompute-encodings] [--nan-on-rank R --nan-at-step S]

The dataset may hold an unreadable image; ``--nan-on-rank`` poisons one policy error on that process only. Each
process prints ``RANK r FAILED at <unix time>: <error>`` before it exits with the error, so the test sees who stopped and why.
"""

import argparse
import os
import sys
import time
import traceback

import torch
from faults import inject_nan_error
from resumable import build_trainer


def main():
    parser = argparse.ArgumentParser()
    for name in ("model", "dataset_dir", "output_dir"):
        parser.add_argument(name)
    parser.add_argument("--precompute-encodings", action="store_true")
    parser.add_argument("--nan-on-rank", type=int, default=None)
    parser.add_argument("--nan-at-step", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    try:
        trainer = build_trainer(
            "dpo", args.model, args.dataset_dir, args.output_dir, per_device_train_batch_size=1, max_steps=4,
            save_strategy="no", precompute_encodings=args.precompute_encodings, use_cpu=True,
        )  # fmt: skip
        if args.nan_on_rank == rank:
            inject_nan_error(trainer, steps={args.nan_at_step}, call=1)
        trainer.train()
    except Exception as error:
        print(f"RANK {rank} FAILED at {time.time():.3f}: {type(error).__name__}: {error}", flush=True)
        traceback.print_exc()
        sys.exit(1)
    print(f"RANK {rank} DONE", flush=True)


if __name__ == "__main__":
    main()
