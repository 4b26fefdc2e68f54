"""Small preference datasets of videos, encoded offline with PyAV's encoders."""

import numpy as np
from datasets import Dataset

from trl_diffusion.video import encode_video


def moving_square(color: tuple[int, int, int], num_frames: int = 9, size: tuple[int, int] = (32, 32), seed: int = 0):
    """``(T, H, W, 3)`` uint8 frames: a coloured square moving one pixel a frame across a noisy grey background."""
    rng = np.random.default_rng(seed)
    height, width = size
    frames = np.clip(128 + rng.integers(-20, 21, (num_frames, height, width, 3)), 0, 255).astype(np.uint8)
    side = min(height, width) // 2
    for t in range(num_frames):
        top, left = (2 + t) % (height - side), (1 + t) % (width - side)
        frames[t, top : top + side, left : left + side] = color
    return frames


def make_video_pairs(
    num_rows: int = 4, num_frames: int = 9, size: tuple[int, int] = (32, 32), container_format: str = "mp4"
) -> Dataset:
    """Pick-a-Pic-style video rows: a red and a blue moving square, the red one preferred, alternating positions."""
    rows = {"video_0": [], "video_1": [], "label_0": [], "caption": []}
    for i in range(num_rows):
        red = encode_video(moving_square((210, 40, 40), num_frames, size, seed=2 * i), container_format)
        blue = encode_video(moving_square((40, 40, 210), num_frames, size, seed=2 * i + 1), container_format)
        red_first = i % 2 == 0
        rows["video_0"].append(red if red_first else blue)
        rows["video_1"].append(blue if red_first else red)
        rows["label_0"].append(1.0 if red_first else 0.0)
        rows["caption"].append(f"a moving square number {i}")
    return Dataset.from_dict(rows)
