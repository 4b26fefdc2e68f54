"""The encoding cache: VAE latents and prompt embeddings computed once, in shards written by every process, then reused.

The VAE and the text encoders are frozen, so their outputs for a given image and prompt never change. With
``precompute_encodings`` the trainer encodes every pair once, before training, and each training step reads latents and
prompt embeddings instead of decoding images and running the encoders. This module holds the cache's mechanics only,
with explicit inputs ([`Encoders`][]: the encode functions, the frozen modules and what identifies them;
[`CacheOptions`][]: the cache directory and batch sizes; [`ProcessGroup`][]: which process this is). What to encode,
the empty-prompt embedding and the reference pass are the trainer's business
(`trl_diffusion/trainer/encoding_cache.py`).

The rule for what can be cached: a pair's encodings must be a function of the pair alone (fixed crops; with
``random_flip`` both flips are cached). The trainer's config decides it (``DiffusionPreferenceConfig.encodings_cached``);
[`encode_dataset`][] refuses a dataset whose crops change every epoch.

Layout. A cache is a folder ``trl-diffusion-encodings-<fingerprint>`` with two parts:

- ``pairs``: one row per readable pair: ``latents`` ``(k, C, h, w)`` (chosen, then rejected; ``k = 1`` for unpaired
  rows), ``latents_flipped`` with ``random_flip``, ``prompt_index`` and the pair's plain fields (``prompt``,
  ``row_index``, ``original_sizes``, ``crop_top_lefts``, ``confidence``/``desirable``);
- ``prompts``: one row per distinct prompt, ``prompt_embeds.<key>`` for every key of the family's ``encode_prompt``.
  A caption shared by many pairs (Pick-a-Pic has about 17 pairs per caption) is encoded and stored once.

Each part is a sequence of shards of whole encoding batches (so a shard's content does not depend on how many
processes built it). Process ``i`` of ``N`` encodes shards ``i, i + N, i + 2N...``; each shard is an Arrow file
renamed into place when complete, then a ``.done`` marker (its row count, size and the process that built it). A
shard without its marker is never read: an interrupted build resumes from the marked shards and redoes the rest.
When every shard is marked, the main process writes ``manifest.json``, and every process memory-maps the shards.
The reference errors of ``precompute_ref_errors`` are a third table built the same way
(``trl-diffusion-reference-errors-<fingerprint>``), one row per pair.

Fingerprint: the source dataset's own `datasets` fingerprint and the selected pairs (ties and invalid rows dropped,
chosen/rejected order), the image, caption and confidence columns, the crop/flip settings, the encoders' identity
(family, pipeline class, model path and Hub revision, and every family option that can change encodings, see
`FamilyOptions.encoding_key`), a digest of the frozen encoders' weights and their dtypes, and the layout (batch size,
deduplication).

Location: ``encodings_cache_dir`` if set; else beside the source dataset's own cache files (a dataset from
``load_dataset``); else, for an in-memory dataset, ``<HF_DATASETS_CACHE>/trl_diffusion_encodings``. Every process must
see the same folder (one machine, or a shared filesystem).

Storage: each tensor is flattened into a list column named ``name|dtype|shape``, in the dtype the encoder produced
(bfloat16 is stored bit-exactly as int16).
"""

import glob
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset, are_progress_bars_disabled, concatenate_datasets
from datasets.arrow_writer import ArrowWriter
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .data import PreferenceDataset
from .dtypes import DTYPES


logger = logging.getLogger(__name__)

# Bump when the stored layout or the encoding procedure changes: old caches are then ignored, never misread.
CACHE_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
_STORED_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
# Shards hold whole encoding batches: about 1/64 of a small set, at most about 4096 items of a large one
_SHARDS_TARGET, _MAX_SHARD_ITEMS = 64, 4096


# ----- explicit inputs -----


def _no_barrier() -> None:
    """The barrier of a single process: nothing to wait for."""


@dataclass(frozen=True)
class ProcessGroup:
    """The processes that build a cache together.

    Attributes:
        index: this process's rank.
        count: the number of processes.
        barrier: waits until every process has reached it (``accelerator.wait_for_everyone``).
    """

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = _no_barrier

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def owns(self, shard: int) -> bool:
        """Whether this process builds ``shard`` (shards are dealt out round-robin)."""
        return shard % self.count == self.index


