"""One process of a two-process ``vialign train`` fails: every process ends within seconds, and the error
is printed once (docs/faults.md, "Several processes").

Two CPU processes (gloo) under ``accelerate launch`` run the CLI (tests/fail_one_rank.py), with a reward
that fails on one process at step 2: an input error, a wrong-shaped or NaN score, a bug. Before, the
other process either waited in its next collective or printed a second traceback ("Connection closed
by peer") under the real error.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from launch import accelerate_launch

from vialign import distributed

HELPER = Path(__file__).with_name("fail_one_rank.py")
INJECTED = "fail-on-rank: the injected failure"
LAUNCHER_TRACEBACK = re.compile(
    r'Traceback \(most recent call last\):\n  File "<frozen runpy>".*?ChildFailedError', re.S
)
SETTINGS = {
    "grpo": {"group_size": 2, "prompts_per_step": 2, "micro_batch_size": 2},
    "draft": {"prompts_per_step": 2, "micro_batch_size": 1},  # one reward call per step and process
}


def launch(tmp_path: Path, model: str, spec: str, algorithm: str) -> tuple[int, str, float, float]:
    """Train 3 steps on two processes with ``VIALIGN_TEST_FAIL=spec``: (exit status, stdout + stderr,
    seconds from the first injected failure to the end of every process, seconds in all)."""
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green triangle\na white star\n")
    config = {
        "algorithm": algorithm,
        "model": {"path": model},
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "prompts.txt"), "eval": None},
        "rewards": {"fail-on-rank": {}},
        "finetune": {"lora_rank": 4},
        "sampler": {"num_steps": 3, "height": 32, "width": 32},
        algorithm: SETTINGS[algorithm],
        "train": {"max_steps": 3, "eval_every": 0, "checkpoint_every": 0, "tensorboard": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    times = tmp_path / "failed_at.txt"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "VIALIGN_TEST_FAIL": spec,
        "VIALIGN_TEST_FAIL_TIMES": str(times),
    }
    env.pop("VIALIGN_DEBUG", None)
    command = [
        *accelerate_launch(),
        str(HELPER),
        "train",
        str(tmp_path / "config.yaml"),
    ]
    start = time.time()
    # a hang is what this tests against: the timeout turns one into a failure instead of a stuck suite
    result = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    end = time.time()
    output = result.stdout + result.stderr
    assert times.is_file(), f"no failure was injected:\n{output[-3000:]}"
    failed_at = min(float(line) for line in times.read_text().split())
    return result.returncode, output, end - failed_at, end - start


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, algorithm, error",
    [
        # a reward's score of the wrong shape on process 1: the reward check's one-line input error
        ("1:2:shape", "grpo", "vialign: error: reward 'fail-on-rank' returned scores of shape (1,) for 2"),
        # NaN on process 1 only: DRaFT stops there, process 0 goes on into its next collective
        ("1:2:nan", "draft", "vialign: error: step 2: the reward returned NaN or infinite scores"),
        # a bug on the main process: its traceback, once
        ("0:2:bug", "grpo", f"ZeroDivisionError: {INJECTED} (process 0, call 2)"),
        # the same input error on both processes: printed once
        ("0:2:nan,1:2:nan", "draft", "vialign: error: step 2: the reward returned NaN or infinite scores"),
        # process 0 is busy outside any collective (asleep in the reward) when process 1 fails
        ("1:2:input,0:2:hang", "grpo", f"vialign: error: {INJECTED} (process 1, call 2)"),
    ],
    ids=["shape", "nan", "bug-on-main", "same-error-twice", "busy-peer"],
)
def test_a_failing_process_ends_every_process(tmp_path, tiny_dir, spec, algorithm, error):
    code, output, after_failure, seconds = launch(tmp_path, tiny_dir("sd3"), spec, algorithm)
    print(f"{spec}: every process ended {after_failure:.2f} s after the failure ({seconds:.1f} s in all)")
    assert code != 0, output[-3000:]
    assert after_failure < 20, output[-3000:]
    assert output.count(error) == 1, output[-5000:]
    # the process that failed prints no traceback for an input error; no process prints a collective's
    # (the launcher's own traceback, ending in ChildFailedError and its summary, is not the processes')
    processes = LAUNCHER_TRACEBACK.sub("", output)
    assert processes.count("Traceback") == ("bug" in spec), output[-5000:]
    assert "Connection closed by peer" not in output and "[rank" not in output, output[-5000:]
    assert "vialign/trainer.py" in output if "bug" in spec else "vialign/trainer.py" not in output
    stopped = [line for line in output.splitlines() if "stopped: process" in line]
    assert len(stopped) <= 1 and all(line.startswith("vialign: error: process") for line in stopped), stopped
    assert not (tmp_path / "run" / "final").exists()


def test_first_failure_is_recorded_once(monkeypatch):
    store = torch.distributed.HashStore()
    monkeypatch.setattr(distributed, "_store", lambda: store)
    assert distributed.first_failure() is None
    assert distributed.record_failure(1, "vialign: error: bad") is None
    assert distributed.record_failure(0, "vialign: error: bad") == (1, "vialign: error: bad")
    assert distributed.first_failure() == (1, "vialign: error: bad")


def test_a_collective_failure_is_told_from_the_process_own_error():
    with pytest.raises(Exception) as collective:
        torch.distributed.all_reduce(torch.zeros(1))  # no process group: raised inside torch.distributed
    assert distributed.raised_by_collective(collective.value)
    with pytest.raises(ZeroDivisionError) as own:
        torch.ones(1).item() / 0
    assert not distributed.raised_by_collective(own.value)
    assert distributed.process_group_rank() is None  # one process: the CLI's handling as before
