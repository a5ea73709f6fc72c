"""Finding reward checkpoints: a local path given as ``pretrained=``, or the default hub id.

Every loader goes through here so that a missing checkpoint is one clear error naming the expected
hub id / file and how to pass a local copy, instead of a hub stack trace (or a 45 s offline hang).
Nothing here unpickles: ``.pt``/``.pth`` state dicts are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from rewards.errors import CheckpointNotFoundError, DamagedCheckpointError

T = TypeVar("T")


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return (
        "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
        if offline
        else "it could not be fetched from the Hugging Face hub"
    )


def looks_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or path.endswith((".pt", ".pth", ".bin", ".safetensors"))
    )


def resolve_file(pretrained: str | None, *, repo_id: str, filename: str, what: str) -> str:
    """Path of a single checkpoint file: ``pretrained`` if it is a file (or a folder holding
    ``filename``), else ``filename`` from the hub repo ``pretrained or repo_id``."""
    if pretrained is not None:
        pretrained = os.path.expanduser(pretrained)
        if os.path.isfile(pretrained):
            return pretrained
        if os.path.isdir(pretrained):
            candidate = os.path.join(pretrained, filename)
            if os.path.isfile(candidate):
                return candidate
            raise CheckpointNotFoundError(f"{what}: {pretrained} has no {filename}")
        if looks_local(pretrained):
            raise CheckpointNotFoundError(f"{what}: checkpoint file not found: {pretrained}")
        repo_id = pretrained
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as error:  # noqa: BLE001 - every hub failure means the same to the user
        raise CheckpointNotFoundError(
            f"{what}: checkpoint {repo_id}/{filename} not found: {_offline_hint()}. Download it where the hub "
            f"is reachable (huggingface-cli download {repo_id} {filename}) and pass pretrained=/path/to/{filename}"
        ) from error


def load_pretrained(loader: Callable[[str], T], pretrained: str | None, *, default_id: str, what: str) -> T:
    """``loader(pretrained or default_id)`` (a ``from_pretrained``), with a clear error when it is missing."""
    source = os.path.expanduser(pretrained) if pretrained is not None else default_id
    if looks_local(source) and not os.path.exists(source):
        raise CheckpointNotFoundError(f"{what}: no such folder: {source}")
    from safetensors import SafetensorError

    try:
        return loader(source)
    except SafetensorError as error:
        raise DamagedCheckpointError(
            f"{what}: a weights file of {source!r} is damaged ({error}); it was cut short or corrupted on "
            "disk: download it again"
        ) from None
    except OSError as error:
        raise CheckpointNotFoundError(
            f"{what}: could not load {source!r}: {_offline_hint()} (or the folder is incomplete). Download it "
            f"where the hub is reachable (huggingface-cli download {source}) and pass pretrained=/local/folder"
        ) from error


def load_state_dict(path: str, *, key: str | None = None) -> dict[str, Any]:
    """A tensors-only state dict from .safetensors or .pt/.pth (``weights_only=True``: no code runs)."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise DamagedCheckpointError(
                f"reward checkpoint {path} is damaged ({error}); it was cut short or corrupted on disk: "
                "download it again"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise DamagedCheckpointError(
            f"reward checkpoint {path} is not a readable tensors-only checkpoint ({error}): it may be damaged "
            "(download it again) or hold pickled objects, which vialign does not load"
        ) from None
    if key is not None and isinstance(state, dict) and key in state:
        state = state[key]
    return state
