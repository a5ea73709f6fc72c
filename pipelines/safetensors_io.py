"""Safetensors files that are checked when read: a checksum of the tensors travels in the file's header.

safetensors itself notices a truncated header, but not a flipped byte or a cut-off tail that still
parses: ``load_file`` then returns wrong numbers without complaint. Every safetensors file vialign
writes (LoRA exports, prompt-embedding and latent caches) therefore records the SHA-256 of its tensors
under the header key :data:`CHECKSUM_KEY`, and :func:`load_checked` recomputes it. Files written by
other tools have no checksum: they are read as they are, and any failure to parse them is one
:class:`DamagedFileError` naming the file. The checksum covers names, dtypes, shapes and bytes, not the
byte layout of the file, so it does not depend on how safetensors orders the header.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch

from pipelines.errors import PipelineInputError

CHECKSUM_KEY = "vialign_sha256"


class DamagedFileError(PipelineInputError):
    """A file that exists but cannot be trusted: unparseable, truncated, or failing its checksum."""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: each name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checked(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` with their checksum in the header, atomically (temporary name, fsync, rename)."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().contiguous().cpu() for name, value in tensors.items()}
    header = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_header(path: str | os.PathLike, what: str) -> tuple[list[str], dict[str, str]]:
    """``(tensor names, metadata)`` of a safetensors file, reading only its header; a header that does not
    parse (or a file shorter than it declares) is a DamagedFileError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise DamagedFileError(damaged_message(path, what, str(error))) from None


def read_metadata(path: str | os.PathLike, what: str) -> dict[str, str]:
    """The header metadata of a safetensors file (see :func:`read_header`)."""
    return read_header(path, what)[1]


def load_checked(
    path: str | os.PathLike, what: str, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, its checksum verified when it has one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = read_metadata(path, what)
    try:
        tensors = load_file(os.fspath(path), device=device)
    except (SafetensorError, OSError) as error:
        raise DamagedFileError(damaged_message(path, what, str(error))) from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_sha256(tensors) != expected:
        raise DamagedFileError(
            damaged_message(path, what, "its tensors do not match the checksum written with them")
        )
    return tensors, metadata


def verify_file(path: str | os.PathLike, what: str) -> None:
    """Raise DamagedFileError unless ``path`` parses and (when it has one) matches its checksum."""
    load_checked(path, what)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def damaged_message(path: str | os.PathLike, what: str, reason: str) -> str:
    return (
        f"{what} {os.fspath(path)} is damaged ({reason}); it was cut short or corrupted on disk: "
        "replace it with a good copy or write it again"
    )
