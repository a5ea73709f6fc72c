"""Faults survived and damaged files refused: each test is a row of docs/faults.md.

Damage is made the way disks and copies make it: a file cut short, a header cut to a few bytes, one
flipped byte in the middle (which parses and only a checksum catches). Interruptions are a real SIGKILL
of a ``vialign train`` process (tests/kill_run.py) and a disk that fills at a chosen byte: every write
vialign makes of its own files goes through ``vialign.files._write``, which the tests make fail with
ENOSPC after a byte budget, leaving the partial write on disk as a full disk does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.safetensors_io import DamagedFileError, load_checked, save_checked
from vialign.checkpoint import checkpoint_problem, latest_checkpoint, list_checkpoints
from vialign.cli import main
from vialign.config import TrainConfig, load_config
from vialign.errors import VialignInputError
from vialign.files import read_jsonl_rows
from vialign.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square", "a blue circle", "a green triangle", "a white star"]


def flip_byte(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def cut(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


DAMAGE = {
    "cut short": cut,
    "header only 4 bytes": lambda path: cut(path, 4),
    "one flipped byte": flip_byte,
}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("vialign: error: "), err
    return lines[-1]


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(n)``: the disk fills after ``n`` more bytes of vialign's own writes."""
    import vialign.files as files

    original = files._write

    def arm(budget: int) -> None:
        left = [budget]

        def write(handle, data: bytes) -> None:
            if len(data) > left[0]:
                original(handle, data[: left[0]])  # what fitted stays on disk
                left[0] = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            left[0] -= len(data)
            original(handle, data)

        monkeypatch.setattr(files, "_write", write)

    yield arm
    monkeypatch.setattr(files, "_write", original)


# ---------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_lora_is_one_error_line(tmp_path, tiny_dir, damage, capsys, quiet_libraries):
    import pipelines

    adapter = pipelines.load_pipeline(tiny_dir("sd3"), device="cpu")
    adapter.add_lora(rank=2)
    file = Path(adapter.save_lora(tmp_path / "lora"))
    load_checked(file, "LoRA weights")  # the export verifies before it is damaged
    DAMAGE[damage](file)
    code = main(["sample", "--model", tiny_dir("sd3"), "--lora", str(tmp_path / "lora"), "--prompt", "x"])
    line = one_error_line(capsys)
    reason = (
        "do not match the checksum" if damage == "one flipped byte" else "Error while deserializing header"
    )
    assert (
        code == 2 and line.startswith(f"vialign: error: LoRA weights {file} is damaged (") and reason in line
    )


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_prompt_embedding_file_is_refused(tmp_path, tiny_dir, damage, quiet_libraries):
    import pipelines

    adapter = pipelines.load_pipeline(tiny_dir("sd3"), device="cpu")
    path = tmp_path / "embeds.safetensors"
    adapter.precompute_prompt_embeds(PROMPTS, path)
    DAMAGE[damage](path)
    with pytest.raises(DamagedFileError, match=f"prompt-embedding file {path} is damaged"):
        adapter.load_prompt_embeds(path)


