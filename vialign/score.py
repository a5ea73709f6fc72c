"""``vialign score``: score folders of images and videos with one or more rewards.

Everything that can be checked without a model is checked first (files exist, every file has a
prompt, reward names and options are known), so a bad call fails in seconds. A file that cannot be
decoded is reported, marked in the output and skipped; it never stops the run. Rows are written as
batches finish (JSONL) or at the end (CSV, atomically), one per file, with the weighted total and
every reward and dimension.

Under ``accelerate launch --num_processes N`` (or ``torchrun``) each process scores every N-th batch of
the files still to score, on its own GPU (``cuda:LOCAL_RANK``), and appends its rows to
``<out stem>.partial.rankR.jsonl``; the main process writes the output from all of them, in file order:
the bytes one process writes.
"""

from __future__ import annotations

import collections
import csv
import inspect
import io
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vialign.config import ScoreConfig
from vialign.errors import VialignInputError
from vialign.files import JsonlAppender, read_jsonl_rows, write_atomically
from vialign.launch import Launch, launched_processes, process_device, rank_files, read_rows_and_parts
from vialign.media import MediaError, find_media, is_video, read_media, to_unit_range
from vialign.sample import INDEX_FILE

logger = logging.getLogger(__name__)
# Decoding releases the GIL: threads keep the reward model fed while it scores the batch before.
READ_THREADS = max(2, min(16, os.cpu_count() or 1))
PREFETCH_BATCHES = 2  # batches read ahead of the one being scored


def read_prompt_table(path: Path) -> dict[Path, str]:
    """file -> prompt from ``samples.jsonl`` / JSONL / CSV (columns ``file`` and ``prompt``); relative file
    names are relative to the table's folder."""
    if not path.is_file():
        raise VialignInputError(f"prompts file not found: {path}")
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = read_jsonl_rows(path)  # an interrupted `vialign sample` may end in a cut-short line
    table: dict[Path, str] = {}
    for number, row in enumerate(rows, start=1):
        file, prompt = row.get("file"), row.get("prompt")
        if not isinstance(file, str) or not isinstance(prompt, str):
            raise VialignInputError(f"{path} row {number} needs string 'file' and 'prompt' columns")
        table[(path.parent / file).resolve()] = prompt
    return table


