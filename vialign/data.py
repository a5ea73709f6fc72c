"""Prompt data for training: text files, JSONL, Hugging Face datasets, and the ShapeWorld built-ins.

load_prompts("prompts.txt")                 # one prompt per line
load_prompts("prompts.jsonl", "caption")    # one JSON object per line, the prompt in "caption"
load_prompts("hf:org/name:train")           # datasets.load_dataset("org/name", split="train")
load_prompts("data/saved_dataset")          # datasets.load_from_disk(...)
load_prompts("shapeworld:align")            # a testbed prompt set: align, eval, train, held_out, all
load_prompts("shapeworld-video:align")      # the video testbed's sets (rewards.shapeworld_video)
load_prompts("prompts:simple_animals")      # a published recipe's prompts (vialign.prompt_data)
load_prompts("prompts.json", "text")        # a JSON array of objects, the prompt in "text"
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from vialign.errors import VialignInputError


def _from_dataset(dataset, column: str, source: str) -> list[str]:
    if column not in dataset.column_names:
        raise VialignInputError(
            f"{source} has no column {column!r}; its columns are {dataset.column_names}: set data.prompt_column"
        )
    return [str(value) for value in dataset[column]]


def _require_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise VialignInputError(
            f"{source} is a Hugging Face dataset, which needs the datasets package: pip install datasets"
        ) from None
    return datasets


def load_prompts(spec: str, column: str = "prompt") -> list[str]:
    """The prompts named by ``spec`` (see the module docstring); empty sources are an error."""
    if spec.startswith("prompts:"):
        from vialign.prompt_data import prompt_file, prompt_set, select_prompts

        entry = prompt_set(spec.removeprefix("prompts:"))
        path = prompt_file(spec.removeprefix("prompts:"))
        prompts = select_prompts(entry, read_prompt_file(path, entry.column))
    elif spec.startswith(("shapeworld:", "shapeworld-video:")):
        from rewards import shapeworld, shapeworld_video

        prefix, _, name = spec.partition(":")
        sets = (shapeworld if prefix == "shapeworld" else shapeworld_video).PROMPT_SETS
        if name not in sets:
            choices = ", ".join(f"{prefix}:{n}" for n in sets)
            raise VialignInputError(f"unknown built-in prompt set {spec!r}; choose {choices}")
        prompts = sets[name]()
    elif spec.startswith("hf:"):
        datasets = _require_datasets(spec)
        name, _, split = spec[3:].partition(":")
        try:
            dataset = datasets.load_dataset(name, split=split or "train")
        except Exception as error:  # noqa: BLE001 - any loading failure is reported with the source
            raise VialignInputError(
                f"could not load dataset {name!r} (split {split or 'train'}): {error}"
            ) from None
        prompts = _from_dataset(dataset, column, spec)
    elif os.path.isdir(spec):
        datasets = _require_datasets(spec)
        prompts = _from_dataset(datasets.load_from_disk(spec), column, spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise VialignInputError(
                f"prompt file not found: {path} (expected a .txt or .jsonl file, or hf:NAME)"
            )
        prompts = read_prompt_file(path, column)
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise VialignInputError(f"{spec} holds no prompts")
    return prompts


def read_prompt_file(path: Path, column: str = "prompt") -> list[str]:
    """The lines of a text file, or the ``column`` strings of a JSONL file's rows (malformed rows are
    errors naming the line). The file must exist."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # a JSON array of objects (ImageReward's refl_data.json)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise VialignInputError(f"{path} is not valid JSON: {error.msg} (line {error.lineno})") from None
        if not isinstance(rows, list):
            raise VialignInputError(f"{path} must hold a JSON array of objects with a {column!r} field")
        for number, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get(column), str):
                raise VialignInputError(f"{path}: element {number} has no string {column!r} field")
        return [row[column] for row in rows]
    lines = text.splitlines()
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise VialignInputError(f"{path}:{number} is not valid JSON: {error.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get(column), str):
            raise VialignInputError(f"{path}:{number} has no string {column!r} field")
        prompts.append(row[column])
    return prompts


def split_prompts(prompts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded random ``fraction`` of the distinct prompts is held out."""
    distinct = list(dict.fromkeys(prompts))
    count = round(fraction * len(distinct))
    if count == 0 or count == len(distinct):
        raise VialignInputError(
            f"data.eval_fraction={fraction} of {len(distinct)} distinct prompts leaves an empty split"
        )
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {distinct[i] for i in order[:count]}
    return [p for p in prompts if p not in held], [p for p in distinct if p in held]


def prompts_for_step(prompts: Sequence[str], step: int, count: int, seed: int) -> list[str]:
    """The ``count`` prompts of training step ``step`` (1-based): epochs of seeded permutations, so every
    prompt comes up once per pass, and the choice depends only on (seed, step), not on earlier state
    (resuming needs no data-loader state)."""
    n = len(prompts)
    chosen, orders = [], {}
    for index in range((step - 1) * count, step * count):
        epoch, position = divmod(index, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        chosen.append(prompts[int(orders[epoch][position])])
    return chosen
