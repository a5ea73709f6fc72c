"""Training from precomputed prompt embeddings (``model.prompt_embeds``).

``vialign precompute-embeds CONFIG`` encodes every prompt a training run of ``CONFIG`` will encode
(:func:`needed_prompts`) into one safetensors file (``pipelines.embeds.PromptCache``: the embeddings,
their prompts, the model and how it encodes); a run with ``model.prompt_embeds: FILE`` then loads no
text encoder or tokenizer at all, reads each prompt's row from the file (bitwise the row it would have
encoded: prompts are encoded one at a time either way), and refuses to start when the file lacks one
of its prompts (:func:`check_precomputed`), naming the command that adds them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vialign.config import TrainConfig
from vialign.errors import ConfigError, VialignInputError

logger = logging.getLogger(__name__)

EMPTY_PROMPT = ""  # CFG's unconditional branch, data.prompt_dropout's replacement, SDXL's zeros' shape


def extra_prompts(config: TrainConfig) -> list[str]:
    """Prompts a run encodes besides its data: the empty prompt (CFG's unconditional branch, prompt
    dropout) and the captions of ``refl.regularizer_data``."""
    prompts = [EMPTY_PROMPT]
    regularizer = getattr(config.settings, "regularizer_data", None)
    if regularizer:
        import json
        from pathlib import Path

        path = Path(regularizer)
        if not path.is_file():
            raise VialignInputError(f"{config.algorithm}.regularizer_data: {path} not found")
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                continue  # the algorithm reports it, with its line number
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
    return prompts


def needed_prompts(
    config: TrainConfig, train: Sequence[str], held_out: Sequence[str], regression: Sequence[str]
) -> list[str]:
    """Every prompt a training run encodes, each once, given its training, evaluation and regression
    prompts: evaluation ones (the first ``eval.max_prompts``) only when it evaluates."""
    prompts = [*train, *extra_prompts(config)]
    if config.train.eval_every and held_out:
        prompts += [*held_out[: config.eval.max_prompts], *regression]
    return list(dict.fromkeys(prompts))


def run_prompts(config: TrainConfig) -> list[str]:
    """:func:`needed_prompts` of ``config``, its prompt data read as the trainer reads it."""
    from vialign.algorithms import get_algorithm
    from vialign.data import load_prompts

    data = config.data
    if get_algorithm(config.algorithm).data == "preference_pairs":
        from vialign.preferences import read_preference_pairs

        train = [pair.prompt for pair in read_preference_pairs(data.train).pairs]
    else:
        train = load_prompts(data.train, data.prompt_column)
    held_out = load_prompts(data.eval, data.prompt_column) if data.eval is not None else []
    held_out = list(dict.fromkeys(held_out))  # eval_fraction: a subset of train, already included
    spec = config.eval.regression_prompts
    regression = list(dict.fromkeys(load_prompts(spec, data.prompt_column))) if spec else []
    return needed_prompts(config, train, held_out, regression)


def fix_command(config: TrainConfig) -> str:
    return (
        f"vialign precompute-embeds --config CONFIG (the run's config and key=value overrides; it adds the "
        f"missing prompts to {config.model.prompt_embeds}), or vialign precompute-embeds --model "
        f"{config.model.path} --prompts FILE --out {config.model.prompt_embeds}"
    )


def check_precomputed(config: TrainConfig, prompts: Sequence[str]) -> None:
    """Refuse a run whose ``model.prompt_embeds`` file lacks some of ``prompts`` (:func:`needed_prompts`);
    reads the file's header only, so it fails before a model is loaded."""
    from pipelines.embeds import file_prompts

    path = config.model.prompt_embeds
    if not os.path.exists(path):
        raise ConfigError(f"model.prompt_embeds: {path} not found; write it with: {fix_command(config)}")
    stored = set(file_prompts(path))
    prompts = list(dict.fromkeys(prompts))
    missing = [p for p in prompts if p not in stored]
    if missing:
        raise ConfigError(
            f"model.prompt_embeds: {len(missing)} of the {len(prompts)} prompts this run encodes are not "
            f"in {path} (e.g. {missing[0]!r}), and with model.prompt_embeds the text encoders are not "
            f"loaded to encode them; precompute them with: {fix_command(config)}"
        )
    logger.info("model.prompt_embeds: %d prompts read from %s; text encoders not loaded", len(prompts), path)


@dataclass
class PrecomputeReport:
    path: str
    prompts: int  # rows in the file written
    encoded: int  # of them encoded now
    kept: int  # of them already in the file


def precompute_embeds(config: TrainConfig, prompts: Sequence[str], out: str) -> PrecomputeReport:
    """Encode ``prompts`` with ``config.model`` (text encoders loaded) into ``out``: a ``.safetensors``
    file, or a folder of files (``GeneratorAdapter.precompute_prompt_embeds``). The prompts an existing
    ``out`` holds (same model and encoding, else an error) are kept and not encoded again."""
    from pipelines.embeds import file_prompts
    from pipelines.errors import PipelineInputError
    from vialign.sample import load_model

    if not prompts:
        raise VialignInputError("no prompts to precompute")
    single = out.endswith(".safetensors")
    if not single and os.path.isfile(out):
        raise VialignInputError(f"--out {out} is a file: name a .safetensors file, or a folder")
    exists = os.path.isfile(out) or (
        os.path.isdir(out) and any(name.endswith(".safetensors") for name in os.listdir(out))
    )
    try:
        kept = file_prompts(out) if exists else []
    except PipelineInputError as error:
        raise VialignInputError(
            f"{out} cannot be extended: {error}; remove it or choose another --out"
        ) from None
    model = config.model.model_copy(update={"prompt_embeds": None})
    adapter = load_model(model, with_lora=False)  # LoRA acts on the denoiser: embeddings do not change
    try:
        if kept and single:
            adapter.load_prompt_embeds(out)  # checks the model and encoding; its rows are written again
    except PipelineInputError as error:
        raise VialignInputError(
            f"{out} cannot be extended: {error}; remove it or choose another --out"
        ) from None
    encoded = len(set(prompts) - set(kept))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        adapter.precompute_prompt_embeds([*kept, *prompts] if single else prompts, out)
    except PipelineInputError as error:
        if not kept:
            raise
        raise VialignInputError(
            f"{out} cannot be extended: {error}; remove it or choose another --out"
        ) from None
    return PrecomputeReport(path=out, prompts=len(file_prompts(out)), encoded=encoded, kept=len(kept))
