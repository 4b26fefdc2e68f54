"""Folders of preference pairs on disk (chosen/, rejected/, captions/), for the folder-input tests."""

import json
import os

from helpers.rows import png_bytes


RED, BLUE = (200, 40, 40), (40, 40, 200)


def write_pair_folder(root, names: list[str], captions: str = "files") -> str:
    """Write the pairs ``names`` under ``root``; return ``root``.

    Each pair NAME gets ``chosen/NAME.png`` (red), ``rejected/NAME.png`` (blue) and its caption ``"a pair NAME"``,
    in ``captions/NAME.txt`` (``captions="files"``) or in ``metadata.jsonl`` (``captions="jsonl"``).
    """
    root = str(root)
    for side in ("chosen", "rejected"):
        os.makedirs(os.path.join(root, side), exist_ok=True)
    for i, name in enumerate(names):
        for side, color in (("chosen", RED), ("rejected", BLUE)):
            with open(os.path.join(root, side, f"{name}.png"), "wb") as f:
                f.write(png_bytes(color, noise_seed=i))
    if captions == "files":
        os.makedirs(os.path.join(root, "captions"), exist_ok=True)
        for name in names:
            with open(os.path.join(root, "captions", f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write(f"a pair {name}\n")
    else:
        with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for name in names:
                f.write(json.dumps({"name": name, "caption": f"a pair {name}"}) + "\n")
    return root
