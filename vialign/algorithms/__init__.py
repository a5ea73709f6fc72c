"""Training algorithms, one file each, on the shared trainer (``vialign.trainer``).

grpo.py              GRPO for diffusion and flow models (DanceGRPO, Flow-GRPO, DDPO)
reward_gradient.py   DRaFT-K / DRaFT-LV / DRaFT+, AlignProp, ReFL: reward gradients through the sampler
adjoint_matching.py  Adjoint Matching: memoryless SDE, lean adjoint, regression loss
"""

from __future__ import annotations

from typing import Any


def build_algorithm(config: Any, trainer: Any) -> Any:
    """The algorithm object of ``config.algorithm``: ``step(step) -> metrics``, ``state_dict()``,
    ``load_state_dict(state)``."""
    if config.algorithm == "grpo":
        from vialign.algorithms.grpo import GRPO

        return GRPO(config, trainer)
    if config.algorithm in ("draft", "alignprop", "refl"):
        from vialign.algorithms.reward_gradient import RewardGradient

        return RewardGradient(config, trainer)
    if config.algorithm == "adjoint_matching":
        from vialign.algorithms.adjoint_matching import AdjointMatching

        return AdjointMatching(config, trainer)
    raise ValueError(f"unknown algorithm {config.algorithm!r}")
