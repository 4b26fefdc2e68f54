"""Preference pairs kept as image files: a folder of chosen images and one of rejected images, matched by name.

The layout::

    my_pairs/
      chosen/NAME.png        the preferred image of pair NAME (.png, .jpg, .jpeg, .webp or .bmp)
      rejected/NAME.jpg      the other image of pair NAME (any of those extensions, not necessarily the same one)
      captions/NAME.txt      the prompt of pair NAME (UTF-8 text; leading and trailing whitespace is stripped)

or, instead of ``captions/``, one ``metadata.jsonl`` at the top with a line ``{"name": "NAME", "caption": "..."}`` per
pair. `load_pair_folder` reads it into a `datasets.Dataset` in the TRL-style schema (``chosen``, ``rejected``,
``prompt``, plus ``name``), which every trainer takes; the TRL-style scripts take the folder as ``--dataset_name``.

Nothing is dropped silently. A pair with an image on one side only, without a caption, or with an image that cannot be
read (each image's header is checked when the folder is loaded) raises a `ValueError` naming the file, or, with
``skip_invalid_rows``, is left out, logged with its file and counted. Two images of one name in one folder (``a.png``
and ``a.jpg``) are an error. Files that are not images (by extension) are listed in a warning; hidden files are ignored.
"""

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image


if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIDES = ("chosen", "rejected")


@dataclass
class _FolderReport:
    """What `load_pair_folder` left out, by reason (each list holds file paths)."""

    unmatched: list[str] = field(default_factory=list)
    missing_captions: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.unmatched) + len(self.missing_captions) + len(self.unreadable)


def is_pair_folder(path) -> bool:
    """Whether ``path`` is a folder with ``chosen/`` and ``rejected/`` sub-folders."""
    return all(os.path.isdir(os.path.join(str(path), side)) for side in SIDES)


def load_pair_folder(path: str | os.PathLike, skip_invalid_rows: bool = False, check_images: bool = True) -> "Dataset":
    """Read a folder of pairs (see the module docstring) into a TRL-style `datasets.Dataset`.

    Args:
        path: the folder holding ``chosen/``, ``rejected/`` and ``captions/`` (or ``metadata.jsonl``).
        skip_invalid_rows: leave out (and count, and log) the pairs that would otherwise raise.
        check_images: open every image's header now, so that an unreadable one is named before training.

    Returns:
        One row per pair, in name order, with the columns ``name``, ``chosen`` and ``rejected`` (`datasets.Image`
        columns of file paths) and ``prompt``.

    Raises:
        ValueError: a missing sub-folder, a duplicate image name, an unmatched image, a missing caption or an
            unreadable image (naming the file), unless ``skip_invalid_rows`` is set for the last three.
    """
    from datasets import Dataset
    from datasets import Image as ImageFeature

    path = str(path)
    if not is_pair_folder(path):
        raise ValueError(f"{path!r} is not a folder of pairs: it needs the sub-folders {list(SIDES)}.")
    images = {side: _images_by_name(os.path.join(path, side)) for side in SIDES}
    report = _FolderReport()
    names = sorted(images["chosen"].keys() & images["rejected"].keys())
    for side, other in (SIDES, SIDES[::-1]):
        for name in sorted(images[side].keys() - images[other].keys()):
            _invalid(report.unmatched, images[side][name], f"has no {other} image of the same name", skip_invalid_rows)
    captions = _read_captions(path, names)
    rows = {"name": [], "chosen": [], "rejected": [], "prompt": []}
    for name in names:
        if name not in captions:
            where = os.path.join(path, "captions", name + ".txt")
            if os.path.isfile(os.path.join(path, "metadata.jsonl")):
                where = os.path.join(path, "metadata.jsonl")
            _invalid(report.missing_captions, where, f"has no caption of pair {name!r}", skip_invalid_rows)
            continue
        files = [images[side][name] for side in SIDES]
        unreadable = [file for file in files if check_images and not _is_readable(file)]
        if unreadable:
            _invalid(report.unreadable, unreadable[0], "is not a readable image", skip_invalid_rows)
            continue
        for key, value in zip(rows, [name, *files, captions[name]], strict=True):
            rows[key].append(value)
    if report.num_skipped:
        logger.warning(
            "Left out %d pairs of %s: %d with an image on one side only, %d without a caption, %d unreadable.",
            report.num_skipped,
            path,
            len(report.unmatched),
            len(report.missing_captions),
            len(report.unreadable),
        )
    if not rows["name"]:
        raise ValueError(f"The folder {path!r} holds no usable pair (chosen/NAME.png, rejected/NAME.png, caption).")
    dataset = Dataset.from_dict(rows)
    return dataset.cast_column("chosen", ImageFeature()).cast_column("rejected", ImageFeature())


def _images_by_name(folder: str) -> dict[str, str]:
    """Image files of a folder by name (file name without extension); a name given twice is an error."""
    files = sorted(entry for entry in os.listdir(folder) if not entry.startswith("."))
    ignored = [entry for entry in files if not entry.lower().endswith(IMAGE_EXTENSIONS)]
    if ignored:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        logger.warning(
            "Ignoring %d files of %s that are not images (%s): %s", len(ignored), folder, kinds, ignored[:10]
        )
    images = [entry for entry in files if entry.lower().endswith(IMAGE_EXTENSIONS)]
    counts = Counter(os.path.splitext(entry)[0] for entry in images)
    duplicates = [entry for entry in images if counts[os.path.splitext(entry)[0]] > 1]
    if duplicates:
        raise ValueError(f"Several images share a name in {folder}: {duplicates[:10]}. Keep one image per name.")
    return {os.path.splitext(entry)[0]: os.path.join(folder, entry) for entry in images}


def _read_captions(path: str, names: list[str]) -> dict[str, str]:
    """The captions of a folder of pairs, from ``captions/NAME.txt`` or ``metadata.jsonl``, by pair name."""
    folder, metadata = os.path.join(path, "captions"), os.path.join(path, "metadata.jsonl")
    if os.path.isdir(folder) and os.path.isfile(metadata):
        raise ValueError(f"{path!r} has both captions/ and metadata.jsonl: keep one source of captions.")
    if os.path.isfile(metadata):
        return _read_metadata(metadata)
    captions = {}
    for name in names:
        file = os.path.join(folder, name + ".txt")
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                captions[name] = f.read().strip()
    return captions


def _read_metadata(metadata: str) -> dict[str, str]:
    captions = {}
    with open(metadata, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, caption = entry["name"], entry["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f'{metadata}, line {number}: expected {{"name": ..., "caption": ...}}, got {line.strip()!r:.100} '
                    f"({type(error).__name__}: {error})."
                ) from error
            if not isinstance(caption, str):
                raise ValueError(f"{metadata}, line {number}: the caption of {name!r} is not a string: {caption!r}.")
            if name in captions:
                raise ValueError(f"{metadata}, line {number}: a second caption for pair {name!r}.")
            captions[str(name)] = caption
    return captions


def _is_readable(file: str) -> bool:
    try:
        with Image.open(file) as image:
            image.verify()
        return True
    except Exception:
        return False


def _invalid(skipped: list[str], file: str, reason: str, skip: bool) -> None:
    message = f"{file} {reason}."
    if not skip:
        raise ValueError(message + " Fix the folder or pass skip_invalid_rows=True to leave such pairs out.")
    logger.warning("Leaving out a pair: %s", message)
    skipped.append(file)
