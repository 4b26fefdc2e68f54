"""Checkpoints that are known to be complete: a manifest written last, and checked before resuming.

A `transformers.Trainer` writes a checkpoint's files one after another into ``checkpoint-N``; a process killed in the
middle leaves a folder that looks like a checkpoint. Here every checkpoint gets a manifest, ``checkpoint_complete.json``
(each file's size), written atomically after all processes have written their files. Resuming accepts only a folder
whose manifest is present and matches, so an interrupted or truncated checkpoint is never taken for a complete one.
"""

import json
import logging
import os
import re

from safetensors import safe_open


logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _files(directory: str) -> dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if relative != COMPLETE_MARKER and not name.endswith(".tmp"):
                sizes[relative] = os.path.getsize(path)
    return sizes


def begin_checkpoint(directory: str) -> None:
    """Before (re)writing a checkpoint folder: drop a manifest left there by an earlier run."""
    marker = os.path.join(directory, COMPLETE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)


def mark_checkpoint_complete(directory: str, global_step: int) -> None:
    """Write the manifest of a fully written checkpoint (atomically: a temporary file renamed into place)."""
    manifest = {"global_step": global_step, "files": _files(directory)}
    temporary = os.path.join(directory, COMPLETE_MARKER + ".tmp")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(directory, COMPLETE_MARKER))


def checkpoint_problem(directory: str) -> str | None:
    """Why ``directory`` is not a complete checkpoint, or ``None`` when it is one."""
    if not os.path.isdir(directory):
        return "it does not exist" if not os.path.exists(directory) else "it is not a folder"
    marker = os.path.join(directory, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return f"it has no {COMPLETE_MARKER}: it was interrupted while being written (or is not a checkpoint)"
    try:
        with open(marker) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {COMPLETE_MARKER} is unreadable ({error})"
    actual = _files(directory)
    for name, size in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != size:
            return f"{name} has {actual[name]} bytes where {size} were written (truncated or overwritten)"
    for name in expected:
        problem = _unreadable(os.path.join(directory, name))
        if problem:
            return f"{name} is corrupt ({problem})"
    return None


def _unreadable(path: str) -> str | None:
    """Cheap content checks: JSON files parse, safetensors headers parse (the tensors themselves are not read)."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                f.keys()
    except Exception as error:  # noqa: BLE001 - any parse failure means a corrupt file
        return f"{type(error).__name__}: {error}"
    return None


def complete_checkpoints(output_dir: str) -> list[str]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, oldest step first (incomplete ones are logged)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match:
            path = os.path.join(output_dir, name)
            problem = checkpoint_problem(path)
            if problem is None:
                found.append((int(match.group(1)), path))
            else:
                logger.warning("Ignoring checkpoint %s: %s.", path, problem)
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``True`` means the last complete one in ``output_dir``; a path must be complete.

    Raises:
        FileNotFoundError: the path does not exist, or ``True`` was given and ``output_dir`` holds no complete
            checkpoint.
        ValueError: the path is not a complete checkpoint (interrupted mid-write, truncated or corrupt).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint-N folder. Train from "
                "the start (no resume_from_checkpoint) or pass the path of a checkpoint."
            )
        return checkpoints[-1]
    path = str(resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    complete = complete_checkpoints(os.path.dirname(os.path.abspath(path)))
    suggestion = f" The last complete checkpoint beside it is {complete[-1]}." if complete else ""
    message = (
        f"Cannot resume from {path}: {problem}.{suggestion} resume_from_checkpoint=True picks the last complete one."
    )
    if not os.path.exists(path):
        raise FileNotFoundError(message)
    raise ValueError(message)
