"""`vialign sample` and `vialign score` under `accelerate launch --num_processes 2` (gloo on the CPU) write
the bytes one process writes; the rows an interrupted run of several processes left in its per-process
files are merged on --resume; `vialign score` computes on the GPU when there is one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from launch import accelerate_launch

from vialign.cli import main
from vialign.errors import VialignInputError
from vialign.launch import Launch, process_device, rank_files

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a white star", "a red star"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one thread: the same kernels


def launch(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m vialign ARGV`` under ``accelerate launch --num_processes 2``, on the CPU."""
    command = [
        *accelerate_launch(),
        "-m",
        "vialign",
        *argv,
    ]
    result = subprocess.run(command, env=ENV, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def sample_argv(model: str, prompts: Path, out: Path) -> list[str]:
    return ["sample", "--model", model, "--prompts", str(prompts), "--out", str(out), "--num-steps", "3"]


@pytest.fixture
def one_thread():
    """This process computes the reference with one thread, as each launched process does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def score_images(folder: Path) -> Path:
    """7 PNGs, one of them not an image, and a damaged video: every row kind of a score table."""
    from vialign.sample import save_png

    images = folder / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(7):
        pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
        save_png(pixels, images / f"{i}.png")
    (images / "3.png").write_bytes(b"\x89PNG not an image")
    (images / "7.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short")
    return images


SCORE_ARGV = ["score", "--reward", "brightness", "--batch-size", "2", "--device", "cpu"]


# ------------------------------------------------------------------------------- two processes == one
@pytest.mark.slow
def test_sample_in_two_processes_writes_the_bytes_of_one(
    tmp_path, tiny_dir, prompts_file, one_thread, quiet_libraries
):
    """5 images in batches of 2: process 0 makes batches 0 and 2 (the short one), process 1 batch 1; the
    PNGs and samples.jsonl are byte-identical to one process's, and no per-process file is left."""
    assert main(sample_argv(tiny_dir("sd3"), prompts_file, tmp_path / "one") + ["--batch-size", "2"]) == 0
    two = launch(sample_argv(tiny_dir("sd3"), prompts_file, tmp_path / "two") + ["--batch-size", "2"])
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    assert two.stdout.count("wrote 5 images") == 1  # the main process reports, once


@pytest.mark.slow
def test_score_in_two_processes_writes_the_rows_of_one(tmp_path, one_thread):
    """8 files in batches of 2, a batch each in turn; the CSV (header from the rewards' columns, failed
    files' rows) is byte-identical to one process's, and the summary counts every process's files."""
    argv = SCORE_ARGV + ["--images", str(score_images(tmp_path))]
    assert main(argv + ["--out", str(tmp_path / "one" / "scores.csv")]) == 0
    two = launch(argv + ["--out", str(tmp_path / "two" / "scores.csv")])
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    assert two.stdout.count("scored 6 of 8 files; 2 failed:") == 1


# ------------------------------------------------------------------ resuming what several processes left
def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_sample_resume_merges_the_rows_other_processes_left(
    tmp_path, tiny_dir, prompts_file, capsys, one_thread, quiet_libraries
):
    """A run of two processes killed mid-way left rows in samples.rank1.jsonl only (process 1; process 0
    was killed before its first row was written, and image 4 is missing). A new run refuses the folder
    without --resume; --resume keeps the complete images and ends with one process's bytes, merging
    process 1's rows, whose last one was cut short; --overwrite drops an earlier process's rows."""
    argv = sample_argv(tiny_dir("sd3"), prompts_file, tmp_path / "out") + ["--batch-size", "2"]
    assert main(argv) == 0
    reference = folder_bytes(tmp_path / "out")
    index = tmp_path / "out" / "samples.jsonl"
    rows = index.read_text().splitlines(keepends=True)
    index.unlink()
    part = tmp_path / "out" / "samples.rank1.jsonl"
    part.write_text(rows[2] + rows[3] + rows[4][:40])
    (tmp_path / "out" / "00004.png").unlink()
    assert main(argv) == 2
    assert last_error(capsys) == (
        f"vialign: error: {part} already exists (an earlier run); pass --resume to finish it, --overwrite "
        "to replace it, or choose another --out"
    )
    png = (tmp_path / "out" / "00002.png").stat().st_mtime_ns
    assert main(argv + ["--resume"]) == 0
    assert folder_bytes(tmp_path / "out") == reference and not rank_files(index)
    assert (tmp_path / "out" / "00002.png").stat().st_mtime_ns == png  # kept, not made again
    (tmp_path / "out" / "samples.rank3.jsonl").write_text(rows[0])  # of an earlier run of 4 processes
    assert main(argv + ["--overwrite"]) == 0
    assert folder_bytes(tmp_path / "out") == reference


def test_score_resume_merges_the_rows_other_processes_left(tmp_path, capsys, one_thread):
    """scores.partial.jsonl (process 0) and scores.partial.rank1.jsonl (process 1, its last row cut short)
    of a killed run of two processes: --resume scores the files without a row and writes one process's
    bytes; nothing of the run is left beside the output."""
    argv = SCORE_ARGV + ["--images", str(score_images(tmp_path))]
    out = tmp_path / "one" / "scores.jsonl"
    assert main(argv + ["--out", str(out)]) == 0
    reference = out.read_bytes()
    rows = reference.decode().splitlines(keepends=True)
    out.unlink()
    partial, part = out.with_name("scores.partial.jsonl"), out.with_name("scores.partial.rank1.jsonl")
    part.write_text(rows[2] + rows[3] + rows[6][:25])
    assert main(argv + ["--out", str(out)]) == 2
    assert last_error(capsys) == (
        f"vialign: error: an interrupted run left {part}; pass --resume to finish it or --overwrite to start over"
    )
    partial.write_text(rows[0] + rows[1])
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    assert out.read_bytes() == reference and sorted(out.parent.iterdir()) == [out]
    assert "scored 6 of 8 files; 2 failed:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- units
def test_batches_are_dealt_round_robin():
    batches = [[0, 1], [2, 3], [4, 5], [6]]
    assert Launch().share(batches) == list(range(7))
    assert Launch(rank=0, world_size=2).share(batches) == [0, 1, 4, 5]
    assert Launch(rank=1, world_size=2).share(batches) == [2, 3, 6]
    assert Launch(rank=2, world_size=3).share(batches) == [4, 5]
    assert Launch(rank=1, world_size=2).own_file(Path("d/samples.jsonl")) == Path("d/samples.rank1.jsonl")
    assert Launch().own_file(Path("d/samples.jsonl")) == Path("d/samples.jsonl")


def test_rank_files_are_found_in_process_order(tmp_path):
    for name in [
        "samples.jsonl",
        "samples.rank10.jsonl",
        "samples.rank2.jsonl",
        "samples.rank0.jsonl",
        "x.rank1.jsonl",
    ]:
        (tmp_path / name).write_text("")
    assert [p.name for p in rank_files(tmp_path / "samples.jsonl")] == [
        "samples.rank2.jsonl",
        "samples.rank10.jsonl",
    ]
    assert rank_files(tmp_path / "missing" / "samples.jsonl") == []


@pytest.mark.parametrize("cuda", [True, False])
def test_devices_of_one_process_and_of_a_launch(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert process_device("auto", Launch()) == ("cuda" if cuda else "cpu")
    assert process_device("cpu", Launch(rank=1, world_size=2, local_rank=1)) == "cpu"
    assert process_device("cuda:0", Launch(rank=1, world_size=2, local_rank=1)) == "cuda:0"  # asked for
    if cuda:
        second = Launch(rank=1, world_size=2, local_rank=1)
        assert process_device("auto", second) == process_device("cuda", second) == "cuda:1"
        with pytest.raises(VialignInputError, match="LOCAL_RANK=2 but torch sees 2 GPU.*at most 2 processes"):
            process_device("auto", Launch(rank=2, world_size=3, local_rank=2))
    else:
        assert process_device("auto", Launch(rank=1, world_size=2, local_rank=1)) == "cpu"


def test_score_uses_the_gpu_by_default(tmp_path, monkeypatch, capsys):
    """`vialign score` without --device (flag, config file or key=value) scores on `auto`: CUDA when torch
    sees it; a given reward's own device when called with one."""
    import rewards
    import vialign.score
    from vialign.config import ScoreConfig

    seen = []
    monkeypatch.setattr(
        vialign.score,
        "run_score",
        lambda config, progress: seen.append(config.device) or vialign.score.ScoreReport(),
    )
    (tmp_path / "a.png").write_bytes(b"")
    argv = ["score", "--images", str(tmp_path), "--reward", "brightness", "--out", str(tmp_path / "s.jsonl")]
    (tmp_path / "cpu.yaml").write_text("device: cpu\n")
    for extra in ([], ["--device", "cpu"], ["device=cuda:1"], ["--config", str(tmp_path / "cpu.yaml")]):
        assert main(argv + extra) == 0
    assert seen == ["auto", "cpu", "cuda:1", "cpu"]
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "auto (default: CUDA when torch sees it, else cpu)" in " ".join(capsys.readouterr().out.split())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vialign.score.score_device(ScoreConfig(device="auto"), Launch()) == "cuda"
    reward = rewards.load_reward("brightness")  # no weights: the CPU
    assert vialign.score.score_device(ScoreConfig(device="auto"), Launch(), reward) == "cpu"


def test_rewards_without_a_device_option_are_moved_to_the_device():
    """`--device cuda` (the default on a GPU now) with a reward whose loader takes no device, such as
    brightness: it is moved there, not given an option it refuses (before: `reward 'brightness' has no
    option(s) device`). `meta` stands in for the GPU on the CPU."""
    from vialign.config import ScoreConfig
    from vialign.score import build_reward

    config = ScoreConfig(rewards={"brightness": {}, "saturation": {"weight": 0.5}}, device="meta")
    reward = build_reward(config, has_videos=False)
    assert set(reward.components) == {"brightness", "saturation"}
    assert all(t.device.type == "meta" for t in [*reward.parameters(), *reward.buffers()])
