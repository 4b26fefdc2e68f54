"""Encoding-cache sizes on a Pick-a-Pic-shaped set, with and without one embedding per distinct caption.

    python benchmarks/cache_size.py [--pairs 1000000] [--captions 60000] [--json cache_size.json]

Two parts:

- Computed, at real size: the bytes of the cache's tensors for SD 1.5, SDXL and Flux.1 from their real shapes
  (latents ``(2, C, R/8, R/8)`` in float32, as the trainer stores them; prompt embeddings in bf16, the compute dtype
  of a bf16 run: SD 1.5 CLIP ``77 x 768``; SDXL both CLIPs ``77 x 2048`` and the pooled ``1280``; Flux T5
  ``512 x 4096`` and the pooled CLIP ``768``), for ``--pairs`` pairs over ``--captions`` distinct captions (Pick-a-Pic
  v2: about 1M pairs, about 17 per caption).
- Measured, at tiny size: a real cache build of the tiny SD 1.5, SDXL and Flux test models on a synthetic set shaped
  the same way (``--tiny-pairs`` pairs over ``--tiny-captions`` captions), sizes read from disk, next to the estimate
  the builder logs before building.
"""

import argparse
import json
import os
import tempfile

import torch
from diffusers import DiffusionPipeline

from trl_diffusion.data import PreferenceDataset, encode_png
from trl_diffusion.encodings import (
    CacheOptions,
    CacheSize,
    Encoders,
    EncodingCacheBuilder,
    encode_dataset,
    format_bytes,
)
from trl_diffusion.models import FamilyOptions, get_family
from trl_diffusion.testing.tiny_models import build_tiny_flux, build_tiny_sdxl, build_tiny_stable_diffusion


# name: (latent channels, resolution, {embedding: number of values per prompt})
REAL_SHAPES = {
    "SD 1.5 (512 px)": (4, 512, {"encoder_hidden_states": 77 * 768}),
    "SDXL (1024 px)": (4, 1024, {"encoder_hidden_states": 77 * 2048, "text_embeds": 1280}),
    "Flux.1 (1024 px)": (16, 1024, {"encoder_hidden_states": 512 * 4096, "pooled_projections": 768}),
}
TINY_BUILDERS = {"SD 1.5": build_tiny_stable_diffusion, "SDXL": build_tiny_sdxl, "Flux.1": build_tiny_flux}


def computed_sizes(num_pairs: int, num_captions: int) -> list[dict]:
    rows = []
    for name, (channels, resolution, embeddings) in REAL_SHAPES.items():
        pair_bytes = 2 * channels * (resolution // 8) ** 2 * 4  # chosen and rejected latents, float32
        prompt_bytes = sum(embeddings.values()) * 2  # bf16
        dedup = CacheSize.estimate(num_pairs, num_captions, pair_bytes, prompt_bytes)
        per_pair = CacheSize.estimate(num_pairs, num_pairs, pair_bytes, prompt_bytes)
        rows.append({"model": name, "pairs": num_pairs, "captions": num_captions, **_row(dedup, per_pair)})
    return rows


def _row(dedup: CacheSize, per_pair: CacheSize) -> dict:
    return {
        "latents_bytes": dedup.latents,
        "embeddings_bytes_dedup": dedup.embeddings,
        "embeddings_bytes_per_pair": per_pair.embeddings,
        "total_bytes_dedup": dedup.total,
        "total_bytes_per_pair": per_pair.total,
    }


def synthetic_pairs(num_pairs: int, num_captions: int):
    """Pick-a-Pic-shaped rows: pair ``i`` has caption ``i % num_captions``."""
    from datasets import Dataset

    rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    generator = torch.Generator().manual_seed(0)
    for i in range(num_pairs):
        for column in ("jpg_0", "jpg_1"):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
            rows[column].append(encode_png(pixels))
        rows["label_0"].append(float(i % 2))
        rows["caption"].append(f"a photo of subject {i % num_captions}")
    return Dataset.from_dict(rows)


def measured_sizes(num_pairs: int, num_captions: int, workdir: str) -> list[dict]:
    dataset = PreferenceDataset(synthetic_pairs(num_pairs, num_captions), resolution=16)
    rows = []
    for name, build in TINY_BUILDERS.items():
        family = get_family(DiffusionPipeline.from_pretrained(build(os.path.join(workdir, name))), FamilyOptions(16))
        encoders = Encoders(
            lambda pixels, family=family: family.encode_images(pixels).float(),
            family.encode_prompt,
            family.frozen_modules(),
            family.encoding_key(),
        )
        sizes = {}
        for deduplicate in (True, False):
            options = CacheOptions(os.path.join(workdir, f"{name}-{deduplicate}"), deduplicate_prompts=deduplicate)
            builder = EncodingCacheBuilder(dataset, encoders, options)
            estimate = builder.estimate()
            encode_dataset(dataset, encoders, options)
            sizes[deduplicate] = (estimate, builder.size())
        (estimate, dedup), (_, per_pair) = sizes[True], sizes[False]
        rows.append(
            {
                "model": f"tiny {name} (16 px)",
                "pairs": num_pairs,
                "captions": num_captions,
                "estimated_total_bytes_dedup": estimate.total,
                **_row(dedup, per_pair),
            }
        )
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| model | pairs | captions | latents | embeddings, one per caption | embeddings, one per pair | total |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        total = f"{format_bytes(row['total_bytes_dedup'])} (per pair: {format_bytes(row['total_bytes_per_pair'])})"
        print(
            f"| {row['model']} | {row['pairs']:,} | {row['captions']:,} | {format_bytes(row['latents_bytes'])} "
            f"| {format_bytes(row['embeddings_bytes_dedup'])} | {format_bytes(row['embeddings_bytes_per_pair'])} "
            f"| {total} |"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--captions", type=int, default=60_000)
    parser.add_argument("--tiny-pairs", type=int, default=170)
    parser.add_argument("--tiny-captions", type=int, default=10)
    parser.add_argument("--json", default=None, help="Write the figures to this JSON file.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {"computed": computed_sizes(args.pairs, args.captions)}
    with tempfile.TemporaryDirectory() as workdir:
        results["measured"] = measured_sizes(args.tiny_pairs, args.tiny_captions, workdir)
    print_table("Computed from the real shapes (tensor bytes)", results["computed"])
    print_table("Measured on disk: a real build of the tiny test models", results["measured"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
