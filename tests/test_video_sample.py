"""``vialign sample`` on video models (tiny-wan, tiny-cogvideox): MP4s (and lossless PNG frames) that are
the adapter's decode, ``samples.jsonl`` rows, seeds, errors before the model loads, --resume, steering
with best-of-N, and ``vialign score`` on the output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vialign.cli import main

SIZE = ["--height", "32", "--width", "32", "--num-frames", "9", "--num-steps", "2"]
IMAGE_ROW_KEYS = [
    "file",
    "prompt",
    "seed",
    "index",
    "model",
    "lora",
    "family",
    "sampler",
    "sde_kind",
    "noise_level",
    "sde_window",
    "num_steps",
    "guidance_scale",
    "true_cfg_scale",
    "negative_prompt",
    "height",
    "width",
    "dtype",
]


def sample(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["sample", "--device", "cpu", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def png_frames(folder: Path) -> torch.Tensor:
    """F x 3 x H x W uint8 of a frames folder."""
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in sorted(folder.glob("*.png"))]
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two tiny-wan videos of one prompt (seeds 0 and 1), one per batch, with their PNG frames."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("videos") / "out"
    argv = ["--model", "tiny-wan", "--prompt", "a red ball", "--prompt", "a red ball", "--batch-size", "1"]
    assert main(["sample", "--device", "cpu", *argv, *SIZE, "--save-frames", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------- output
def test_rows_name_the_mp4s_and_their_frames(videos):
    rows = rows_of(videos)
    assert [r["file"] for r in rows] == ["00000.mp4", "00001.mp4"]
    assert [r["frames_dir"] for r in rows] == ["00000_frames", "00001_frames"]
    assert [r["seed"] for r in rows] == [0, 1] and [r["index"] for r in rows] == [0, 1]
    assert sorted(rows[0]) == sorted([*IMAGE_ROW_KEYS, "num_frames", "fps", "frames_dir"])
    assert rows[0]["num_frames"] == 9 and rows[0]["fps"] == 16  # Wan's default frame rate
    assert (rows[0]["family"], rows[0]["height"], rows[0]["width"]) == ("wan", 32, 32)
    assert sorted(p.name for p in videos.iterdir()) == [
        "00000.mp4",
        "00000_frames",
        "00001.mp4",
        "00001_frames",
        "samples.jsonl",
    ]


def test_videos_are_the_adapters_decode(videos):
    """The PNG frames are round(255 * decode) exactly; the MP4 decodes to 9 frames of 32 x 32 within
    H.264 yuv420p's error of it (mean < 3/255)."""
    import pipelines
    from vialign.media import read_video
    from vialign.sampling import rollout

    adapter = pipelines.load_pipeline("tiny-wan", device="cpu")
    schedule = adapter.schedule(2, 32, 32)
    guidance = adapter.make_guidance(None)
    for seed in (0, 1):  # as sampled: one video per batch, from Generator("cpu").manual_seed(seed)
        generators = [torch.Generator("cpu").manual_seed(seed)]
        with torch.no_grad():
            latents = adapter.initial_latents(generators, 1, 32, 32, schedule, num_frames=9)
            trajectory = rollout(
                adapter,
                adapter.encode_prompt(["a red ball"]),
                latents,
                schedule,
                guidance=guidance,
                uncond=adapter.uncond_embeds(1),
                generator=generators,
            )
            decoded = adapter.decode(trajectory.final)[0]  # F x 3 x H x W in [0, 1]
        assert decoded.shape == (9, 3, 32, 32)
        expected = (decoded * 255).round().to(torch.uint8)
        assert torch.equal(png_frames(videos / f"{seed:05d}_frames"), expected)
        mp4 = read_video(videos / f"{seed:05d}.mp4")  # 3 x T x H x W
        assert mp4.shape == (3, 9, 32, 32)
        assert (mp4.transpose(0, 1) - decoded).abs().mean() < 3 / 255


def test_same_seed_same_video_other_seed_another(videos, tmp_path, capsys):
    code, stdout, _ = sample(
        ["--model", "tiny-wan", "--prompt", "a red ball", "--seed", "1", *SIZE, "--save-frames"]
        + ["--out", str(tmp_path / "again")],
        capsys,
    )
    assert code == 0 and "wrote 1 videos (32x32, 9 frames at 16 fps)" in stdout
    again = tmp_path / "again"
    assert (again / "00000.mp4").read_bytes() == (videos / "00001.mp4").read_bytes()
    assert folder_bytes(again / "00000_frames") == folder_bytes(videos / "00001_frames")
    seed0, seed1 = png_frames(videos / "00000_frames").float(), png_frames(videos / "00001_frames").float()
    assert (seed0 - seed1).abs().mean() > 0.5  # in 1/255 (a tiny random model: small differences)


