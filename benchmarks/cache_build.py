"""Throughput of the encoding-cache build with 1 and 2 processes (each process encodes its shards of the pairs).

    python benchmarks/cache_build.py [--processes 1 2] [--pairs 256] [--resolution 64] [--json cache_build.json]

The tiny SD 1.5 test model encodes a synthetic Pick-a-Pic-shaped set (``--pairs`` pairs over ``--captions``
captions, random ``--resolution`` px images) into a fresh cache, once per process count, each run launched with
``accelerate launch`` on CPU processes (gloo, one torch thread each) as a training job would be. The time is the
build's wall clock on the main process, from a barrier before it to a barrier after it (model loading excluded). The
machine's 1-minute load average is reported with each figure: on a shared machine other jobs take cores too, so the
ratio is only as good as the cores that were free.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def worker(args) -> None:
    """One process of a launched build: encode this process's shards, report the build time (main process)."""
    from accelerate import PartialState
    from datasets import load_from_disk
    from diffusers import DiffusionPipeline

    from trl_diffusion.data import PreferenceDataset
    from trl_diffusion.encodings import CacheOptions, Encoders, ProcessGroup, encode_dataset
    from trl_diffusion.models import FamilyOptions, get_family

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    family = get_family(DiffusionPipeline.from_pretrained(args.model), FamilyOptions(resolution=args.resolution))
    encoders = Encoders(
        lambda pixels: family.encode_images(pixels).float(),
        family.encode_prompt,
        family.frozen_modules(),
        family.encoding_key(),
    )
    dataset = PreferenceDataset(load_from_disk(args.data), resolution=args.resolution)
    processes = ProcessGroup(state.process_index, state.num_processes, state.wait_for_everyone)
    options = CacheOptions(args.cache, batch_size=args.batch_size)
    processes.barrier()
    start = time.perf_counter()
    encoded = encode_dataset(dataset, encoders, options, processes)
    processes.barrier()
    seconds = time.perf_counter() - start
    if state.is_main_process:
        print("RESULT " + json.dumps({"processes": state.num_processes, "seconds": seconds, "pairs": len(encoded)}))


def synthetic_pairs(num_pairs: int, num_captions: int, resolution: int):
    from datasets import Dataset

    from trl_diffusion.data import encode_png

    generator = torch.Generator().manual_seed(0)
    rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    for i in range(num_pairs):
        for column in ("jpg_0", "jpg_1"):
            pixels = torch.randint(0, 256, (resolution, resolution, 3), generator=generator, dtype=torch.uint8)
            rows[column].append(encode_png(pixels.numpy()))
        rows["label_0"].append(float(i % 2))
        rows["caption"].append(f"a photo of subject {i % num_captions}")
    return Dataset.from_dict(rows)


def launch(num_processes: int, args, data: str, model: str, cache: str) -> dict:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    launcher += ["--multi_gpu"] if num_processes > 1 else []  # on a machine without GPUs: CPU processes, gloo
    launcher += ["--mixed_precision", "no", os.path.abspath(__file__), "--worker", "--data", data, "--model", model]
    launcher += ["--cache", cache, "--resolution", str(args.resolution), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    load_before = os.getloadavg()[0]
    output = subprocess.run(launcher, env=env, capture_output=True, text=True, check=False)
    if output.returncode:
        raise RuntimeError(f"{' '.join(launcher)} failed:\n{output.stdout[-3000:]}{output.stderr[-3000:]}")
    line = next(line for line in output.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result.update(pairs_per_s=result["pairs"] / result["seconds"], load_before=load_before)
    result["load_after"] = os.getloadavg()[0]
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    from trl_diffusion.testing.tiny_models import build_tiny_stable_diffusion

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        data = os.path.join(workdir, "data")
        synthetic_pairs(args.pairs, args.captions, args.resolution).save_to_disk(data)
        model = build_tiny_stable_diffusion(os.path.join(workdir, "model"))
        for count in args.processes:
            results.append(launch(count, args, data, model, os.path.join(workdir, f"cache-{count}")))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]["pairs_per_s"]
    for result in results:
        result["speedup"] = result["pairs_per_s"] / base
        print(
            f"{result['processes']} process(es): {result['pairs']} pairs in {result['seconds']:.1f} s, "
            f"{result['pairs_per_s']:.1f} pairs/s, x{result['speedup']:.2f}; load average "
            f"{result['load_before']:.2f} before, {result['load_after']:.2f} after ({os.cpu_count()} cores)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
