"""``vialign score`` end to end: a `vialign sample` folder plus a corrupt file and videos, one row per
file, the corrupt one marked, a summary; input errors come before any model loads."""

from __future__ import annotations

import csv
import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_rewards import save_tiny_hf_clip

import rewards
from vialign.cli import main
from vialign.media import read_media


def write_mp4(path, frames: np.ndarray, rate: int = 8) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples") / "out"
    argv = [
        "sample",
        "--model",
        "tiny-sd3",
        "--num-steps",
        "2",
        "--out",
        str(folder),
        "--prompt",
        "a red square",
        "--prompt",
        "a blue circle",
        "--prompt",
        "a green triangle",
    ]
    assert main(argv) == 0
    return folder


def test_score_a_sample_folder_with_a_corrupt_file_and_videos(
    sample_folder, tmp_path, capsys, quiet_libraries
):
    folder = tmp_path / "mixed"
    shutil.copytree(sample_folder, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    video = (np.random.default_rng(0).random((6, 48, 64, 3)) * 255).astype(np.uint8)
    write_mp4(folder / "clip.mp4", video)
    frames = [Image.fromarray(f) for f in video[:3]]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with open(folder / "samples.jsonl", "a") as index:
        for name in ("broken.png", "clip.mp4", "anim.gif"):
            index.write(json.dumps({"file": name, "prompt": "a moving square"}) + "\n")
    clip = save_tiny_hf_clip(tmp_path / "clip")
    out = tmp_path / "scores.csv"
    argv = [
        "score",
        "--images",
        str(folder),
        "--reward",
        "clipscore=2",
        "--reward",
        "brightness=0.5",
        "--reward-option",
        f"clipscore.pretrained={clip}",
        "--reward-option",
        "clipscore.mode=cosine",
        "--frames",
        "uniform",
        "--num-frames",
        "4",
        "--out",
        str(out),
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert [r["file"].split("/")[-1] for r in rows] == [
        "00000.png",
        "00001.png",
        "00002.png",
        "anim.gif",
        "broken.png",
        "clip.mp4",
    ]
    by_name = {r["file"].split("/")[-1]: r for r in rows}
    assert (
        by_name["broken.png"]["status"] == "error" and "cannot read image" in by_name["broken.png"]["error"]
    )
    assert by_name["broken.png"]["total"] == ""
    assert "scored 5 of 6 files; 1 failed" in stdout and "broken.png" in stdout and "clipscore" in stdout
    assert by_name["00001.png"]["prompt"] == "a blue circle"
    # the numbers: the weighted total of the components, and the same as calling the rewards directly
    clipscore = rewards.load_reward("clipscore", pretrained=str(clip), mode="cosine")
    brightness = rewards.load_reward("brightness")
    for name in ("00000.png", "clip.mp4"):
        row = by_name[name]
        assert float(row["total"]) == pytest.approx(
            2 * float(row["clipscore"]) + 0.5 * float(row["brightness"]), rel=1e-5
        )
        pixels = read_media(folder / name).unsqueeze(0)
        if pixels.ndim == 5:
            expected = torch.stack(
                [clipscore(pixels[:, :, t], [row["prompt"]]).score for t in (0, 2, 3, 5)]
            ).mean()
        else:
            expected = clipscore(pixels, [row["prompt"]]).score
        assert float(row["clipscore"]) == pytest.approx(float(expected), rel=1e-4)
        assert float(row["brightness"]) == pytest.approx(float(brightness(pixels).score), rel=1e-4)


def test_jsonl_output_and_explicit_prompt_file(sample_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    out = tmp_path / "s.jsonl"
    assert (
        main(
            [
                "score",
                "--images",
                f"{sample_folder}/*.png",
                "--prompts",
                str(prompts),
                "--reward",
                "saturation",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["one", "two", "three"] and all(r["status"] == "ok" for r in rows)
    assert set(rows[0]) == {"file", "prompt", "status", "error", "total", "saturation"}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--reward", "pickscor"], "unknown reward 'pickscor' (did you mean pickscore"),
        (["--reward", "brightness=heavy"], "the weight after '=' must be a number"),
        (
            ["--reward", "brightness", "--reward-option", "clipscore.mode=x"],
            "write NAME.KEY=VALUE for a reward given",
        ),
        (
            ["--reward", "brightness", "--reward-option", "brightness.gamma=2"],
            "reward 'brightness' has no option(s) gamma",
        ),
        (["--reward", "clipscore", "--prompts", "THREE_PROMPTS_FOR_FOUR"], "has 3 prompts for 4 files"),
        (["--reward", "clipscore", "--prompts-from", "TABLE_MISSING_ONE"], "1 file(s) have no prompt in"),
        (["--reward", "brightness", "--out", "scores.txt"], "out (--out): must end in .jsonl or .csv"),
        (["--reward", "brightness", "--images", "nope/"], "no such file or folder: nope/"),
        ([], "no reward: pass --reward NAME"),
    ],
)
def test_input_errors_before_any_model_loads(sample_folder, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "four"
    shutil.copytree(sample_folder, folder)
    shutil.copy(folder / "00000.png", folder / "extra.png")
    (tmp_path / "THREE_PROMPTS_FOR_FOUR").write_text("a\nb\nc\n")
    (folder / "TABLE_MISSING_ONE").write_text((folder / "samples.jsonl").read_text())  # names relative to it
    extra = [
        str(folder / a) if a == "TABLE_MISSING_ONE" else str(tmp_path / a) if a.isupper() else a
        for a in extra
    ]
    images = [] if "--images" in extra else ["--images", str(folder)]
    code = main(["score", *images, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_prompt_free_rewards_need_no_prompts(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
    assert (
        main(
            [
                "score",
                "--images",
                str(tmp_path / "black.png"),
                "--reward",
                "brightness",
                "--out",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 0
    )
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert row["total"] == 0.0 and row["prompt"] == ""
    assert (
        main(
            [
                "score",
                "--images",
                str(tmp_path / "black.png"),
                "--reward",
                "brightness",
                "--out",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