def test_cogvideox_defaults_and_a_model_folders_vialign_json(tmp_path, tiny_dir, capsys):
    """CogVideoX's MP4s default to 8 fps; a model folder's vialign.json sets num_frames and fps."""
    code, stdout, _ = sample(
        ["--model", "tiny-cogvideox", "--prompt", "a cat", "--num-frames", "9"]
        + ["--height", "16", "--width", "16", "--num-steps", "2", "--out", str(tmp_path / "cog")],
        capsys,
    )
    assert code == 0 and "9 frames at 8 fps" in stdout
    assert [(r["family"], r["num_frames"], r["fps"]) for r in rows_of(tmp_path / "cog")] == [
        ("cogvideox", 9, 8)
    ]
    folder = tmp_path / "wan"
    shutil.copytree(tiny_dir("wan"), folder)
    (folder / "vialign.json").write_text(json.dumps({"num_frames": 5, "fps": 12.5}))
    code, stdout, _ = sample(
        ["--model", str(folder), "--prompt", "a cat", "--height", "16", "--width", "16"]
        + ["--num-steps", "2", "--out", str(tmp_path / "json")],
        capsys,
    )
    assert code == 0 and "5 frames at 12.5 fps" in stdout
    assert [(r["num_frames"], r["fps"]) for r in rows_of(tmp_path / "json")] == [(5, 12.5)]


