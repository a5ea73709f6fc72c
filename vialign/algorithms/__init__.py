"""Training algorithms, one file each, on the shared trainer (``vialign.trainer``).

grpo.py  GRPO for diffusion and flow models (DanceGRPO, Flow-GRPO, DDPO)
"""

from __future__ import annotations

from typing import Any


def build_algorithm(config: Any, trainer: Any) -> Any:
    """The algorithm object of ``config.algorithm``: ``step(step) -> metrics``, ``state_dict()``,
    ``load_state_dict(state)``."""
    if config.algorithm == "grpo":
        from vialign.algorithms.grpo import GRPO

        return GRPO(config, trainer)
    raise ValueError(f"unknown algorithm {config.algorithm!r}")