def test_checksum_covers_every_byte_and_nothing_else(tmp_path):
    """The checksum is of names, dtypes, shapes and bytes: equal for equal tensors however they are laid
    out, different when any one of them changes; files without a checksum load as they are."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2, dtype=torch.bfloat16)}
    save_checked(tensors, tmp_path / "x.safetensors", {"note": "kept"})
    loaded, metadata = load_checked(tmp_path / "x.safetensors", "test file")
    assert metadata["note"] == "kept" and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from pipelines.safetensors_io import tensors_sha256

    assert tensors_sha256(tensors) == tensors_sha256(dict(reversed(list(tensors.items()))))
    for changed in (
        {**tensors, "b": tensors["b"].reshape(3, 2)},
        {**tensors, "b": tensors["b"].double()},
        {**tensors, "b": tensors["b"] + 1e-6},
        {"c": tensors["b"], "a": tensors["a"]},
    ):
        assert tensors_sha256(changed) != tensors_sha256(tensors)
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "plain.safetensors")  # another tool's file: no checksum to verify
    assert torch.equal(load_checked(tmp_path / "plain.safetensors", "test file")[0]["b"], tensors["b"])


def test_damaged_latent_cache_shard_is_set_aside_and_encoded_again(
    tmp_path, tiny_dir, quiet_libraries, caplog
):
    import numpy as np
    from PIL import Image

    import pipelines
    from vialign.preferences import encode_pairs, read_preference_pairs

    rows = []
    for i, colour in enumerate([(230, 40, 40), (40, 80, 240), (40, 200, 60)]):
        for role, shift in (("w", 0), ("l", 60)):
            array = np.full((32, 32, 3), colour, dtype=np.uint8)
            array[8:24, 8:24] = (np.array(colour) + shift) % 256
            Image.fromarray(array).save(tmp_path / f"{i}_{role}.png")
        rows.append({"prompt": PROMPTS[i], "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_preference_pairs(str(tmp_path / "pairs.jsonl")).pairs
    adapter = pipelines.load_pipeline(tiny_dir("sd3"), device="cpu")
    first = encode_pairs(pairs, adapter, 32, 32, batch_size=2, cache_dir=tmp_path / "cache")
    shards = sorted((tmp_path / "cache").glob("*/shard-*.safetensors"))
    assert first.encoded == 6 and len(shards) == 3
    flip_byte(shards[1])  # parses, but its latents are wrong: only the checksum sees it
    with caplog.at_level(logging.WARNING, logger="vialign"):
        second = encode_pairs(pairs, adapter, 32, 32, batch_size=2, cache_dir=tmp_path / "cache")
    assert second.encoded == 2  # the damaged shard's two images, and no others
    assert torch.equal(second.chosen, first.chosen) and torch.equal(second.rejected, first.rejected)
    assert f"latent cache shard {shards[1]} is damaged" in caplog.text and "set aside" in caplog.text
    assert (shards[1].parent / (shards[1].name + ".damaged")).is_file()  # kept, not deleted
    cut(shards[0], 4)  # a header cut short: noticed when the cache opens
    third = encode_pairs(pairs, adapter, 32, 32, batch_size=2, cache_dir=tmp_path / "cache")
    assert third.encoded == 2 and torch.equal(third.chosen, first.chosen)


@pytest.mark.parametrize("damage", ["weights cut short", "weights header 4 bytes", "reward_config.json"])
def test_damaged_reward_checkpoint_is_one_error_line(tmp_path, damage, capsys, quiet_libraries):
    import vialign_assets

    from vialign.sample import save_png

    folder = tmp_path / "reward"
    shutil.copytree(vialign_assets.path("shapeworld", "clip"), folder)
    weights = next(folder.glob("*.safetensors"))
    if damage == "reward_config.json":
        (folder / "reward_config.json").write_text('{"a": 1.0, "b"')
    else:
        cut(weights, None if damage == "weights cut short" else 4)
    save_png(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy(), tmp_path / "x.png")
    (tmp_path / "prompts.txt").write_text("a red square\n")
    code = main(
        [
            "score",
            "--images",
            str(tmp_path / "x.png"),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--reward",
            "shapeworld-clip",
            "--reward-option",
            f"shapeworld-clip.pretrained={folder}",
            "--out",
            str(tmp_path / "scores.jsonl"),
        ]
    )
    line = one_error_line(capsys)
    assert code == 2 and "shapeworld-clip" in line and "damaged" in line
    assert str(folder) in line
    assert not (tmp_path / "scores.jsonl").exists()


# ---------------------------------------------------------------------------------------- training runs
def train_overrides(output_dir: Path, prompt_file: Path, model: str, **extra) -> list[str]:
    settings = {
        "model.path": model,
        "output_dir": output_dir,
        "data.train": prompt_file,
        "rewards": "{brightness: {weight: 1.0}}",
        "finetune.lora_rank": 4,
        "finetune.ema_decay": 0.9,
        "optim.lr": 1e-2,
        "sampler.num_steps": 3,
        "sampler.height": 32,
        "sampler.width": 32,
        "grpo.group_size": 2,
        "grpo.prompts_per_step": 2,
        "grpo.micro_batch_size": 2,
        "train.max_steps": 3,
        "train.eval_every": 0,
        "train.checkpoint_every": 1,
        "train.checkpoints_kept": 3,
        "train.tensorboard": "false",
        **extra,
    }
    return [f"{key.replace('__', '.')}={value}" for key, value in settings.items()]


def train_config(overrides: list[str]) -> TrainConfig:
    return load_config(TrainConfig, None, overrides)


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    weights = {n: p.detach().clone() for n, p in zip(trainer._trainable_names(), trainer.trainable)}
    weights.update({f"ema.{n}": e.detach().clone() for n, e in zip(trainer._trainable_names(), trainer.ema)})
    return weights


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dir):
    """Weights, metrics and exported LoRA of the 3-step run every interrupted run must end equal to."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    folder = tmp_path_factory.mktemp("uninterrupted")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    trainer = Trainer(train_config(train_overrides(folder / "run", folder / "prompts.txt", tiny_dir("sd3"))))
    trainer.progress = False
    trainer.train()
    metrics = [r for r in read_jsonl_rows(folder / "run" / "metrics.jsonl")]
    lora = load_file(folder / "run" / "final" / "pytorch_lora_weights.safetensors")
    return final_weights(trainer), metrics, lora


