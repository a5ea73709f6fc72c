"""Preference pairs for DPO: where they come from, how bad rows are reported, and their latents.

read_preference_pairs("pairs.jsonl")          # rows {"prompt", "chosen", "rejected"}: image paths
read_preference_pairs("pairs.csv")            # the same three columns, paths relative to the file
read_preference_pairs("shapeworld:preferences")  # the testbed's shipped pairs, shapeworld:eval prompts removed
read_preference_pairs("hf:yuvalkirstain/pickapic_v2:train")   # Pick-a-Pic v2 schema (or a saved folder)

Pick-a-Pic v2 rows hold ``caption``, ``jpg_0`` and ``jpg_1`` (image bytes) and ``label_0`` (1: image 0
preferred, 0: image 1 preferred, 0.5: a tie). Ties are dropped and a pair with ``label_0 == 0`` is
flipped, as Diffusion-DPO's training script does. A row that cannot become a pair (missing or corrupt
image, tie, identical images, empty caption) is skipped with one line naming the row and the reason;
:func:`encode_pairs` reports undecodable images the same way. Only when nothing is left is it an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.safetensors_io import DamagedFileError, load_checked, read_header, save_checked
from vialign.errors import VialignInputError

logger = logging.getLogger(__name__)
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass
class PreferencePair:
    prompt: str
    chosen: Path | bytes  # a file or the encoded image itself
    rejected: Path | bytes
    row: str  # where it came from, for messages: "pairs.jsonl:12", "hf:name[34]"


@dataclass
class PreferenceData:
    pairs: list[PreferencePair]
    skipped: list[str] = field(default_factory=list)  # "row: reason", one per dropped row

    def summary(self) -> str:
        return f"{len(self.pairs)} preference pairs, {len(self.skipped)} rows skipped"


def _image_bytes(source: Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _check_pair(pair: PreferencePair) -> str | None:
    """Why ``pair`` cannot be trained on, or None."""
    if not pair.prompt.strip():
        return "empty caption"
    for name, source in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if isinstance(source, Path) and not source.is_file():
            return f"{name} image {source} not found"
        if isinstance(source, bytes) and not source:
            return f"{name} image is empty"
    if _image_bytes(pair.chosen) == _image_bytes(pair.rejected):
        return "chosen and rejected are the same image"
    return None


def _local_rows(path: Path) -> list[tuple[str, dict]]:
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return [(f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(handle), start=2)]
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append((f"{path}:{number}", {"_error": f"not valid JSON: {error.msg}"}))
            continue
        rows.append((f"{path}:{number}", row if isinstance(row, dict) else {"_error": "not a JSON object"}))
    return rows


def _from_local(path: Path, keep: set[str] | None = None) -> PreferenceData:
    if not path.is_file():
        raise VialignInputError(
            f"preference file not found: {path} (a .jsonl or .csv of prompt, chosen, rejected)"
        )
    data = PreferenceData([])
    for where, row in _local_rows(path):
        missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(row.get(key), str)]
        if "_error" in row or missing:
            data.skipped.append(f"{where}: {row.get('_error') or 'no string ' + ', '.join(missing)}")
            continue
        if keep is not None and row["prompt"] not in keep:
            continue
        pair = PreferencePair(
            row["prompt"], path.parent / row["chosen"], path.parent / row["rejected"], where
        )
        reason = _check_pair(pair)
        data.skipped.append(f"{where}: {reason}") if reason else data.pairs.append(pair)
    return data


def _from_pickapic(dataset, source: str) -> PreferenceData:
    missing = [c for c in PICKAPIC_COLUMNS if c not in dataset.column_names]
    if missing:
        raise VialignInputError(
            f"{source} is not in the Pick-a-Pic v2 schema: no column {', '.join(missing)} "
            f"(expected {', '.join(PICKAPIC_COLUMNS)}; its columns are {dataset.column_names})"
        )
    data = PreferenceData([])
    for index, row in enumerate(dataset):
        where = f"{source}[{index}]"
        label = row["label_0"]
        if label is None or float(label) not in (0.0, 1.0):
            data.skipped.append(f"{where}: a tie (label_0={label})")
            continue
        first, second = row["jpg_0"], row["jpg_1"]
        chosen, rejected = (first, second) if float(label) == 1.0 else (second, first)
        pair = PreferencePair(str(row["caption"] or ""), bytes(chosen or b""), bytes(rejected or b""), where)
        reason = _check_pair(pair)
        data.skipped.append(f"{where}: {reason}") if reason else data.pairs.append(pair)
    return data


def read_preference_pairs(spec: str) -> PreferenceData:
    """The pairs named by ``spec`` (module docstring), bad rows listed in ``skipped``."""
    if spec.startswith("shapeworld:") and spec != "shapeworld:preferences":
        raise VialignInputError(
            f"data.train={spec} is a prompt set, and this algorithm trains on preference pairs: use "
            "shapeworld:preferences, a .jsonl/.csv of prompt, chosen, rejected, or hf:NAME[:SPLIT]"
        )
    if spec == "shapeworld:preferences":
        import vialign_assets

        from rewards import shapeworld as sw

        # the alignment protocol: never train on a shapeworld:eval prompt
        data = _from_local(
            vialign_assets.path("shapeworld", "preferences", "pairs.jsonl"), set(sw.align_prompts())
        )
    elif spec.startswith("hf:") or os.path.isdir(spec):
        from vialign.data import _require_datasets

        datasets = _require_datasets(spec)
        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            try:
                dataset = datasets.load_dataset(name, split=split or "train")
            except Exception as error:  # noqa: BLE001 - any loading failure is reported with the source
                raise VialignInputError(f"could not load dataset {name!r}: {error}") from None
        else:
            dataset = datasets.load_from_disk(spec)
        data = _from_pickapic(dataset, spec)
    else:
        data = _from_local(Path(spec))
    for line in data.skipped:
        logger.warning("skipped preference row %s", line)
    if not data.pairs:
        raise VialignInputError(f"{spec}: no usable preference pairs ({len(data.skipped)} rows skipped)")
    return data


@dataclass
class PreferenceLatents:
    prompts: list[str]
    chosen: torch.Tensor  # [N, C, h, w] VAE latents (means)
    rejected: torch.Tensor
    skipped: list[str]  # "row: reason" for pairs with an undecodable image
    encoded: int = 0  # images that went through the VAE (the others came from the cache)


def _decode(source: Path | bytes, size: tuple[int, int]) -> torch.Tensor:
    with Image.open(io.BytesIO(_image_bytes(source))) as image:
        image.load()
        array = np.asarray(image.convert("RGB"))
    pixels = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))).float().div_(255)
    return F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True)[0]


class LatentCache:
    """VAE latents keyed by image content, under ``folder/<model key>/`` (the key hashes the model id, the
    VAE config and the image size): one safetensors shard per encoded batch, written to a temporary name
    and renamed, so an interrupted encoding keeps every finished shard and a restart encodes only the rest.

    Each shard carries a checksum of its latents (``pipelines.safetensors_io``). A shard that fails it, or
    whose header does not parse, is renamed ``*.damaged`` with a warning naming it, and its images are
    encoded again: a damaged cache costs time, never wrong latents."""

    def __init__(self, folder: str | os.PathLike, model_key: str):
        self.folder = Path(folder) / model_key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Path] = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                keys, _ = read_header(shard, "latent cache shard")
            except DamagedFileError as error:
                self._set_aside(shard, error)
                continue
            self.index.update({key: shard for key in keys})

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _set_aside(self, shard: Path, error: Exception) -> None:
        logger.warning(
            "latent cache: %s; set aside as %s.damaged, its images are encoded again", error, shard.name
        )
        try:
            shard.replace(shard.with_name(shard.name + ".damaged"))
        except FileNotFoundError:
            pass  # another process set it aside first
        self.index = {key: path for key, path in self.index.items() if path != shard}

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The cached latents of ``keys`` whose shards verify (the caller encodes the rest)."""
        found: dict[str, torch.Tensor] = {}
        by_shard: dict[Path, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self.index[key], []).append(key)
        for shard, shard_keys in by_shard.items():
            try:
                tensors, _ = load_checked(shard, "latent cache shard")
            except DamagedFileError as error:
                self._set_aside(shard, error)
                continue
            found.update({key: tensors[key] for key in shard_keys})
        return found

    def put(self, latents: dict[str, torch.Tensor]) -> None:
        numbers = [int(p.name.split("-")[1].split(".")[0]) for p in self.folder.glob("shard-*.safetensors*")]
        shard = self.folder / f"shard-{max(numbers, default=-1) + 1:06d}.safetensors"
        save_checked(latents, shard)
        self.index.update({key: shard for key in latents})


