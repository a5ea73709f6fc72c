"""Resumable training checkpoints, written atomically: safetensors for tensors, JSON for the rest.

A checkpoint is a folder ``checkpoint-<step>`` holding ``tensors.safetensors`` (trainable weights,
optimizer moments, EMA) and ``state.json`` (step, optimizer hyper-parameters, algorithm state). It is
written into a hidden temporary folder and renamed into place only when complete, so a write that is
interrupted (killed process, full disk) never leaves a folder that looks valid: readers only take
``checkpoint-<step>`` folders that contain ``state.json``, and the previous checkpoint is untouched.

A checkpoint can still be damaged after it was written (a disk fault, a copy cut short), so
``state.json`` records the size and SHA-256 of ``tensors.safetensors`` and :func:`latest_checkpoint`
resumes from the newest checkpoint that verifies, naming the ones it skipped and why. Nothing is
deleted on resume: a damaged checkpoint stays on disk until the resumed run writes that step again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipelines.safetensors_io import DamagedFileError, file_sha256, read_header
from vialign.errors import VialignInputError

PATTERN = re.compile(r"^checkpoint-(\d+)$")
TENSORS = "tensors.safetensors"


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer,
    gather: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as (tensors by name, JSON-able rest): safetensors cannot hold nested dicts.
    ``gather``: applied to every state tensor in order (a sharded run's whole tensor on the main process,
    ``vialign.sharding.gather_to_main``); a tensor it maps to None is left out."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                if gather is not None:
                    value = gather(value)
                    if value is None:
                        continue
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write ``root/checkpoint-<step>`` atomically, then delete all but the newest ``keep``.

    Any failure while writing (e.g. ``OSError: No space left on device``) is raised as a
    :class:`VialignInputError` naming the folder; the temporary folder is removed and earlier
    checkpoints stay as they were.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-checkpoint-{step}-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        record = {"bytes": (tmp / TENSORS).stat().st_size, "sha256": file_sha256(tmp / TENSORS)}
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, **state, "files": {TENSORS: record}}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():  # a checkpoint of the same step (a re-run after resume): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VialignInputError(
            f"could not write checkpoint {target}: {error}; the previous checkpoints are intact "
            "(free some disk space, or set train.checkpoint_every=0)"
        ) from error
    # Only checkpoints older than this one count towards `keep`: newer ones are left from a run that was
    # resumed from an earlier step (e.g. past a damaged checkpoint) and are replaced as their steps recur.
    older = [path for path in list_checkpoints(root) if checkpoint_step(path) < step]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary and incomplete folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = PATTERN.match(path.name)
        if match and (path / "state.json").is_file() and (path / "tensors.safetensors").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(PATTERN.match(path.name).group(1))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None when it verifies: ``state.json`` parses and
    names this step, and ``tensors.safetensors`` has the size and SHA-256 it records (checkpoints written
    before checksums were recorded are checked by parsing the safetensors header)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"state.json is unreadable ({error})"
    if not isinstance(state, dict) or state.get("step") != checkpoint_step(path):
        return "state.json does not name this checkpoint's step"
    record = state.get("files", {}).get(TENSORS) if isinstance(state.get("files"), dict) else None
    tensors = path / TENSORS
    if record is None:
        try:
            read_header(tensors, "checkpoint tensors")
        except DamagedFileError:
            return f"{TENSORS} does not parse"
        return None
    try:
        size = tensors.stat().st_size
        if size != record.get("bytes"):
            return f"{TENSORS} has {size} bytes, state.json recorded {record.get('bytes')}"
        if file_sha256(tensors) != record.get("sha256"):
            return f"{TENSORS} does not match the SHA-256 recorded in state.json"
    except OSError as error:
        return f"{TENSORS} is unreadable ({error})"
    return None


def latest_checkpoint(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that verifies, and the newer ones skipped with the reason."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(path / TENSORS)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise VialignInputError(f"checkpoint {path} is unreadable: {error}") from error
    return tensors, state
