"""Training algorithms, one file per family, on the shared trainer (``vialign.trainer``).

base.py              the protocol: Algorithm, TrainingContext, register / get_algorithm
grpo.py              GRPO for diffusion and flow models (DanceGRPO, Flow-GRPO, DDPO)
draft.py             DRaFT-K / DRaFT-LV / DRaFT+ and AlignProp: reward gradients through the sampler
refl.py              ReFL: one gradient step, the one-shot x0 prediction scored
adjoint_matching.py  Adjoint Matching: memoryless SDE, lean adjoint, regression loss
dpo.py               Diffusion-DPO / Flow-DPO: offline from preference pairs, online from rollouts
reward_weighted.py   RAFT and reward-weighted regression (Flow-RWR): the denoising loss on own samples

Importing this package registers the built-in algorithms. A new one is a file with an ``@register``-ed
:class:`Algorithm` subclass, imported before the config is loaded (docs/architecture.md).
"""

from vialign.algorithms import adjoint_matching, dpo, draft, grpo, refl, reward_weighted
from vialign.algorithms.base import (
    Algorithm,
    TrainingContext,
    algorithm_names,
    get_algorithm,
    register,
    sample_seed,
)

__all__ = [
    "Algorithm",
    "TrainingContext",
    "adjoint_matching",
    "algorithm_names",
    "dpo",
    "draft",
    "get_algorithm",
    "grpo",
    "refl",
    "register",
    "reward_weighted",
    "sample_seed",
]
