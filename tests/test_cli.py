"""``vialign sample`` end to end, and one clear error (exit 2, no traceback) per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vialign.cli import main


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_writes_pngs_and_index(tmp_path, capsys, quiet_libraries):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\n  a blue circle  \n")
    out = tmp_path / "out"
    code, stdout, _ = run(
        [
            "sample",
            "--model",
            "tiny-flux",
            "--prompts",
            str(prompts),
            "--prompt",
            "first",
            "--num-steps",
            "2",
            "--seed",
            "40",
            "--out",
            str(out),
            "--sampler",
            "sde",
            "--height",
            "32",
            "--width",
            "48",
        ],
        capsys,
    )
    assert code == 0 and "wrote 3 images (48x32)" in stdout
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["first", "a red square", "a blue circle"]
    assert [r["seed"] for r in rows] == [40, 41, 42]
    assert {r["sde_kind"] for r in rows} == {"flow-sde"} and rows[0]["noise_level"] == 0.7
    for row in rows:
        assert Image.open(out / row["file"]).size == (48, 32)
    # the same command again refuses to overwrite, and leaves the earlier files intact
    before = (out / "samples.jsonl").read_bytes()
    code, _, err = run(["sample", "--model", "tiny-flux", "--prompt", "x", "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "samples.jsonl").read_bytes() == before


def test_sde_sampling_is_reproducible(tmp_path, capsys, quiet_libraries):
    images = []
    for name in ("a", "b"):
        argv = [
            "sample",
            "--model",
            "tiny-sd",
            "--prompt",
            "a cat",
            "--num-steps",
            "3",
            "--sampler",
            "sde",
            "--noise-level",
            "1.0",
            "--out",
            str(tmp_path / name),
        ]
        assert run(argv, capsys)[0] == 0
        images.append(np.asarray(Image.open(tmp_path / name / "00000.png")))
    assert np.array_equal(images[0], images[1])


def _unsupported_pipeline(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    return str(folder)


def _malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sampler:\n\tnum_steps: 4\n")  # a tab cannot indent YAML
    return str(path)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "./no/such/model"], "model './no/such/model' not found: no such folder"),
        (["--model", "tiny-sd9"], "unknown built-in model 'tiny-sd9'"),
        (
            ["--model", "UNSUPPORTED"],
            "unsupported pipeline class 'KandinskyV22Pipeline'; vialign supports "
            "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline",
        ),
        (["--model", "tiny-sd", "--height", "60"], "height=60 is not a positive multiple of 8"),
        (["--model", "tiny-flux", "--width", "40"], "width=40 is not a positive multiple of 16"),
        (["--num-steps", "0"], "sampler.num_steps (--num-steps): Input should be greater than or equal to 1"),
        (["--num-steps", "-3"], "greater than or equal to 1"),
        (["--sampler", "heun"], "sampler.kind (--sampler): Input should be 'ode' or 'sde' (got 'heun')"),
        (["--config", "MALFORMED"], "bad.yaml is not valid YAML at line 2, column 1"),
        (
            ["--model", "tiny-sd", "--sampler", "sde", "--sde-kind", "flow-sde"],
            "SDE 'flow-sde' is for flow models",
        ),
        (
            ["--sampler", "sde", "sampler.sde_window=[2, 9]", "--num-steps", "4"],
            "sde_window [2, 9] reaches past the last of 4",
        ),
        (["--prompts", "missing.txt"], "prompts file not found"),
        (["--model", "tiny-sd", "--dtype", "int4"], "model.dtype (--dtype): Input should be"),
        (["sampler.steps=3"], "sampler.steps: unknown key"),
        (["--sde-kind", "cps"], "sde_kind only apply to kind=sde, but kind is 'ode'"),
        (["--model", "tiny-sd", "--true-cfg-scale", "3"], "true_cfg_scale is FLUX's"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [
        _unsupported_pipeline(tmp_path)
        if a == "UNSUPPORTED"
        else _malformed_yaml(tmp_path)
        if a == "MALFORMED"
        else a
        for a in argv
    ]
    if "--prompts" not in argv:
        argv += ["--prompt", "a cat"]
    code, _, err = run(["sample", "--out", str(tmp_path / "out"), *argv], capsys)
    assert code == 2
    assert message in err and err.startswith("vialign: error:")
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_no_prompt_is_an_error(tmp_path, capsys):
    code, _, err = run(["sample", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no prompts: pass --prompt" in err


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--prompt", "x", "--stepz", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


def test_installed_command_reports_user_errors_without_traceback(tmp_path):
    """The console script itself (a separate process), as a user would run it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vialign.cli",
            "sample",
            "--model",
            "no-such-org/no-such-model",
            "--prompt",
            "x",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        "model 'no-such-org/no-such-model' not found" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_python_dash_m_vialign_is_the_command():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "vialign", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("vialign ")


# Runs the real command against an unreachable hub. Only the hub's back-off sleeps (1+2+4+8+8 s per
# file) are skipped: the requests, retries, their log lines and vialign's error are all real.
_CLI_WITHOUT_BACKOFF_SLEEP = """
import sys, time, types
import huggingface_hub.utils._http as http
http.time = types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None})
from vialign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_unreachable_hub_prints_each_message_once_and_the_error_last(tmp_path):
    import socket

    with socket.socket() as sock:  # a port that was just free: connecting to it is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")
    }
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    argv = ["sample", "--model", "no-such-org/no-such-model", "--prompt", "x", "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-c", _CLI_WITHOUT_BACKOFF_SLEEP, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    retries = [line for line in lines if "[Retry " in line]
    assert retries and len(retries) == len(set(retries)), result.stderr  # the hub did retry, each shown once
    # the library's retry lines repeat per attempt, but never back to back and never echoed by vialign
    assert all(a != b for a, b in zip(lines, lines[1:])), result.stderr
    assert not {f"vialign: {line}" for line in lines} & set(lines), result.stderr
    assert lines[-1].startswith("vialign: error: model 'no-such-org/no-such-model' not found"), result.stderr
