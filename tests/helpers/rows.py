"""Small Pick-a-Pic-style preference rows for the tests: solid-colour PNGs, the red one preferred."""

import numpy as np
from datasets import Dataset

from trl_diffusion.data import encode_png


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (20, 16), noise_seed: int | None = None) -> bytes:
    """Encoded PNG of a solid colour (width, height), optionally with seeded noise."""
    array = np.empty((size[1], size[0], 3), dtype=np.uint8)
    array[:] = color
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        array = np.clip(array.astype(int) + rng.integers(-20, 21, array.shape), 0, 255).astype(np.uint8)
    return encode_png(array)


def make_pickapic(num_rows: int = 8, seed: int = 0) -> Dataset:
    """Pick-a-Pic-style rows: a reddish and a bluish image, the red one preferred, alternating positions."""
    rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    for i in range(num_rows):
        red, blue = (
            png_bytes((200, 40, 40), noise_seed=seed + 2 * i),
            png_bytes((40, 40, 200), noise_seed=seed + 2 * i + 1),
        )
        red_first = i % 2 == 0
        rows["jpg_0"].append(red if red_first else blue)
        rows["jpg_1"].append(blue if red_first else red)
        rows["label_0"].append(1.0 if red_first else 0.0)
        rows["caption"].append(f"a square number {i}")
    return Dataset.from_dict(rows)