def assert_equals_uninterrupted(trainer: Trainer, output_dir: Path, uninterrupted) -> None:
    weights, metrics, lora = uninterrupted
    for name, value in final_weights(trainer).items():
        assert torch.equal(value, weights[name]), name
    rows = read_jsonl_rows(output_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, expected in zip(rows, metrics):  # every metric but the wall-clock ones, exactly
        assert {k: v for k, v in row.items() if not k.startswith("time/")} == {
            k: v for k, v in expected.items() if not k.startswith("time/")
        }
    exported = load_file(output_dir / "final" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == lora.keys() and all(torch.equal(exported[k], lora[k]) for k in lora)


@pytest.mark.parametrize("damage", [*DAMAGE, "state.json not JSON", "state.json of another step"])
def test_checkpoint_damage_is_detected(tmp_path, damage):
    tensors = {"weights.x": torch.arange(1000.0)}
    from vialign.checkpoint import save_checkpoint

    for step in (1, 2):
        save_checkpoint(tmp_path, step, tensors, {"optimizer": {}}, keep=5)
    newest = tmp_path / "checkpoint-2"
    assert checkpoint_problem(newest) is None
    if damage == "state.json not JSON":
        cut(newest / "state.json")
    elif damage == "state.json of another step":
        state = json.loads((newest / "state.json").read_text())
        (newest / "state.json").write_text(json.dumps({**state, "step": 1}))
    else:
        DAMAGE[damage](newest / "tensors.safetensors")
    size = (tmp_path / "checkpoint-1" / "tensors.safetensors").stat().st_size
    expected = {
        "cut short": f"tensors.safetensors has {size // 2} bytes, state.json recorded {size}",
        "header only 4 bytes": f"tensors.safetensors has 4 bytes, state.json recorded {size}",
        "one flipped byte": "tensors.safetensors does not match the SHA-256 recorded in state.json",
        "state.json not JSON": "state.json is unreadable (",
        "state.json of another step": "state.json does not name this checkpoint's step",
    }[damage]
    assert checkpoint_problem(newest).startswith(expected)
    assert latest_checkpoint(tmp_path) == (tmp_path / "checkpoint-1", [(newest, checkpoint_problem(newest))])


def test_resume_skips_damaged_newest_checkpoints_and_ends_bitwise_equal(
    tmp_path, tiny_dir, uninterrupted, caplog, quiet_libraries
):
    """Checkpoints 3 (one flipped byte) and 2 (cut short) are damaged after the run: --resume names both,
    deletes neither, continues from checkpoint 1 and ends bitwise where the run without damage ended."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    overrides = train_overrides(tmp_path / "run", tmp_path / "prompts.txt", tiny_dir("sd3"))
    Trainer(train_config(overrides), progress=False).train()
    root = tmp_path / "run" / "checkpoints"
    flip_byte(root / "checkpoint-3" / "tensors.safetensors")
    cut(root / "checkpoint-2" / "tensors.safetensors")
    with caplog.at_level(logging.WARNING, logger="vialign"):
        resumed = Trainer(train_config(overrides), resume=True, progress=False)
    assert resumed.start_step == 2
    skipped = [r.getMessage() for r in caplog.records if "--resume: skipped" in r.getMessage()]
    assert skipped == [
        f"--resume: skipped {root / 'checkpoint-3'}: tensors.safetensors does not match the SHA-256 recorded in "
        "state.json (left on disk)",
        f"--resume: skipped {root / 'checkpoint-2'}: tensors.safetensors has "
        f"{(root / 'checkpoint-2' / 'tensors.safetensors').stat().st_size} bytes, state.json recorded "
        f"{(root / 'checkpoint-1' / 'tensors.safetensors').stat().st_size} (left on disk)",
    ]
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    resumed.train()
    assert_equals_uninterrupted(resumed, tmp_path / "run", uninterrupted)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all(
        checkpoint_problem(p) is None for p in list_checkpoints(root)
    )  # rewritten as the steps recurred


def test_resume_with_every_checkpoint_damaged_is_one_error_line(
    tmp_path, tiny_dir, capsys, caplog, quiet_libraries
):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    overrides = train_overrides(
        tmp_path / "run", tmp_path / "prompts.txt", tiny_dir("sd3"), train__max_steps=2
    )
    Trainer(train_config(overrides), progress=False).train()
    for path in list_checkpoints(tmp_path / "run" / "checkpoints"):
        cut(path / "tensors.safetensors")
    (tmp_path / "config.yaml").write_text("{}\n")
    code = main(["train", str(tmp_path / "config.yaml"), *overrides, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len([r for r in caplog.records if r.getMessage().startswith("--resume: skipped")]) == 2
    assert err.strip().splitlines()[-1] == (
        f"vialign: error: --resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'} "
        "(2 damaged, named above); start without --resume"
    )


def run_killed(point: str, count: int, overrides: list[str], config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        str(ROOT / "tests" / "kill_run.py"),
        point,
        str(count),
        "--",
        "train",
        str(config),
    ]
    return subprocess.run(command + overrides, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "count", "resumes_at"),
    [
        ("rollout", 9, 2),  # 6 denoiser calls per step's rollouts (2 chunks x 3 steps): the 9th is in step 2
        ("checkpoint", 2, 2),  # half of checkpoint-2's tensors on disk
    ],
)
def test_sigkill_then_resume_ends_bitwise_equal(
    tmp_path, tiny_dir, uninterrupted, point, count, resumes_at, quiet_libraries
):
    """A real SIGKILL (no handler runs) during a rollout or during a checkpoint write, then --resume."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "config.yaml").write_text("{}\n")
    overrides = train_overrides(tmp_path / "run", tmp_path / "prompts.txt", tiny_dir("sd3"))
    killed = run_killed(point, count, overrides, tmp_path / "config.yaml")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)][-1] == f"checkpoint-{resumes_at - 1}", killed.stderr[
        -2000:
    ]
    if point == "checkpoint":  # the half-written checkpoint is a hidden temporary folder, never a checkpoint
        assert [p.name for p in root.glob(".tmp-checkpoint-2-*")] and not (root / "checkpoint-2").exists()
    resumed = Trainer(train_config(overrides), resume=True, progress=False)
    assert resumed.start_step == resumes_at
    resumed.train()
    assert_equals_uninterrupted(resumed, tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_ends_bitwise_equal(tmp_path, tiny_dir, uninterrupted):
    """``vialign train`` SIGKILLed from outside at a seeded-random moment after its first checkpoint, then
    resumed: it ends where an uninterrupted run does."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "config.yaml").write_text("{}\n")
    overrides = train_overrides(tmp_path / "run", tmp_path / "prompts.txt", tiny_dir("sd3"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "vialign", "train", str(tmp_path / "config.yaml"), *overrides]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = (tmp_path / "run" / "checkpoints" / f"checkpoint-{k}" for k in (1, 2))
    deadline = time.monotonic() + 240
    while not first.is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    # a seeded-random moment after checkpoint 1, at the latest when checkpoint 2 appears: on a fast host
    # a fixed delay would outlast the run's 3 steps
    kill_at = time.monotonic() + random.Random(16).uniform(0.0, 1.0)
    while time.monotonic() < kill_at and not second.is_dir():
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    resumed = Trainer(train_config(overrides), resume=True, progress=False)
    assert 2 <= resumed.start_step <= 3
    resumed.train()
    assert_equals_uninterrupted(resumed, tmp_path / "run", uninterrupted)


def test_full_disk_during_training_then_resume_ends_bitwise_equal(
    tmp_path, tiny_dir, uninterrupted, full_disk, capsys, quiet_libraries
):
    """The disk fills while step 2's metrics row is written: one error line, checkpoint 1 intact, and
    --resume after space is freed ends where an uninterrupted run does."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "config.yaml").write_text("{}\n")
    overrides = train_overrides(tmp_path / "run", tmp_path / "prompts.txt", tiny_dir("sd3"))
    row_bytes = len(json.dumps(uninterrupted[1][0])) + 1  # within a few bytes of every row's length
    full_disk(row_bytes + row_bytes // 2)
    code = main(["train", str(tmp_path / "config.yaml"), *overrides])
    line = one_error_line(capsys)
    assert code == 2 and line == (
        f"vialign: error: could not write {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device; the "
        "checkpoints written so far are intact: free some disk space and continue with --resume"
    )
    rows = read_jsonl_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]  # the cut-short row of step 2 is dropped
    full_disk(10**9)  # space freed
    resumed = Trainer(train_config(overrides), resume=True, progress=False)
    assert resumed.start_step == 2
    resumed.train()
    assert_equals_uninterrupted(resumed, tmp_path / "run", uninterrupted)


def test_full_disk_during_export_is_one_error_line(tmp_path, tiny_dir, capsys, monkeypatch, quiet_libraries):
    import pipelines.safetensors_io as safetensors_io

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "config.yaml").write_text("{}\n")
    overrides = train_overrides(
        tmp_path / "run", tmp_path / "prompts.txt", tiny_dir("sd3"), train__max_steps=1
    )

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_checked", no_space)
    monkeypatch.setattr("pipelines.adapter.save_checked", no_space)
    code = main(["train", str(tmp_path / "config.yaml"), *overrides])
    line = one_error_line(capsys)
    assert code == 2 and line.startswith(
        f"vialign: error: could not write {tmp_path / 'run' / 'final'}: No space"
    )
    assert "--resume, which exports from the last checkpoint" in line
    assert not (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()
    monkeypatch.undo()
    assert main(["train", str(tmp_path / "config.yaml"), *overrides, "--resume"]) == 0
    load_checked(tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors", "LoRA weights")


# ---------------------------------------------------------------------------------------- sample and score
SAMPLE_PROMPTS = [
    "a red square",
    "a blue circle",
    "a green triangle",
    "a white star",
    "a red star",
    "a blue square",
]


def sample_argv(tiny: str, prompts: Path, out: Path) -> list[str]:
    return ["sample", "--model", tiny, "--prompts", str(prompts), "--out", str(out), "--num-steps", "3"]


@pytest.fixture(scope="module")
def sample_reference(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("sample_reference")
    (folder / "prompts.txt").write_text("\n".join(SAMPLE_PROMPTS) + "\n")
    assert (
        main(sample_argv(tiny_dir("sd3"), folder / "prompts.txt", folder / "out") + ["--batch-size", "2"])
        == 0
    )
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fills_in", ["a PNG", "an index row"])
def test_full_disk_during_sample_then_resume_equals_one_run(
    tmp_path, tiny_dir, sample_reference, full_disk, fills_in, capsys, quiet_libraries
):
    """The index never names a missing file, a cut-short row is dropped, and --resume makes exactly the
    missing images: the folder ends byte-identical to an uninterrupted run."""
    reference = folder_bytes(sample_reference / "out")
    (tmp_path / "prompts.txt").write_text("\n".join(SAMPLE_PROMPTS) + "\n")
    argv = sample_argv(tiny_dir("sd3"), tmp_path / "prompts.txt", tmp_path / "out") + ["--batch-size", "2"]
    rows = [len(line) for line in reference["samples.jsonl"].splitlines(keepends=True)]
    before = (
        sum(len(reference[f"{i:05d}.png"]) for i in range(2)) + rows[0] + rows[1]
    )  # images 0, 1, their rows
    png = len(reference["00002.png"])
    full_disk(before + png // 2 if fills_in == "a PNG" else before + png + rows[2] // 2)
    assert main(argv) == 2
    line = one_error_line(capsys)
    broken = "00002.png" if fills_in == "a PNG" else "samples.jsonl"
    assert line == (
        f"vialign: error: could not write {tmp_path / 'out' / broken}: No space left on device; the 2 images before "
        f"it are in {tmp_path / 'out'} and indexed in samples.jsonl: free some space and finish with --resume"
    )
    rows = read_jsonl_rows(tmp_path / "out" / "samples.jsonl")
    assert [r["index"] for r in rows] == [0, 1] and all(
        (tmp_path / "out" / r["file"]).is_file() for r in rows
    )
    assert main(argv) == 2 and "pass --resume to finish it" in one_error_line(capsys)
    full_disk(10**9)
    assert main(argv + ["--resume"]) == 0
    assert folder_bytes(tmp_path / "out") == reference


def test_sample_resume_redoes_damaged_images_and_refuses_other_settings(
    tmp_path, tiny_dir, sample_reference, capsys, caplog, quiet_libraries
):
    shutil.copytree(sample_reference / "out", tmp_path / "out")
    reference = folder_bytes(tmp_path / "out")
    index = tmp_path / "out" / "samples.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:4]) + lines[4][:30])  # killed while writing row 4
    flip_byte(tmp_path / "out" / "00001.png")  # and a disk fault in an image
    (tmp_path / "out" / "00005.png").unlink()
    (tmp_path / "prompts.txt").write_text("\n".join(SAMPLE_PROMPTS) + "\n")
    argv = sample_argv(tiny_dir("sd3"), tmp_path / "prompts.txt", tmp_path / "out") + ["--batch-size", "2"]
    assert main(argv + ["--resume", "--num-steps", "4"]) == 2
    assert one_error_line(capsys) == (
        f"vialign: error: --resume: {index} row 0 was made with num_steps=3, this call has num_steps=4; resume "
        "with the settings of the interrupted run, or pass --overwrite"
    )
    with caplog.at_level(logging.WARNING, logger="vialign"):
        assert main(argv + ["--resume"]) == 0
    assert "--resume: 00001.png is damaged" in caplog.text
    assert folder_bytes(tmp_path / "out") == reference


SCORE_FILES = 7


@pytest.fixture(scope="module")
def score_folder(tmp_path_factory):
    from vialign.sample import save_png

    folder = tmp_path_factory.mktemp("score")
    (folder / "images").mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(SCORE_FILES):
        save_png(
            (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy(),
            folder / "images" / f"{i}.png",
        )
    (folder / "images" / "3.png").write_bytes(b"\x89PNG not an image")  # reported in its row, not fatal
    (folder / "images" / "7.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short")  # so is a damaged video
    return folder


@pytest.mark.parametrize("out_name", ["scores.jsonl", "scores.csv"])
def test_full_disk_during_score_then_resume_equals_one_run(
    tmp_path, score_folder, full_disk, out_name, capsys
):
    argv = ["score", "--images", str(score_folder / "images"), "--reward", "brightness", "--batch-size", "2"]
    assert main(argv + ["--out", str(tmp_path / "one" / out_name)]) == 0
    reference = (tmp_path / "one" / out_name).read_bytes()
    capsys.readouterr()
    out = tmp_path / "two" / out_name
    full_disk(1000)  # a few rows in: the fourth or fifth row is cut short
    assert main(argv + ["--out", str(out)]) == 2
    partial = tmp_path / "two" / "scores.partial.jsonl"
    assert one_error_line(capsys) == (
        f"vialign: error: could not write {partial}: No space left on device; the rows scored so far are in "
        f"{partial}: free some space and finish with --resume"
    )
    done = read_jsonl_rows(partial)
    assert 0 < len(done) < SCORE_FILES and not out.exists()
    assert main(argv + ["--out", str(out)]) == 2
    assert "an interrupted run left" in one_error_line(capsys)
    full_disk(10**9)
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    assert out.read_bytes() == reference and not partial.exists()
    summary = capsys.readouterr().out
    assert f"scored {SCORE_FILES - 1} of {SCORE_FILES + 1} files; 2 failed" in summary
    assert "3.png: cannot read image: " in summary and "7.mp4: cannot read video: " in summary


def test_score_resume_refuses_rows_of_other_files(tmp_path, score_folder, capsys):
    partial = tmp_path / "scores.partial.jsonl"
    partial.write_text(json.dumps({"file": "elsewhere.png", "prompt": "", "status": "ok"}) + "\n")
    argv = ["score", "--images", str(score_folder / "images"), "--reward", "brightness"]
    assert main(argv + ["--out", str(tmp_path / "scores.jsonl"), "--resume"]) == 2
    assert "scored 'elsewhere.png', which this call does not score" in one_error_line(capsys)


def test_damaged_index_line_is_named(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"index": 0}\n{"index": 1, "fi\n{"index": 2}\n')
    with pytest.raises(VialignInputError, match=rf"{path}:2 is not valid JSON .*the file is damaged"):
        read_jsonl_rows(path)
    path.write_text('{"index": 0}\n{"index": 1}')  # complete, only the newline is missing: kept
    assert [r["index"] for r in read_jsonl_rows(path)] == [0, 1]


def test_score_marks_a_nonfinite_reward_in_its_row(tmp_path, score_folder, monkeypatch):
    import rewards
    from vialign.config import ScoreConfig
    from vialign.media import read_image
    from vialign.score import run_score

    reward = rewards.load_reward("brightness")
    score = reward.score

    def nan_first(pixels, prompts):
        out = score(pixels, prompts)
        out.score[0] = float("nan")  # the first file of the batch
        return out

    monkeypatch.setattr(reward, "score", nan_first)
    files = [score_folder / "images" / "0.png", score_folder / "images" / "1.png"]
    config = ScoreConfig(images=[str(f) for f in files], out=str(tmp_path / "scores.jsonl"))
    report = run_score(config, progress=False, reward=reward)
    rows = read_jsonl_rows(tmp_path / "scores.jsonl")
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["error"] == "the reward returned NaN or inf" and rows[0]["total"] is None
    expected = score(read_image(files[1])[None], [""]).score.item()
    assert rows[1]["total"] == pytest.approx(expected, abs=1e-6)
    assert report.failed == [(rows[0]["file"], "the reward returned NaN or inf")]


def test_every_test_named_in_the_catalogue_exists():
    import ast
    import re

    text = (ROOT / "docs" / "faults.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(named) >= 25
    for file, name in sorted(named):
        tree = ast.parse((ROOT / file).read_text())
        functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in functions, f"docs/faults.md names {file}::{name}, which does not exist"