@dataclass(frozen=True)
class Encoders:
    """What computes a cache's content.

    Attributes:
        encode_images: pixels ``(N, 3, H, W)`` (or videos ``(N, 3, F, H, W)``) in ``[-1, 1]`` on ``device`` to latents.
        encode_prompt: prompts to a dict of embeddings, one row per prompt.
        frozen_modules: the networks behind them (their weights are digested into the fingerprint).
        identity: what else identifies them: family, pipeline class, model path, revision, family options.
        device: where pixels are sent.
    """

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    encode_prompt: Callable[[list[str]], dict[str, torch.Tensor]]
    frozen_modules: dict[str, torch.nn.Module]
    identity: dict[str, Any] = field(default_factory=dict)
    device: torch.device | str = "cpu"


@dataclass(frozen=True)
class CacheOptions:
    """How a cache is built.

    Attributes:
        cache_dir: the folder that holds the cache folders.
        batch_size: pairs (and prompts) encoded at once; shards hold whole batches.
        num_workers: data-loader workers that decode images.
        deduplicate_prompts: store one embedding per distinct prompt (``False``: one per pair, the old layout).
    """

    cache_dir: str
    batch_size: int = 8
    num_workers: int = 0
    deduplicate_prompts: bool = True


# ----- fingerprint -----


def model_revision(pipeline) -> str | None:
    """The Hub commit a pipeline was loaded from, read from the ``snapshots/<commit>`` folder of its components."""
    paths = [getattr(pipeline, "name_or_path", None)]
    for component in pipeline.components.values():
        config = getattr(component, "config", None)
        paths.append(getattr(config, "_name_or_path", None) if config is not None else None)
        paths.append(getattr(component, "name_or_path", None))
    for path in paths:
        match = re.search(r"snapshots[/\\]([0-9a-f]{40})", str(path or ""))
        if match:
            return match.group(1)
    return None