# ---------------------------------------------------------------------------------------- bad input
NOT_4K1 = (
    "num_frames=10 is not 4k+1 for this wan model (its VAE keeps the first frame alone and "
    "compresses the others 4x in time); try 9 or 13"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny-wan", "--num-frames", "10"], NOT_4K1),
        (
            ["--model", "tiny-cogvideox", "--num-frames", "13"],
            "num_frames=13 gives 4 latent frames, but CogVideoX's VAE decodes the latent frames after the first "
            "in pairs, so it needs an odd number: num_frames = 8k+1; try 9 or 17",
        ),
        (
            ["--model", "tiny-wan", "--num-frames", "9", "--height", "24"],
            "height=24 is not a positive multiple of 16 for this wan model (VAE factor 8 x patch/packing 2); "
            "try 16 or 32",
        ),
        (
            ["--model", "tiny-cogvideox", "--width", "40"],
            "width=40 is not a positive multiple of 16 for this cogvideox model (VAE factor 8 x patch/packing 2); "
            "try 32 or 48",
        ),
        (
            ["--model", "tiny-sd3", "--num-frames", "9", "--fps", "8", "--save-frames"],
            "num_frames (--num-frames), fps (--fps), save_frames (--save-frames) apply to video models only, but "
            "tiny-sd3 (sd3) generates images: drop them, or pass a video model (e.g. --model tiny-wan)",
        ),
        (
            ["--model", "tiny-wan", "--steer", "best-of-n", "--reward", "aesthetic"],
            "steering reward 'aesthetic' scores images, but tiny-wan (wan) generates videos: give it a frame "
            "strategy, --reward-option aesthetic.frames=uniform (steer.rewards.aesthetic.options.frames: "
            "uniform|first-middle-last|random|all; num_frames sets how many for uniform, default 8)",
        ),
        (
            ["--model", "tiny-sd3", "--steer", "best-of-n", "--reward", "shapeworld-video-oracle"],
            "steering reward 'shapeworld-video-oracle' scores videos, but tiny-sd3 (sd3) generates images: "
            "steer it with an image reward (see vialign score --list-rewards)",
        ),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    import pipelines

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipelines, "load_pipeline", no_loading)
    code, _, err = sample([*argv, "--prompt", "x", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"vialign: error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_local_folder_and_a_config_file_are_checked_before_loading(tmp_path, tiny_dir, capsys, monkeypatch):
    import pipelines

    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    config = tmp_path / "sample.yaml"
    config.write_text(f"model:\n  path: {tiny_dir('wan')}\nnum_frames: 10\nprompts: [x]\n")
    code, _, err = sample(["--config", str(config), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"vialign: error: {NOT_4K1}"


def test_a_model_its_id_does_not_tell_is_checked_once_loaded(tmp_path, capsys, monkeypatch):
    """Where the family is unknown before loading (e.g. a hub id not in the cache), the checks run right
    after the model loads, before anything is sampled or written."""
    import vialign.sample

    monkeypatch.setattr(vialign.sample, "preview_model", lambda path: None)
    monkeypatch.setattr(vialign.sample, "generate_images", lambda *a, **k: pytest.fail("sampled"))
    out = tmp_path / "out"
    code, _, err = sample(["--model", "tiny-sd3", "--fps", "8", "--prompt", "x", "--out", str(out)], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "vialign: error: fps (--fps) apply to video models only, but tiny-sd3 (sd3) generates images: drop "
        "them, or pass a video model (e.g. --model tiny-wan)"
    )
    code, _, err = sample(
        ["--model", "tiny-wan", "--num-frames", "10", "--prompt", "x", "--out", str(out)], capsys
    )
    assert code == 2 and err.strip().splitlines()[-1] == (
        "vialign: error: num_frames=10 is not 4k+1 for this wan model (its VAE keeps the first frame alone "
        "and compresses the others 4x in time); try 9 or 13"
    )
    assert not out.exists()


def test_what_the_id_tells_agrees_with_the_loaded_adapter(tiny_dir):
    """The preview's checks run the adapter's own code on the config files alone: they refuse exactly the
    frame counts and sizes the loaded adapter refuses."""
    import pipelines
    from pipelines.loading import preview_model

    def refused(check, *args) -> bool:
        try:
            check(*args)
        except pipelines.PipelineInputError:
            return True
        return False

    for name in ("tiny-wan", "tiny-cogvideox", tiny_dir("wan")):
        preview, adapter = preview_model(name), pipelines.load_pipeline(name, device="cpu")
        assert preview is not None and (preview.family, preview.is_video) == (adapter.family, True)
        assert preview.default_num_frames == adapter.default_num_frames
        for frames in range(1, 30):
            assert refused(preview.checks.check_frames, frames) == refused(adapter.check_frames, frames)
        for size in range(8, 72, 8):
            assert refused(preview.checks.check_size, size, 32) == refused(adapter.check_size, size, 32)
        assert refused(adapter.check_frames, 10) and not refused(adapter.check_frames, 9)
    assert not preview_model("tiny-sd3").is_video
    assert preview_model("not-a-model") is None


# --------------------------------------------------------------------------------------------- resume
def test_resume_remakes_only_what_is_missing(tmp_path, capsys):
    """3 videos in batches of 2. The run was interrupted before video 2 (no MP4, no row), and video 1 is
    cut short: --resume remakes batch 0, keeping 00000.mp4 as it is, and batch 1; the folder ends with the
    bytes of the uninterrupted run. Then a saved frame goes missing: its video is made again."""
    out = tmp_path / "out"
    argv = ["--model", "tiny-wan", "--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch-size", "2"]
    argv += [*SIZE, "--save-frames", "--out", str(out)]
    assert sample(argv, capsys)[0] == 0
    reference = folder_bytes(out)
    index = out / "samples.jsonl"
    index.write_text("".join(line + "\n" for line in index.read_text().splitlines()[:2]))
    (out / "00002.mp4").unlink()
    mp4 = (out / "00001.mp4").read_bytes()
    (out / "00001.mp4").write_bytes(mp4[: len(mp4) // 2])
    mtimes = {name: (out / name).stat().st_mtime_ns for name in ("00000.mp4", "00001.mp4")}
    code, stdout, _ = sample([*argv, "--resume"], capsys)
    assert code == 0 and "wrote 3 videos" in stdout
    assert folder_bytes(out) == reference
    assert (out / "00000.mp4").stat().st_mtime_ns == mtimes["00000.mp4"]  # complete: kept
    assert (out / "00001.mp4").stat().st_mtime_ns != mtimes["00001.mp4"]

    (out / "00000_frames" / "frame_004.png").unlink()
    mtimes = {name: (out / name).stat().st_mtime_ns for name in ("00000.mp4", "00002.mp4")}
    assert sample([*argv, "--resume"], capsys)[0] == 0
    assert folder_bytes(out) == reference
    assert (out / "00000.mp4").stat().st_mtime_ns != mtimes["00000.mp4"]  # made again, with its frames
    assert (out / "00002.mp4").stat().st_mtime_ns == mtimes["00002.mp4"]  # its batch is complete

    # resuming with other video settings would mix two runs
    code, _, err = sample([*argv[:-3], "--out", str(out), "--resume"], capsys)  # without --save-frames
    assert code == 2 and "row 0 was made with save_frames=True, this call has save_frames=False" in err
    code, _, err = sample([*argv, "--fps", "8", "--resume"], capsys)
    assert code == 2 and "row 0 was made with fps=16, this call has fps=8" in err


def test_resume_merges_the_rows_other_processes_left(tmp_path, capsys):
    """An interrupted run of two processes left process 1's rows in samples.rank1.jsonl (its last row cut
    short) and no samples.jsonl; --resume merges them and ends with one process's bytes."""
    out = tmp_path / "out"
    argv = ["--model", "tiny-wan", "--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch-size", "1"]
    argv += ["--height", "16", "--width", "16", "--num-frames", "5", "--num-steps", "2", "--out", str(out)]
    assert sample(argv, capsys)[0] == 0
    reference = folder_bytes(out)
    rows = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").unlink()
    (out / "samples.rank1.jsonl").write_text(rows[1] + rows[2][:30])
    (out / "00002.mp4").unlink()
    assert sample(argv, capsys)[0] == 2  # an earlier run: --resume or --overwrite
    assert sample([*argv, "--resume"], capsys)[0] == 0
    assert folder_bytes(out) == reference


@pytest.mark.slow
def test_two_processes_write_the_bytes_of_one(tmp_path, capsys):
    """Under accelerate launch --num_processes 2 (gloo, CPU, one thread each) the MP4s, frames and index
    are byte-identical to one process's (~10 s)."""
    import os
    import subprocess

    from launch import accelerate_launch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    argv = [
        "sample",
        "--device",
        "cpu",
        "--model",
        "tiny-wan",
        "--prompts",
        str(prompts),
        "--batch-size",
        "1",
    ]
    argv += ["--height", "16", "--width", "16", "--num-frames", "5", "--num-steps", "2", "--save-frames"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*accelerate_launch(), "-m", "vialign", *argv, "--out", str(tmp_path / "two")],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    assert result.stdout.count("wrote 3 videos") == 1


# ------------------------------------------------------------------------------------ steering, score
def test_best_of_n_steers_a_video_model(tmp_path, capsys):
    """The reward scores the decoded videos as B x 3 x T x H x W: the kept video is the candidate with
    the highest brightness, and its steer_reward is the brightness of its frames."""
    import rewards

    out = tmp_path / "out"
    code, stdout, _ = sample(
        ["--model", "tiny-wan", "--prompt", "a cat", "--steer", "best-of-n", "--reward", "brightness"]
        + ["--particles", "3", "--height", "16", "--width", "16", "--num-frames", "5", "--num-steps", "2"]
        + ["--save-frames", "--out", str(out)],
        capsys,
    )
    assert code == 0 and "wrote 1 videos" in stdout
    (row,) = rows_of(out)
    details = row["steer_details"]
    assert row["steer"] == "best-of-n" and len(details["candidate_rewards"]) == 3
    assert row["steer_reward"] == max(details["candidate_rewards"])
    frames = png_frames(out / row["frames_dir"]).float() / 255  # F x 3 x H x W
    brightness = rewards.load_reward("brightness")(frames.transpose(0, 1)[None]).score.item()
    assert abs(brightness - row["steer_reward"]) < 2 / 255


def test_score_reads_the_sampled_videos(videos, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    code = main(
        ["score", "--images", str(videos), "--reward", "brightness", "--device", "cpu", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["file"]).name, r["prompt"], r["status"]) for r in rows] == [
        ("00000.mp4", "a red ball", "ok"),
        ("00001.mp4", "a red ball", "ok"),
    ]
    frames = png_frames(videos / "00000_frames").float() / 255
    brightness = (frames * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).mean().item()
    assert abs(rows[0]["brightness"] - brightness) < 2 / 255  # the MP4 as read back


def test_encoded_frames_have_no_uninitialized_bytes():
    """write_video hands the encoder frames whose row padding is set (zeros): with swscale's uninitialized
    padding the same 16-wide video encoded to other bytes now and then."""
    from vialign.media import _encoder_frame

    image = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    frame = _encoder_frame(image, "yuv420p")
    import av

    reference = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
    assert np.array_equal(frame.to_ndarray(), reference.to_ndarray())
    padded = [p for p in frame.planes if p.line_size > p.width]
    assert padded  # 8-wide chroma rows in wider lines
    for plane in padded:
        rows = np.frombuffer(plane, np.uint8)[: plane.line_size * plane.height].reshape(plane.height, -1)
        assert not rows[:, plane.width :].any()
