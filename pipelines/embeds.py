"""Encoded prompts as a batch-first bag of tensors, with an in-memory cache and a disk format.

Each family stores what its denoiser needs (SD: ``hidden_states``; SDXL adds ``pooled``; SD3 and FLUX
keep ``hidden_states`` and ``pooled``). The keys are the adapter's business; everything else here
(indexing, concatenation, caching, saving) treats them alike, so the sampling and training code never
needs to know which family it is talking to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pipelines.errors import PipelineInputError
from pipelines.safetensors_io import load_checked, read_metadata, save_checked


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
    batched encoding cannot promise (a matmul's last bits depend on the batch). ``save``/``load`` write and read a safetensors file; its metadata
    names the model it came from, and loading it for another model is an error.
    """

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self._rows: dict[str, PromptEmbeds] = {}

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, prompts: Sequence[str]) -> PromptEmbeds:
        return PromptEmbeds.cat([self._rows[p] for p in prompts])

    def put(self, prompts: Sequence[str], embeds: PromptEmbeds) -> None:
        for i, prompt in enumerate(prompts):
            # clone: a slice would keep the whole batch alive
            self._rows[prompt] = PromptEmbeds({n: t[i : i + 1].clone() for n, t in embeds.items()})

    def save(self, path: str | os.PathLike, prompts: Sequence[str] | None = None) -> None:
        """Write the cached rows of ``prompts`` (default: all) to ``path`` (safetensors), atomically."""
        prompts = list(self._rows) if prompts is None else list(dict.fromkeys(prompts))
        missing = [p for p in prompts if p not in self._rows]
        if missing:
            raise PipelineInputError(f"{len(missing)} prompt(s) are not in the cache, e.g. {missing[0]!r}")
        if not prompts:
            raise PipelineInputError("the prompt cache is empty: encode some prompts before saving it")
        tensors = {}
        for name in self._rows[prompts[0]].tensors:
            tensors[name] = torch.cat([self._rows[p].tensors[name] for p in prompts]).contiguous().cpu()
        metadata = {
            "model_id": self.model_id,
            "prompts": json.dumps(prompts),
            "format": "vialign.prompt_embeds.v1",
        }
        save_checked(tensors, path, metadata)

    def load(self, path: str | os.PathLike, device: torch.device | str | None = None) -> int:
        """Add the rows stored in ``path``; returns how many prompts it held."""
        if not os.path.isfile(path):
            raise PipelineInputError(f"prompt-embedding file not found: {os.fspath(path)}")
        metadata = read_metadata(path, "prompt-embedding file")
        if metadata.get("format") != "vialign.prompt_embeds.v1":
            raise PipelineInputError(f"{os.fspath(path)} is not a vialign prompt-embedding file")
        if metadata.get("model_id") != self.model_id:
            raise PipelineInputError(
                f"{os.fspath(path)} holds prompt embeddings of model {metadata.get('model_id')!r}, "
                f"but this adapter is {self.model_id!r}: precompute them again for this model"
            )
        prompts = json.loads(metadata["prompts"])
        tensors, _ = load_checked(path, "prompt-embedding file", str(device) if device is not None else "cpu")
        self.put(prompts, PromptEmbeds(tensors))
        return len(prompts)