@torch.no_grad()
def weights_digest(
    modules: dict[str, torch.nn.Module], samples_per_tensor: int = 64, skip: tuple[str, ...] = ()
) -> str:
    """A cheap content digest of networks: every tensor's name, shape and dtype, and a strided sample of its values.

    Two different checkpoints of one architecture differ in practically every sampled value, so this tells them
    apart without hashing gigabytes; it copies one small tensor per module to the host. FSDP2-sharded tensors are
    gathered first, so every process must call it (in the same order).
    """
    hasher = hashlib.sha256()
    for module_name in sorted(modules):
        samples = []
        for name, tensor in modules[module_name].state_dict().items():
            if any(part in name for part in skip):
                continue
            hasher.update(f"{module_name}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.numel() and (tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8)):
                if isinstance(tensor, DTensor):  # sharded by FSDP2: gathered (collectively), so any process count
                    tensor = tensor.full_tensor()  # gives the digest of one process
                flat = tensor.detach().reshape(-1)
                samples.append(flat[:: max(1, flat.numel() // samples_per_tensor)][:samples_per_tensor].float())
        if samples:
            hasher.update(torch.cat(samples).cpu().numpy().tobytes())
    return hasher.hexdigest()


def digest(parts: dict[str, Any]) -> str:
    """A 32-hex-digit fingerprint of JSON-able ``parts`` (keys sorted; other values by their ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def encodings_fingerprint(
    dataset: PreferenceDataset, encoders: Encoders, options: CacheOptions, flips: tuple[bool, ...]
) -> str:
    """The fingerprint that names a dataset's encoding cache (see the module docstring for what it covers).

    Raises:
        ValueError: the dataset is not a `datasets.Dataset` (it has no fingerprint of its own).
    """
    source_fingerprint = getattr(dataset.dataset, "_fingerprint", None)
    if source_fingerprint is None:
        raise ValueError(
            "The encoding cache needs a `datasets.Dataset` (it is named by the dataset's fingerprint); "
            "pass one or set precompute_encodings=False."
        )
    frozen = encoders.frozen_modules
    return digest(
        {
            "format": CACHE_FORMAT_VERSION,
            "dataset": source_fingerprint,
            "kind": type(dataset).__name__,
            "pairs": hashlib.sha256(json.dumps(dataset.rows).encode()).hexdigest(),
            "columns": [list(dataset.image_columns), dataset.caption_column, dataset.confidence_column],
            "transform": dataset.transform_options(),
            "flips": list(flips),
            "encoders": encoders.identity,
            "weights": weights_digest(frozen),
            "dtypes": {name: str(next(module.parameters()).dtype) for name, module in frozen.items()},
            "layout": {"batch_size": options.batch_size, "deduplicate_prompts": options.deduplicate_prompts},
        }
    )


def default_cache_dir(dataset: PreferenceDataset) -> str:
    """Beside the source dataset's cache files, or under the `datasets` cache for an in-memory dataset."""
    cache_files = getattr(dataset.dataset, "cache_files", None)
    if cache_files:
        return os.path.dirname(os.path.abspath(cache_files[0]["filename"]))
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "trl_diffusion_encodings")


# ----- storage -----


def store_tensor(output: dict[str, Any], name: str, tensor: torch.Tensor) -> None:
    """Add a batch of tensors ``(N, ...)`` to a batch of columns as one column ``name|dtype|shape`` (the shape of one
    row) of ``(N, numel)`` host arrays, bit-exact: bfloat16 as its int16 bits, other dtypes as float32."""
    tensor = tensor.detach()
    if tensor.dtype not in _STORED_DTYPES:
        tensor = tensor.float()
    column = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{'x'.join(map(str, tensor.shape[1:]))}"
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    output[column] = tensor.reshape(tensor.shape[0], -1).cpu().numpy()


def _parse_column(column: str) -> tuple[str, torch.dtype, tuple[int, ...]] | None:
    parts = column.split("|")
    if len(parts) != 3:
        return None
    name, dtype, shape = parts
    return name, DTYPES[dtype], tuple(int(size) for size in shape.split("x")) if shape else ()


def _from_column(values: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(values, copy=True))
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.reshape(-1, *shape)


def _read_tensors(table, columns: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The tensor columns of an Arrow table, by name."""
    tensors = {}
    for column, (name, dtype, shape) in columns.items():
        values = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        tensors[name] = _from_column(values, dtype, shape)
    return tensors


def _tensor_columns(dataset: Dataset) -> dict[str, tuple]:
    return {column: parsed for column in dataset.column_names if (parsed := _parse_column(column)) is not None}


# ----- sharded tables -----


@dataclass(frozen=True)
class ShardLayout:
    """How ``num_items`` items are cut into encoding batches and shards (independent of the number of processes).

    Attributes:
        num_items: items of the table (pairs or prompts).
        batch_size: items encoded at once.
        batches_per_shard: whole batches per shard.
    """

    num_items: int
    batch_size: int
    batches_per_shard: int

    @classmethod
    def for_items(cls, num_items: int, batch_size: int) -> "ShardLayout":
        """About ``_SHARDS_TARGET`` shards of a small table; shards of at most about ``_MAX_SHARD_ITEMS`` items."""
        num_batches = math.ceil(num_items / batch_size)
        per_shard = min(max(1, num_batches // _SHARDS_TARGET), max(1, _MAX_SHARD_ITEMS // batch_size))
        return cls(num_items, batch_size, per_shard)

    @property
    def shard_size(self) -> int:
        return self.batch_size * self.batches_per_shard

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.shard_size)

    def shard_items(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items))

    def shard_batches(self, shard: int) -> list[range]:
        items = self.shard_items(shard)
        return [
            range(start, min(start + self.batch_size, items.stop))
            for start in range(items.start, items.stop, self.batch_size)
        ]


def _write_json_atomically(path: str, content: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(content, f)
    os.replace(temporary, path)


class ShardedTable:
    """One part of a cache (pairs, prompts, reference errors): shards written by every process, read as one table.

    Args:
        folder: the cache folder.
        part: the part's name (file prefix).
        layout: how its items are cut into batches and shards.
    """

    def __init__(self, folder: str, part: str, layout: ShardLayout):
        self.folder, self.part, self.layout = folder, part, layout

    def shard_path(self, shard: int) -> str:
        items = self.layout.shard_items(shard)
        return os.path.join(self.folder, f"{self.part}-{items.start:09d}-{items.stop:09d}.arrow")

    def marker(self, shard: int) -> dict | None:
        """The completion record of a shard, or ``None`` while it is missing or partial."""
        path = self.shard_path(shard) + ".done"
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def pending(self) -> list[int]:
        """The shards without a completion marker."""
        return [shard for shard in range(self.layout.num_shards) if self.marker(shard) is None]

    def write(
        self,
        encode: Callable[[list[range]], Iterator[dict[str, Any]]],
        processes: ProcessGroup,
        lockstep: bool = False,
        desc: str = "",
    ) -> int:
        """Encode this process's pending shards, each written atomically then marked; return the items encoded.

        ``encode(batches)`` yields one batch of columns per batch of items, in order (any number of rows: unreadable
        pairs are left out). With ``lockstep`` (a reference sharded by ZeRO-3 or FSDP, whose forward is collective)
        every process makes as many calls as the busiest one: the extra calls repeat the first batch, and their
        output is discarded.
        """
        processes.barrier()  # what earlier writers left is visible to every process
        pending = self.pending()
        processes.barrier()  # every process saw the same pending shards before anyone writes
        mine = [shard for shard in pending if processes.owns(shard)]
        batches = [batch for shard in mine for batch in self.layout.shard_batches(shard)]
        extra = 0
        if lockstep:
            counts = [
                sum(len(self.layout.shard_batches(shard)) for shard in pending if shard % processes.count == rank)
                for rank in range(processes.count)
            ]
            extra = max(counts) - len(batches)
        outputs = encode(batches + [self.layout.shard_batches(0)[0]] * extra)
        # Shown on the main process only, and silenced with the `datasets` bars (`datasets.disable_progress_bars()`)
        quiet = not processes.is_main or not batches or are_progress_bars_disabled()
        progress = tqdm(total=len(batches) + extra, desc=desc, disable=quiet)
        encoded = sum(self._write_shard(shard, outputs, processes.index, progress) for shard in mine)
        for _ in range(extra):
            next(outputs)
            progress.update()
        progress.close()
        return encoded

    def _write_shard(self, shard: int, outputs: Iterator[dict], process_index: int, progress) -> int:
        path = self.shard_path(shard)
        for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # what an interrupted build of this shard left
            os.remove(stale)
        temporary = f"{path}.tmp-{process_index}-{os.getpid()}"
        writer, rows = None, 0
        for _ in self.layout.shard_batches(shard):
            columns = next(outputs)
            progress.update()
            count = len(next(iter(columns.values()))) if columns else 0
            if count:
                writer = writer or ArrowWriter(path=temporary, writer_batch_size=self.layout.batch_size)
                writer.write_batch(columns)
                rows += count
        if writer is not None:
            writer.finalize()
            os.replace(temporary, path)
        items = self.layout.shard_items(shard)
        record = {"rows": rows, "items": len(items), "bytes": os.path.getsize(path) if rows else 0}
        _write_json_atomically(path + ".done", {**record, "process": process_index})
        return len(items)

    def records(self) -> list[dict]:
        """Every shard's completion record, in order.

        Raises:
            RuntimeError: a shard is missing (a process failed, or the processes do not share the cache folder).
        """
        pending = self.pending()
        if pending:
            raise RuntimeError(
                f"{len(pending)} shard(s) of {self.folder} ({self.part}) are missing, first {self.shard_path(pending[0])}: "
                "a process failed, or the processes do not share encodings_cache_dir (it must be one folder that "
                "every process sees)."
            )
        return [self.marker(shard) for shard in range(self.layout.num_shards)]

    def load(self) -> Dataset:
        """The complete table, memory-mapped from its shards."""
        files = [self.shard_path(s) for s, record in enumerate(self.records()) if record["rows"]]
        if not files:
            raise ValueError(f"The cache {self.folder} ({self.part}) holds no rows: no pair had readable images.")
        shards = [Dataset.from_file(path) for path in files]
        return shards[0] if len(shards) == 1 else concatenate_datasets(shards)

    def items_by_process(self) -> dict[int, int]:
        """Items each process encoded (from the shard markers)."""
        counts: dict[int, int] = {}
        for record in self.records():
            counts[record["process"]] = counts.get(record["process"], 0) + record["items"]
        return counts

    def size(self) -> int:
        """Bytes on disk."""
        return sum(record["bytes"] for record in self.records())


def _write_manifest(folder: str, content: dict) -> None:
    _write_json_atomically(os.path.join(folder, MANIFEST_NAME), {"format": CACHE_FORMAT_VERSION, **content})


def _write_parts(parts: dict, processes: ProcessGroup, lockstep: bool = False, desc: str = "") -> dict[str, int]:
    """Write this process's missing shards of every part (``parts``: name to ``(ShardedTable, encode)``); return the
    items it encoded, by part."""
    encoded = {}
    for part, (table, encode) in parts.items():
        os.makedirs(table.folder, exist_ok=True)
        encoded[part] = table.write(encode, processes, lockstep=lockstep, desc=f"{desc} ({part})")
        logger.info("Process %d encoded %d %s of %s.", processes.index, encoded[part], part, table.folder)
    return encoded


def _write_manifest(folder: str, parts: dict) -> None:
    """Mark a cache complete: the manifest lists every part's shard records (raising if a shard is missing)."""
    content = {"format": CACHE_FORMAT_VERSION, "parts": {part: table.records() for part, (table, _) in parts.items()}}
    _write_json_atomically(os.path.join(folder, MANIFEST_NAME), content)


def _build_once(folder: str, parts: dict, processes: ProcessGroup, lockstep: bool = False, desc: str = "") -> None:
    """Every process writes its missing shards; then the main process writes the manifest."""
    if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        return
    _write_parts(parts, processes, lockstep, desc)
    processes.barrier()
    if processes.is_main:
        _write_manifest(folder, parts)
    processes.barrier()


# ----- sizes -----


def _stored_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype if dtype in _STORED_DTYPES else torch.float32).element_size()


def format_bytes(size: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CacheSize:
    """Bytes of an encoding cache, by part.

    Attributes:
        latents: the pairs' latents (the ``pairs`` part).
        embeddings: the prompt embeddings (the ``prompts`` part).
    """

    latents: int
    embeddings: int

    @property
    def total(self) -> int:
        return self.latents + self.embeddings

    @classmethod
    def estimate(cls, num_pairs: int, num_prompts: int, pair_bytes: int, prompt_bytes: int) -> "CacheSize":
        """The tensor bytes of ``num_pairs`` pairs of ``pair_bytes`` latents and ``num_prompts`` embeddings."""
        return cls(latents=num_pairs * pair_bytes, embeddings=num_prompts * prompt_bytes)

    def describe(self) -> str:
        return f"latents {format_bytes(self.latents)}, prompt embeddings {format_bytes(self.embeddings)}"


# ----- the encoded dataset -----


class EncodedPreferenceDataset(torch.utils.data.Dataset):
    """The pairs of a [`PreferenceDataset`][], read from an encoding cache: examples for the collator.

    Each example holds ``latents`` ``(k, C, h, w)`` (and ``latents_flipped``), ``prompt_embeds`` (its prompt's
    ``encode_prompt`` output, per key, read through the pair's ``prompt_index``), ``ref_errors`` ``(k,)`` where
    reference errors were precomputed, and the usual ``prompt``, ``row_index``, ``original_sizes``,
    ``crop_top_lefts`` and ``confidence``/``desirable``.

    Attributes:
        encodings: the ``pairs`` table, one row per readable pair.
        prompt_embeddings: the ``prompts`` table, one row per distinct prompt.
        reference_errors: the reference errors table (one row per pair), or ``None``.
        source: the [`PreferenceDataset`][] it was computed from.
        fingerprint: the cache's fingerprint.
        folder: the cache's folder.
        num_skipped: pairs left out because an image was unreadable (``skip_invalid_rows``).
    """

    def __init__(
        self,
        encodings: Dataset,
        prompt_embeddings: Dataset,
        source: PreferenceDataset,
        fingerprint: str,
        folder: str,
        reference_errors: Dataset | None = None,
    ):
        self.encodings, self.prompt_embeddings, self.reference_errors = encodings, prompt_embeddings, reference_errors
        self.source, self.fingerprint, self.folder = source, fingerprint, folder
        self.num_skipped = len(source) - len(encodings)
        self.stats = source.stats
        self._pairs = encodings.with_format("arrow")
        self._prompts = prompt_embeddings.with_format("arrow")
        self._errors = reference_errors.with_format("arrow") if reference_errors is not None else None
        self._columns = {
            "pairs": _tensor_columns(encodings),
            "prompts": _tensor_columns(prompt_embeddings),
            "errors": _tensor_columns(reference_errors) if reference_errors is not None else {},
        }

    def __len__(self) -> int:
        return len(self.encodings)

    @property
    def dataset(self):
        """The source `datasets.Dataset` (as `PreferenceDataset.dataset`), e.g. for the model card's dataset name."""
        return self.source.dataset

    @property
    def has_ref_errors(self) -> bool:
        return self.reference_errors is not None

    def with_reference_errors(self, reference_errors: Dataset) -> "EncodedPreferenceDataset":
        """The same pairs with a reference errors table (one row per pair, column ``ref_errors``)."""
        if len(reference_errors) != len(self):
            raise ValueError(f"{len(reference_errors)} reference errors for {len(self)} pairs.")
        return EncodedPreferenceDataset(
            self.encodings, self.prompt_embeddings, self.source, self.fingerprint, self.folder, reference_errors
        )

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Read a batch of rows at once (the `DataLoader` calls this with a batch's indices)."""
        indices = list(indices)
        table = self._pairs[indices]
        tensors = _read_tensors(table, self._columns["pairs"])
        prompt_rows = table.column("prompt_index").to_pylist()
        embeddings = _read_tensors(self._prompts[prompt_rows], self._columns["prompts"])
        if self._errors is not None:
            tensors.update(_read_tensors(self._errors[indices], self._columns["errors"]))
        plain = {
            column: table.column(column).to_pylist()
            for column in ("prompt", "row_index", "original_sizes", "crop_top_lefts", "confidence", "desirable")
            if column in table.column_names
        }
        examples = []
        for i in range(len(indices)):
            example = {
                "latents": tensors["latents"][i],
                "prompt_embeds": {name.removeprefix("prompt_embeds."): value[i] for name, value in embeddings.items()},
                **{column: values[i] for column, values in plain.items()},
            }
            for name in ("latents_flipped", "ref_errors"):
                if name in tensors:
                    example[name] = tensors[name][i]
            examples.append(example)
        return examples


# ----- building the cache -----


class _PixelPairs(torch.utils.data.Dataset):
    """Decode and transform pairs for the encoder, in data-loader workers: one or both flips of each pair."""

    def __init__(self, dataset: PreferenceDataset, flips: tuple[bool, ...]):
        self.dataset = dataset
        self.flips = flips

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        loaded = self.dataset.load_pair(index)
        if loaded is None:
            return {"pair_index": index, "pixels": None}
        record, images = loaded
        pixels = []
        for flip in self.flips:
            tensors, original_sizes, crop_top_lefts = self.dataset.transform_pair(images, flip=flip)
            pixels.append(torch.stack(tensors))
        example = {
            "pair_index": index,
            "pixels": torch.stack(pixels),  # (flips, k, 3, H, W)
            "prompt": record[self.dataset.caption_column],
            "row_index": self.dataset.rows[index][0],
            "original_sizes": original_sizes,
            "crop_top_lefts": crop_top_lefts,
        }
        example.update(self.dataset.row_fields(example["row_index"]))
        return example


def _collate_pixel_pairs(examples: list[dict]) -> list[dict]:
    return examples


class EncodingCacheBuilder:
    """Build (or find) the encoding cache of one dataset: its fingerprint, folder, parts and sizes.

    Args:
        dataset: the pairs to encode (fixed crops only).
        encoders: what encodes them.
        options: where and how.

    Raises:
        ValueError: the dataset's crops change every epoch (``random_crop``, ``temporal_crop='random'``).
    """

    def __init__(self, dataset: PreferenceDataset, encoders: Encoders, options: CacheOptions):
        if not dataset.has_fixed_crops:
            raise ValueError(
                "precompute_encodings caches fixed crops; random_crop=True (or temporal_crop='random') changes every "
                "pair's crop each epoch. Set precompute_encodings=False (or leave it unset) to train with random crops."
            )
        self.dataset, self.encoders, self.options = dataset, encoders, options
        self.flips = (False, True) if dataset.random_flip else (False,)
        self.fingerprint = encodings_fingerprint(dataset, encoders, options, self.flips)
        self.folder = os.path.join(options.cache_dir, f"trl-diffusion-encodings-{self.fingerprint}")
        captions = list(dataset.dataset[dataset.caption_column])
        pair_prompts = [captions[row] for row, _ in dataset.rows]
        if options.deduplicate_prompts:
            self.prompts = list(dict.fromkeys(pair_prompts))
            position = {prompt: index for index, prompt in enumerate(self.prompts)}
            self.prompt_index = [position[prompt] for prompt in pair_prompts]
        else:
            self.prompts, self.prompt_index = pair_prompts, list(range(len(pair_prompts)))
        self.pairs = ShardedTable(self.folder, "pairs", ShardLayout.for_items(len(dataset), options.batch_size))
        self.prompt_table = ShardedTable(
            self.folder, "prompts", ShardLayout.for_items(len(self.prompts), options.batch_size)
        )

    @property
    def complete(self) -> bool:
        return os.path.isfile(os.path.join(self.folder, MANIFEST_NAME))

    @torch.no_grad()
    def estimate(self) -> CacheSize:
        """The cache's tensor bytes, from one encoded pair and prompt (the first readable pair)."""
        pixels = _PixelPairs(self.dataset, self.flips)
        example = next((pixels[i] for i in range(len(pixels)) if pixels[i]["pixels"] is not None), None)
        if example is None:
            return CacheSize(0, 0)
        latents = self.encoders.encode_images(example["pixels"].flatten(0, 1).to(self.encoders.device))
        embeddings = self.encoders.encode_prompt([example["prompt"]])
        pair_bytes = latents.numel() * _stored_itemsize(latents.dtype)
        prompt_bytes = sum(value[0].numel() * _stored_itemsize(value.dtype) for value in embeddings.values())
        return CacheSize.estimate(len(self.dataset), len(self.prompts), pair_bytes, prompt_bytes)

    def _encode_pairs(self, batches: list[range]) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            _PixelPairs(self.dataset, self.flips),
            batch_sampler=[list(batch) for batch in batches],
            num_workers=self.options.num_workers,
            collate_fn=_collate_pixel_pairs,
            generator=torch.Generator(),  # its worker seeds must not draw from (and shift) the global RNG
        )
        for examples in loader:
            with torch.no_grad():
                yield self._encode_pair_examples(examples)

    def _encode_pair_examples(self, examples: list[dict]) -> dict[str, Any]:
        valid = [example for example in examples if example["pixels"] is not None]
        if not valid:
            return {}
        pixels = torch.stack([example["pixels"] for example in valid])  # (N, flips, k, 3, H, W)
        latents = self.encoders.encode_images(pixels.flatten(0, 2).to(self.encoders.device))
        latents = latents.reshape(len(valid), len(self.flips), pixels.shape[2], *latents.shape[1:])
        output = {
            column: [example[column] for example in valid]
            for column in ("pair_index", "row_index", "prompt", "original_sizes", "crop_top_lefts")
        }
        output["prompt_index"] = [self.prompt_index[index] for index in output["pair_index"]]
        for column in ("confidence", "desirable"):
            if column in valid[0]:
                output[column] = [example[column] for example in valid]
        for position, flip in enumerate(self.flips):
            store_tensor(output, "latents_flipped" if flip else "latents", latents[:, position])
        return output

    def _encode_prompts(self, batches: list[range]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            output = {}
            with torch.no_grad():
                for key, value in self.encoders.encode_prompt(self.prompts[batch.start : batch.stop]).items():
                    store_tensor(output, f"prompt_embeds.{key}", value)
            yield output

    @property
    def parts(self) -> dict:
        return {"pairs": (self.pairs, self._encode_pairs), "prompts": (self.prompt_table, self._encode_prompts)}

    def write_shards(self, processes: ProcessGroup = ProcessGroup(), desc: str = "Encoding") -> dict[str, int]:
        """Write this process's missing shards of both parts; return the items it encoded, by part."""
        return _write_parts(self.parts, processes, desc=desc)

    def write_manifest(self) -> None:
        """Mark the cache complete (once every process has written its shards)."""
        _write_manifest(self.folder, self.parts)

    def build(self, processes: ProcessGroup = ProcessGroup(), desc: str = "Encoding") -> None:
        """Every process writes its missing shards of both parts; then the main process writes the manifest."""
        _build_once(self.folder, self.parts, processes, desc=desc)

    def load(self) -> EncodedPreferenceDataset:
        return EncodedPreferenceDataset(
            self.pairs.load(), self.prompt_table.load(), self.dataset, self.fingerprint, self.folder
        )

    def size(self) -> CacheSize:
        """Bytes on disk of the two parts (the pairs part holds the latents and the small per-pair fields)."""
        return CacheSize(latents=self.pairs.size(), embeddings=self.prompt_table.size())


def encode_dataset(
    dataset: PreferenceDataset,
    encoders: Encoders,
    options: CacheOptions,
    processes: ProcessGroup = ProcessGroup(),
    name: str = "train",
) -> EncodedPreferenceDataset:
    """Encode every pair of ``dataset`` once, each process its share of the shards, or load the cache a previous
    run wrote; log the size (estimated before building, measured after)."""
    builder = EncodingCacheBuilder(dataset, encoders, options)
    if not builder.complete:
        if processes.is_main:
            per_pair = builder.estimate()
            logger.info(
                "Encoding cache for %s: %d pairs, %d distinct prompts, %d process(es); estimated size %s: %s.",
                name, len(dataset), len(builder.prompts), processes.count, format_bytes(per_pair.total),
                per_pair.describe(),
            )  # fmt: skip
        builder.build(processes, desc=f"Encoding {name} images and prompts")
    encoded = builder.load()
    if processes.is_main:
        size = builder.size()
        logger.info(
            "Encoding cache for %s: %d pairs, %d prompts in %s; size on disk %s: pairs (latents) %s, prompt "
            "embeddings %s.",
            name, len(encoded), len(builder.prompts), builder.folder, format_bytes(size.total),
            format_bytes(size.latents), format_bytes(size.embeddings),
        )  # fmt: skip
    return encoded


# ----- precomputed reference errors -----


def add_reference_errors(
    dataset: EncodedPreferenceDataset,
    compute_errors: Callable[[list[int]], torch.Tensor],
    key: dict[str, Any],
    batch_size: int,
    processes: ProcessGroup = ProcessGroup(),
    lockstep: bool = False,
    name: str = "train",
) -> EncodedPreferenceDataset:
    """Add each pair's reference errors to an encoded dataset, computed in shards by every process, or loaded.

    Args:
        dataset: the encoded pairs.
        compute_errors: pair indices of ``dataset`` to their ``(B, k)`` reference errors (no grad).
        key: everything the errors depend on besides the encodings (reference weights, seed, options...).
        batch_size: pairs per ``compute_errors`` call.
        processes: the processes that share the work.
        lockstep: every process makes the same number of calls (a reference sharded by ZeRO-3 or FSDP).
        name: the dataset's name, for logs.
    """
    fingerprint = digest(
        {"format": CACHE_FORMAT_VERSION, "encodings": dataset.fingerprint, "batch_size": batch_size, **key}
    )
    folder = os.path.join(os.path.dirname(dataset.folder), f"trl-diffusion-reference-errors-{fingerprint}")
    table = ShardedTable(folder, "errors", ShardLayout.for_items(len(dataset), batch_size))

    def encode(batches: list[range]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            output = {}
            store_tensor(output, "ref_errors", compute_errors(list(batch)).float())
            yield output

    _build_once(folder, {"errors": (table, encode)}, processes, lockstep, desc=f"Reference errors of the {name} pairs")
    return dataset.with_reference_errors(table.load())
