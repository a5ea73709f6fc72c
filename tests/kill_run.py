"""Run ``vialign`` and SIGKILL it at a chosen point: the process dies as under ``kill -9`` or the OOM killer,
with no exception handler, ``finally`` or atexit hook running.

    python tests/kill_run.py rollout N  -- train CONFIG key=value ...   # at the N-th denoiser call of a rollout
    python tests/kill_run.py checkpoint N -- train CONFIG ...           # half-way through the N-th checkpoint's tensors
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during_rollout(n: int) -> None:
    from pipelines.adapter import GeneratorAdapter
    from vialign.algorithms.base import TrainingContext

    calls, inside = [0], [False]
    rollout, predict = TrainingContext.rollout, GeneratorAdapter.predict

    def counted_rollout(self, *args, **kwargs):
        inside[0] = True
        try:
            return rollout(self, *args, **kwargs)
        finally:
            inside[0] = False

    def counted_predict(self, *args, **kwargs):
        if inside[0]:
            calls[0] += 1
            if calls[0] == n:
                die()
        return predict(self, *args, **kwargs)

    TrainingContext.rollout = counted_rollout
    GeneratorAdapter.predict = counted_predict


def kill_during_checkpoint_write(n: int) -> None:
    import vialign.checkpoint as checkpoint

    save_file, calls = checkpoint.save_file, [0]

    def half_written(tensors, path):
        calls[0] += 1
        save_file(tensors, path)
        if calls[0] == n:
            with open(path, "r+b") as handle:  # the bytes a write had reached when the process died
                handle.truncate(os.path.getsize(path) // 2)
            die()

    checkpoint.save_file = half_written


if __name__ == "__main__":
    point, count, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: kill_run.py rollout|checkpoint N -- vialign arguments"
    {"rollout": kill_during_rollout, "checkpoint": kill_during_checkpoint_write}[point](int(count))
    from vialign.cli import main

    sys.exit(main(argv))