def resolve_prompts(files: list[Path], config: ScoreConfig, needs_prompt: bool) -> list[str]:
    if config.prompts_file and config.prompts_from:
        raise VialignInputError("pass either --prompts or --prompts-from, not both")
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise VialignInputError(f"prompts file not found: {path}")
        prompts = [
            line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        if len(prompts) != len(files):
            raise VialignInputError(
                f"{path} has {len(prompts)} prompts for {len(files)} files (one prompt per line, in the sorted "
                "order of the files); or use --prompts-from with a table of file and prompt"
            )
        return prompts
    table_path = Path(config.prompts_from) if config.prompts_from else None
    if table_path is None:
        folders = {f.resolve().parent for f in files}
        if len(folders) == 1 and (next(iter(folders)) / INDEX_FILE).is_file():
            table_path = next(iter(folders)) / INDEX_FILE  # a `vialign sample` folder: its own index
            logger.info("prompts from %s", table_path)
    if table_path is None:
        if needs_prompt:
            raise VialignInputError(
                "these rewards need prompts: pass --prompts FILE (one per line) or --prompts-from "
                "samples.jsonl|JSONL|CSV (columns file, prompt)"
            )
        return [""] * len(files)
    table = read_prompt_table(table_path)
    missing = [f for f in files if f.resolve() not in table]
    if missing and needs_prompt:
        raise VialignInputError(
            f"{len(missing)} file(s) have no prompt in {table_path}, e.g. {missing[0]}; add them or score fewer files"
        )
    return [table.get(f.resolve(), "") for f in files]


def build_reward(config: ScoreConfig, has_videos: bool):
    import rewards
    from rewards.registry import REGISTRY

    if not config.rewards:
        raise VialignInputError(
            f"no reward: pass --reward NAME (see --list-rewards); available: "
            f"{', '.join(i.name for i in rewards.list_rewards())}"
        )
    known = {info.name: info for info in rewards.list_rewards()}
    unknown = [name for name in config.rewards if name not in known]
    if unknown:
        rewards.load_reward(unknown[0])  # raises the helpful unknown-name error
    components = {}
    for name, spec in config.rewards.items():
        options = dict(spec.options)
        # a reward whose loader takes the device loads its weights there; any other is moved there
        loads_on_device = "device" in inspect.signature(REGISTRY[name].load).parameters
        if "device" not in options and config.device != "cpu" and loads_on_device:
            options["device"] = config.device
        frames = {}
        if has_videos and known[name].modality == "image":
            frames = {"frames": config.frames, "num_frames": config.num_frames}
        components[name] = rewards.load_reward(name, **frames, **options)
        if not loads_on_device:
            components[name] = components[name].to(config.device)
    return rewards.CombinedReward(components, {name: spec.weight for name, spec in config.rewards.items()})


@dataclass
class ScoreReport:
    rows: list[dict] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    main_process: bool = True  # under a launcher, only the main process has every row and reports

    def summary(self) -> str:
        scored = [r for r in self.rows if r["status"] == "ok"]
        lines = [
            f"scored {len(scored)} of {len(self.rows)} files"
            + (f"; {len(self.failed)} failed:" if self.failed else "")
        ]
        lines += [f"  {file}: {reason}" for file, reason in self.failed]
        if scored:
            lines.append(f"  {'column':28s} {'mean':>10s} {'std':>10s} {'min':>10s} {'max':>10s}")
            for column in self.columns:
                values = torch.tensor(
                    [r[column] for r in scored if r.get(column) is not None], dtype=torch.float64
                )
                if len(values):
                    std = values.std().item() if len(values) > 1 else 0.0
                    lines.append(
                        f"  {column:28s} {values.mean().item():10.4f} {std:10.4f} "
                        f"{values.min().item():10.4f} {values.max().item():10.4f}"
                    )
        return "\n".join(lines)


def partial_path(out: Path) -> Path:
    """Where rows go while a run is in progress; renamed or converted to ``out`` when it completes."""
    return out.with_name(f"{out.stem}.partial.jsonl")


def resumable_rows(partial: Path, files: list[Path], prompts: list[str]) -> dict[str, dict]:
    """Rows of an interrupted run (and of its other processes), by file, that this call would make again:
    same file and prompt."""
    wanted = {str(f): p for f, p in zip(files, prompts)}
    done = {}
    for row in read_rows_and_parts(partial):
        file = row.get("file")
        if file not in wanted:
            raise VialignInputError(
                f"--resume: {partial} scored {file!r}, which this call does not score; resume with the same "
                "--images, or pass --overwrite"
            )
        if row.get("prompt") != wanted[file]:
            raise VialignInputError(
                f"--resume: {partial} scored {file} with the prompt {row.get('prompt')!r}, this call gives "
                f"{wanted[file]!r}; resume with the same prompts, or pass --overwrite"
            )
        done[file] = row
    return done


def score_device(config: ScoreConfig, launch: Launch, reward=None) -> str:
    """Where the files are scored: ``auto`` is the device of a given ``reward``'s weights, or the GPU when
    torch sees one (under a launcher, this process's own) else the CPU."""
    if config.device == "auto" and reward is not None:
        weights = next(iter(reward.parameters()), None) if isinstance(reward, torch.nn.Module) else None
        return str(weights.device) if weights is not None else "cpu"
    return process_device(config.device, launch)


def run_score(
    config: ScoreConfig, *, progress: bool = True, reward=None, launch: Launch | None = None
) -> ScoreReport:
    """The ``vialign score`` job. ``reward`` reuses an already-built reward (a ``rewards.Reward``)
    instead of loading ``config.rewards``. ``launch``: this process's share of the work (default: the
    processes a launcher started, else one).

    Rows are appended to ``<out stem>.partial.jsonl`` as batches finish and ``out`` is written from it,
    atomically, at the end: a killed run or a full disk leaves only complete rows there (at most one
    cut-short last line, dropped on read), and ``--resume`` scores only the files without a row."""
    if launch is None:
        with launched_processes() as launch:
            return run_score(config, progress=progress, reward=reward, launch=launch)
    config = config.model_copy(update={"device": score_device(config, launch, reward)})
    out = Path(config.out)
    partial = partial_path(out)
    if config.resume and config.overwrite:
        raise VialignInputError(
            "pass --resume (finish the interrupted run) or --overwrite (start over), not both"
        )
    if out.exists() and not config.overwrite:
        raise VialignInputError(
            f"{out} already exists"
            + (" (that run is complete: nothing to resume)" if config.resume else "")
            + "; choose another --out or pass --overwrite"
        )
    left = partial if partial.exists() else next(iter(rank_files(partial)), None)
    if left is not None and not (config.resume or config.overwrite):
        raise VialignInputError(
            f"an interrupted run left {left}; pass --resume to finish it or --overwrite to start over"
        )
    if not config.images:
        raise VialignInputError("nothing to score: pass --images DIR|GLOB|FILES")
    files = find_media(config.images)
    import rewards

    known = {info.name: info for info in rewards.list_rewards()}
    if reward is not None:
        needs_prompt = reward.info.needs_prompt
    else:
        needs_prompt = any(known[n].needs_prompt for n in config.rewards if n in known)
    prompts = resolve_prompts(files, config, needs_prompt)
    done = {}
    if launch.is_main and config.resume and left is not None:
        done = resumable_rows(partial, files, prompts)
    if launch.is_main and config.resume:
        logger.info("--resume: %d of %d files were scored before", len(done), len(files))
    done = launch.from_main(done)  # every process has passed the checks above before anything is written
    if reward is None:
        reward = build_reward(config, has_videos=any(is_video(f) for f in files))
    report = ScoreReport()
    for row in done.values():
        if row.get("status") != "ok":
            report.failed.append((row["file"], row.get("error") or "failed"))
        elif not report.columns:
            report.columns = [k for k in row if k not in ("file", "prompt", "status", "error")]
    todo = [i for i, f in enumerate(files) if str(f) not in done]
    # whole batches per process, as one process makes them
    todo = launch.share(
        [todo[start : start + config.batch_size] for start in range(0, len(todo), config.batch_size)]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if launch.is_main and not done:  # a fresh start: no earlier process's rows may be merged in
        for part in rank_files(partial):
            part.unlink()
    launch.barrier()
    own_partial = launch.own_file(partial)
    kept = f"the rows scored so far are in {own_partial}: free some space and finish with --resume"
    resumed_columns = list(report.columns)
    total, initial = (len(files), len(done)) if launch.world_size == 1 else (len(todo), 0)
    with (
        # each process appends to its own file: a resumed run's rows stay where they are, read on merging
        JsonlAppender(own_partial, fresh=not done, kept=kept) as appender,
        tqdm(
            total=total,
            initial=initial,
            unit="file",
            desc=f"vialign score{launch.name}",
            disable=not progress or not launch.is_main,
        ) as bar,
    ):
        batches = [
            todo[start : start + config.batch_size] for start in range(0, len(todo), config.batch_size)
        ]
        for batch, decoded in zip(batches, read_ahead([[files[i] for i in b] for b in batches], config)):
            rows = score_batch(
                reward, [files[i] for i in batch], decoded, [prompts[i] for i in batch], config, report
            )
            if resumed_columns and report.columns != resumed_columns:
                raise VialignInputError(
                    f"--resume: {partial} has the columns {resumed_columns}, these rewards give "
                    f"{report.columns}; resume with the same rewards, or pass --overwrite"
                )
            appender.write(rows)
            done.update({row["file"]: row for row in rows})
            bar.update(len(batch))
    launch.barrier()  # every process's rows are on disk
    if not launch.is_main:
        report.rows, report.main_process = list(done.values()), False
        return report
    if launch.world_size > 1:
        done = {row["file"]: row for row in read_rows_and_parts(partial)}
        merged_report(report, [done[str(f)] for f in files])
    report.rows = [done[str(f)] for f in files]  # the order of the files, however the run was split
    if out.suffix == ".csv":
        text = io.StringIO()
        writer = csv.DictWriter(
            text, fieldnames=["file", "prompt", "status", "error", "total", *report.columns[1:]]
        )
        writer.writeheader()
        writer.writerows(report.rows)
        write_atomically(out, text.getvalue(), kept=kept)
    else:
        write_atomically(out, "".join(json.dumps(row) + "\n" for row in report.rows), kept=kept)
    for part in [partial, *rank_files(partial)]:
        part.unlink(missing_ok=True)
    return report


def merged_report(report: ScoreReport, rows: list[dict]) -> None:
    """``report``'s failures and columns from every process's ``rows``, in file order (this process may have
    scored none of the files, or none that could be read)."""
    report.failed = [(row["file"], row.get("error") or "failed") for row in rows if row["status"] != "ok"]
    for row in rows:
        if row["status"] == "ok":
            report.columns = [k for k in row if k not in ("file", "prompt", "status", "error")]
            break


def read_ahead(batches: list[list[Path]], config: ScoreConfig) -> Iterator[list[torch.Tensor | MediaError]]:
    """Each batch's decoded files (or the error that file gave), in order; the next
    ``PREFETCH_BATCHES`` batches are decoding in threads while the caller scores this one."""

    def read(path: Path) -> torch.Tensor | MediaError:
        try:
            return read_media(path, config.max_frames, uint8=True)  # 4x fewer bytes to batch and copy
        except MediaError as error:
            return error

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append([pool.submit(read, path) for path in batch])
            if len(pending) > PREFETCH_BATCHES:
                yield [future.result() for future in pending.popleft()]
        while pending:
            yield [future.result() for future in pending.popleft()]


def score_batch(
    reward,
    files: list[Path],
    decoded: list[torch.Tensor | MediaError],
    prompts: list[str],
    config: ScoreConfig,
    report: ScoreReport,
) -> list[dict]:
    """Rows for one batch of decoded files; files of equal shape are scored together."""
    rows: list[dict] = [
        {"file": str(f), "prompt": p, "status": "ok", "error": None} for f, p in zip(files, prompts)
    ]
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for i, (path, pixels) in enumerate(zip(files, decoded)):
        if isinstance(pixels, MediaError):
            rows[i].update(status="error", error=str(pixels))
            report.failed.append((str(path), str(pixels)))
            continue
        groups[tuple(pixels.shape)].append((i, pixels))
    for members in groups.values():
        index = [i for i, _ in members]
        pixels = torch.stack([p for _, p in members])
        if pixels.device.type == "cpu" and torch.device(config.device).type == "cuda":
            pixels = pixels.pin_memory()
        pixels = to_unit_range(pixels.to(config.device, non_blocking=True))
        with torch.no_grad():
            out = reward(pixels, [prompts[i] for i in index])
        values = {"total": out.score, **out.dims}
        if not report.columns:
            report.columns = list(values)
        for k, i in enumerate(index):
            for name, tensor in values.items():
                value = float(tensor[k])
                rows[i][name] = value if math.isfinite(value) else None
            if any(rows[i][name] is None for name in values):
                rows[i].update(status="error", error="the reward returned NaN or inf")
                report.failed.append((rows[i]["file"], "the reward returned NaN or inf"))
    return rows
