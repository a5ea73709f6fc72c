"""Helper of tests/test_rank_failure.py, run by ``accelerate launch``: ``vialign train ARGS`` (the CLI
itself) with one more reward, ``fail-on-rank``: the brightness of each image, except at the calls that
``VIALIGN_TEST_FAIL`` names, a comma-separated list of ``RANK:CALL:MODE`` (on process RANK, its
CALL-th call of the reward):

    input  raises RewardInputError (an input error: one ``vialign: error:`` line)
    shape  returns one score too few (the reward's own check raises an input error)
    nan    returns NaN for every image (gradient methods then stop with an input error)
    bug    raises ZeroDivisionError (a bug: its traceback)
    hang   sleeps for an hour (a process busy outside any collective)

and appends the time of each to the file ``VIALIGN_TEST_FAIL_TIMES`` names, if set.

    VIALIGN_TEST_FAIL=1:2:input python -m accelerate.commands.launch ... tests/fail_one_rank.py train CONFIG
"""

from __future__ import annotations

import os
import sys
import time

import torch

import rewards
from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.errors import RewardInputError
from vialign.cli import main

MESSAGE = "fail-on-rank: the injected failure"


class FailOnRank(Reward):
    info = RewardInfo(
        name="fail-on-rank",
        description="test: brightness, failing on one process",
        differentiable=True,
        modality="image",
        scale="",
        typical_range=(0.0, 1.0),
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        rank = os.environ.get("RANK", "0")
        self.modes = {}  # call -> mode, on this process
        for spec in os.environ.get("VIALIGN_TEST_FAIL", "").split(","):
            if spec:
                on_rank, call, mode = spec.split(":")
                if on_rank == rank:
                    self.modes[int(call)] = mode

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        self.calls += 1
        score = pixels.mean((1, 2, 3))
        mode = self.modes.get(self.calls)
        where = f"process {os.environ.get('RANK', '0')}, call {self.calls}"
        if mode and os.environ.get("VIALIGN_TEST_FAIL_TIMES"):  # when each failure began
            with open(os.environ["VIALIGN_TEST_FAIL_TIMES"], "a") as times:
                times.write(f"{time.time()}\n")
        if mode == "input":
            raise RewardInputError(f"{MESSAGE} ({where})")
        if mode == "shape":
            return RewardOutput(score[1:])
        if mode == "nan":
            return RewardOutput(score * float("nan"))
        if mode == "bug":
            raise ZeroDivisionError(f"{MESSAGE} ({where})")
        if mode == "hang":
            time.sleep(3600)
        return RewardOutput(score)


if __name__ == "__main__":
    rewards.register("fail-on-rank", FailOnRank.info, FailOnRank)
    sys.exit(main(sys.argv[1:]))
