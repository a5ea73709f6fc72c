"""How the multi-process tests start processes: ``accelerate launch`` on the CPU (gloo), as a user would
on GPUs, each test on a free port so tests never wait for one another's rendezvous."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_launch(processes: int = 2) -> list[str]:
    """The command line up to the script (or ``-m module``) it launches."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