def model_key(adapter, height: int, width: int) -> str:
    vae = json.dumps(dict(adapter.vae.config), sort_keys=True, default=str)
    return hashlib.sha256(f"{adapter.model_id}|{vae}|{height}x{width}".encode()).hexdigest()[:16]


def image_key(source: Path | bytes) -> str:
    return hashlib.sha256(_image_bytes(source)).hexdigest()[:32]


def encode_pairs(
    pairs: Sequence[PreferencePair],
    adapter,
    height: int,
    width: int,
    *,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
) -> PreferenceLatents:
    """Every pair's two images resized to (height, width) and VAE-encoded (posterior means) in batches,
    each distinct image once; with ``cache_dir`` (:class:`LatentCache`) only images not encoded before.
    A pair with an undecodable image is skipped with its row and the reason."""
    cache = LatentCache(cache_dir, model_key(adapter, height, width)) if cache_dir is not None else None
    keys = [(image_key(pair.chosen), image_key(pair.rejected)) for pair in pairs]
    sources = {}
    for pair, (chosen, rejected) in zip(pairs, keys):
        sources.setdefault(chosen, (pair.chosen, pair.row))
        sources.setdefault(rejected, (pair.rejected, pair.row))
    latents = cache.get([k for k in sources if k in cache]) if cache is not None else {}
    broken: dict[str, str] = {}
    missing = [k for k in sources if k not in latents]
    for start in range(0, len(missing), batch_size):
        batch, images = [], []
        for key in missing[start : start + batch_size]:
            try:
                images.append(_decode(sources[key][0], (height, width)))
                batch.append(key)
            except (OSError, ValueError, SyntaxError) as error:
                broken[key] = f"image cannot be decoded ({error})"
        if not images:
            continue
        with torch.no_grad():
            encoded = adapter.encode(torch.stack(images), sample=False).float().cpu()
        fresh = dict(zip(batch, encoded))
        latents.update(fresh)
        if cache is not None:
            cache.put(fresh)
    prompts, chosen, rejected, skipped = [], [], [], []
    for pair, (winner, loser) in zip(pairs, keys):
        reason = broken.get(winner) or broken.get(loser)
        if reason:
            skipped.append(f"{pair.row}: {reason}")
            logger.warning("skipped preference row %s", skipped[-1])
            continue
        prompts.append(pair.prompt)
        chosen.append(latents[winner])
        rejected.append(latents[loser])
    if not prompts:
        raise VialignInputError(f"no preference pair could be decoded ({len(skipped)} skipped)")
    logger.info(
        "preference latents: %d images encoded, %d from the cache",
        len(missing) - len(broken),
        len(sources) - len(missing),
    )
    return PreferenceLatents(
        prompts, torch.stack(chosen), torch.stack(rejected), skipped, len(missing) - len(broken)
    )
