"""Write the bundled tiny video preference dataset: `examples/data/video_pairs_tiny/{train,test}.parquet`.

Each row is a prompt "a <colour> square moving right" and two 9-frame, 32 x 32 mp4 clips (H.264, encoded with PyAV):
one of a square of the prompted colour moving right, one of another colour (in random order), and `label_0` (1.0 when
`video_0` shows the prompted colour, 0.0 otherwise, 0.5 for one deliberate tie, which training drops and counts).
The columns are the Pick-a-Pic-like video schema: `video_0`, `video_1` (mp4 bytes), `label_0`, `caption`.
`datasets.load_dataset("examples/data/video_pairs_tiny")` reads it.

Run `python examples/data/make_video_pairs_tiny.py` to regenerate it (deterministic; needs `av`).
"""

import argparse
import os

import numpy as np
from datasets import Dataset

from trl_diffusion.video import encode_video


COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 210), "yellow": (220, 200, 40)}
FRAMES, SIZE = 9, 32


def clip(rgb: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    """A square of colour ``rgb`` moving right one pixel a frame over a light background, as mp4 bytes."""
    side, top, left = int(rng.integers(10, 16)), int(rng.integers(2, 12)), int(rng.integers(0, 6))
    frames = np.full((FRAMES, SIZE, SIZE, 3), 235, dtype=np.uint8)
    for t in range(FRAMES):
        frames[t, top : top + side, left + t : left + t + side] = rgb
    return encode_video(frames, "mp4")


def make_rows(num_rows: int, rng: np.random.Generator, num_ties: int) -> dict[str, list]:
    names = list(COLOURS)
    rows = {"video_0": [], "video_1": [], "label_0": [], "caption": []}
    for i in range(num_rows):
        prompted, other = rng.choice(len(names), size=2, replace=False)
        matching, distractor = clip(COLOURS[names[prompted]], rng), clip(COLOURS[names[other]], rng)
        matching_first = bool(rng.integers(0, 2))
        rows["video_0"].append(matching if matching_first else distractor)
        rows["video_1"].append(distractor if matching_first else matching)
        rows["label_0"].append(0.5 if i < num_ties else 1.0 if matching_first else 0.0)
        rows["caption"].append(f"a {names[prompted]} square moving right")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__), "video_pairs_tiny"))
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, num_rows, num_ties in (("train", 12, 1), ("test", 4, 0)):
        Dataset.from_dict(make_rows(num_rows, rng, num_ties)).to_parquet(
            os.path.join(args.output_dir, f"{split}.parquet")
        )


if __name__ == "__main__":
    main()
