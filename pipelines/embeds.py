"""Encoded prompts as a batch-first bag of tensors, with an in-memory cache and a disk format.

Each family stores what its denoiser needs (SD: ``hidden_states``; SDXL adds ``pooled``; SD3 and FLUX
keep ``hidden_states`` and ``pooled``). The keys are the adapter's business; everything else here
(indexing, concatenation, caching, saving) treats them alike, so the sampling and training code never
needs to know which family it is talking to.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.errors import PipelineInputError
from pipelines.safetensors_io import (
    CHECKSUM_KEY,
    DamagedFileError,
    damaged_message,
    read_metadata,
    save_checked,
)


@dataclass
class PromptEmbeds:
    """A batch of encoded prompts: every tensor in ``tensors`` has the batch on dim 0."""

    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"PromptEmbeds tensors disagree on the batch size: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> PromptEmbeds:
        if isinstance(index, int):
            index = slice(index, index + 1)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return PromptEmbeds({name: t[index] for name, t in self.tensors.items()})

    def __getattr__(self, name: str) -> torch.Tensor:
        # Lets adapters write ``embeds.hidden_states``; only reached for names that are not attributes.
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        return PromptEmbeds({name: t.to(device=device, dtype=dtype) for name, t in self.tensors.items()})

    def repeat_interleave(self, repeats: int) -> PromptEmbeds:
        """Each row ``repeats`` times in a row: the layout of G samples per prompt."""
        return PromptEmbeds({n: t.repeat_interleave(repeats, dim=0) for n, t in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        if not parts:
            raise ValueError("PromptEmbeds.cat needs at least one part")
        names = list(parts[0].tensors)
        return PromptEmbeds({n: torch.cat([p.tensors[n] for p in parts], dim=0) for n in names})


class PromptCache:
    """Per-prompt rows of encoded prompts, so that a prompt is encoded once per process.

    Rows are stored one prompt each, encoded one prompt per call (``GeneratorAdapter.encode_prompt``): a
    prompt's row is then bitwise the same whichever prompts were encoded before or beside it, which a
    batched encoding cannot promise (a matmul's last bits depend on the batch). ``save``/``load`` write and
    read a safetensors file; its metadata names the model it came from and how it was encoded
    (:meth:`GeneratorAdapter.prompt_encoding`), and loading it for another model, or for another encoding,
    is an error. A loaded file is not copied into memory: its rows are read from the file's memory map
    when asked for, so a large prompt set costs page cache (shared by the processes of a node), not
    resident memory per process.
    """

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._rows: dict[str, PromptEmbeds] = {}
        self._files: list[PromptEmbedsFile] = []  # newest first

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows or any(prompt in file for file in self._files)

    def __len__(self) -> int:
        return len(self.prompts())

    def prompts(self) -> list[str]:
        """Every prompt with a row: encoded in this process, or in a loaded file."""
        known = dict.fromkeys(self._rows)
        for file in self._files:
            known.update(dict.fromkeys(file.prompts))
        return list(known)

    @property
    def files(self) -> list[str]:
        """The prompt-embedding files loaded, newest first."""
        return [file.path for file in self._files]

    def row(self, prompt: str) -> PromptEmbeds:
        if prompt in self._rows:
            return self._rows[prompt]
        for file in self._files:
            if prompt in file:
                return file.row(prompt)
        raise KeyError(prompt)

    def get(self, prompts: Sequence[str]) -> PromptEmbeds:
        return PromptEmbeds.cat([self.row(p) for p in prompts])

    def put(self, prompts: Sequence[str], embeds: PromptEmbeds) -> None:
        for i, prompt in enumerate(prompts):
            # a copy in host memory: a slice would keep the whole batch alive, and rows kept on the GPU
            # would grow with every new prompt of a long run (``encode_prompt`` moves them back)
            self._rows[prompt] = PromptEmbeds(
                {n: t[i : i + 1].to("cpu", copy=True) for n, t in embeds.items()}
            )

    def save(
        self,
        path: str | os.PathLike,
        prompts: Sequence[str] | None = None,
        encoding: dict[str, Any] | None = None,
    ) -> None:
        """Write the rows of ``prompts`` (default: all) to ``path`` (safetensors), atomically; ``encoding``
        (what decides an embedding besides the model) goes into the metadata, for :meth:`load` to check."""
        prompts = self.prompts() if prompts is None else list(dict.fromkeys(prompts))
        missing = [p for p in prompts if p not in self]
        if missing:
            raise PipelineInputError(f"{len(missing)} prompt(s) are not in the cache, e.g. {missing[0]!r}")
        if not prompts:
            raise PipelineInputError("the prompt cache is empty: encode some prompts before saving it")
        rows = [self.row(p) for p in prompts]
        tensors = {
            name: torch.cat([row.tensors[name] for row in rows]).contiguous().cpu()
            for name in rows[0].tensors
        }
        metadata = {"model_id": self.model_id, "prompts": json.dumps(prompts), "format": FORMAT}
        if encoding is not None:
            metadata["encoding"] = json.dumps(encoding, sort_keys=True)
        save_checked(tensors, path, metadata)

    def load(
        self,
        path: str | os.PathLike,
        device: torch.device | str | None = None,
        encoding: dict[str, Any] | None = None,
    ) -> int:
        """Add the rows stored in ``path`` (after verifying its checksum), a file or a folder of them
        (:func:`embeds_files`); returns how many prompts it holds. ``encoding``: the loading model's,
        compared with the file's when both are known. Rows are read from the file when used (``device``
        is accepted for compatibility; ``encode_prompt`` moves rows to the model's device)."""
        del device
        files = embeds_files(path)
        for file in files:
            self._load_file(file, encoding)
        return len(dict.fromkeys(p for f in self._files[: len(files)] for p in f.prompts))

    def _load_file(self, path: str, encoding: dict[str, Any] | None) -> None:
        file = PromptEmbedsFile(path)
        if not same_model(file.model_id, self.model_id):
            raise PipelineInputError(
                f"{file.path} holds prompt embeddings of model {file.model_id!r}, "
                f"but this adapter is {self.model_id!r}: precompute them again for this model"
            )
        if encoding is not None and file.encoding is not None:
            differ = {k: (file.encoding.get(k), v) for k, v in encoding.items() if file.encoding.get(k) != v}
            if differ:
                shown = ", ".join(
                    f"{k} {theirs!r} (this model: {ours!r})" for k, (theirs, ours) in differ.items()
                )
                raise PipelineInputError(
                    f"{file.path} holds prompt embeddings encoded with {shown}: they would not be the "
                    "embeddings this model computes; precompute them again with the same model options"
                )
        for prompt in file.prompts:
            self._rows.pop(prompt, None)  # the file wins over rows encoded earlier, as a load always did
        self._files.insert(0, file)


FORMAT = "vialign.prompt_embeds.v1"


SHARD_PATTERN = "prompts-{:05d}.safetensors"  # the files of a folder written by precompute_prompt_embeds


def embeds_files(path: str | os.PathLike) -> list[str]:
    """The files of a prompt-embedding file or folder: the file, or the folder's ``*.safetensors`` in
    name order (each a file as :meth:`PromptCache.save` writes it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise PipelineInputError(f"{path} holds no prompt-embedding files (*.safetensors)")
        return [os.path.join(path, f) for f in files]
    if not os.path.isfile(path):
        raise PipelineInputError(f"prompt-embedding file not found: {path}")
    return [path]


def file_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a prompt-embedding file or folder, from the headers alone (no tensor is read)."""
    prompts: dict[str, None] = {}
    for file in embeds_files(path):
        metadata = read_metadata(file, WHAT)
        if metadata.get("format") != FORMAT or "prompts" not in metadata:
            raise PipelineInputError(f"{file} is not a vialign prompt-embedding file")
        prompts.update(dict.fromkeys(json.loads(metadata["prompts"])))
    return list(prompts)


_VERIFY_CHUNK_BYTES = 64 << 20


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model ids name the same model: equal, or two spellings of one local folder."""
    if a == b:
        return True
    if a is None or b is None or not (os.path.isdir(a) and os.path.isdir(b)):
        return False
    return os.path.samefile(a, b)


class PromptEmbedsFile:
    """A prompt-embedding file written by :meth:`PromptCache.save`, opened as a memory map.

    Opening it reads the header, checks the format and verifies the checksum over every byte in chunks
    (a damaged file is refused here, not halfway through a run); :meth:`row` then reads one prompt's row
    (a copy of just that row) whenever it is asked for.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise PipelineInputError(f"prompt-embedding file not found: {self.path}")
        metadata = read_metadata(self.path, WHAT)
        if metadata.get("format") != FORMAT:
            raise PipelineInputError(f"{self.path} is not a vialign prompt-embedding file")
        try:
            self._handle = safe_open(self.path, framework="pt")
            self.names = sorted(self._handle.keys())
            self._verify(metadata.get(CHECKSUM_KEY))
        except (SafetensorError, OSError) as error:
            raise DamagedFileError(damaged_message(self.path, WHAT, str(error))) from None
        self.model_id = metadata.get("model_id")
        self.encoding = json.loads(metadata["encoding"]) if "encoding" in metadata else None
        self.prompts: list[str] = json.loads(metadata["prompts"])
        self._index = {prompt: i for i, prompt in enumerate(self.prompts)}
        rows = {self._handle.get_slice(name).get_shape()[0] for name in self.names}
        if rows != {len(self.prompts)}:
            raise DamagedFileError(
                damaged_message(self.path, WHAT, f"{len(self.prompts)} prompts but {sorted(rows)} rows")
            )

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._index

    def row(self, prompt: str) -> PromptEmbeds:
        i = self._index[prompt]
        return PromptEmbeds({name: self._handle.get_slice(name)[i : i + 1] for name in self.names})

    def _verify(self, expected: str | None) -> None:
        """:func:`pipelines.safetensors_io.tensors_sha256`, computed a chunk of rows at a time."""
        if expected is None:
            return
        digest = hashlib.sha256()
        for name in self.names:
            tensor = self._handle.get_slice(name)
            shape = tuple(tensor.get_shape())
            first = tensor[0:1]
            digest.update(f"{name}|{first.dtype}|{shape}|".encode())
            step = max(1, _VERIFY_CHUNK_BYTES // max(1, first.numel() * first.element_size()))
            for start in range(0, shape[0], step):
                chunk = tensor[start : start + step].contiguous()
                digest.update(chunk.reshape(-1).view(torch.uint8).numpy().tobytes())
        if digest.hexdigest() != expected:
            raise DamagedFileError(
                damaged_message(self.path, WHAT, "its tensors do not match the checksum written with them")
            )


WHAT = "prompt-embedding file"
