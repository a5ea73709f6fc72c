"""Inference-time alignment: steer sampling with a reward, no training (docs/steering.md).

best_of_n.py  best-of-N: N candidates, keep the highest reward
smc.py        SMC / Feynman-Kac steering: particles resampled by reward potentials along the chain
reno.py       ReNO: optimise the initial noise through the checkpointed chain
guidance.py   reward-gradient (universal) guidance of each step's prediction
common.py     SamplingSetup, SteeringResult, candidate seeds, model-call counting

Every method takes ``(adapter, reward, prompts, seeds, setup)`` and returns one kept sample per prompt
(:class:`SteeringResult`); ``vialign sample --steer METHOD`` runs them from the command line.
"""

from vialign.steering.best_of_n import best_of_n
from vialign.steering.common import (
    SamplingSetup,
    SteeringResult,
    candidate_seed,
    count_model_calls,
)
from vialign.steering.guidance import GuidanceSettings, RewardGuidance, guided_output, reward_guidance
from vialign.steering.reno import RenoSettings, chi_regularizer, reno
from vialign.steering.smc import (
    POTENTIALS,
    FKSteering,
    SMCSettings,
    effective_sample_size,
    fk_weights,
    resample_indices,
    smc,
)

STEER_METHODS = ("best-of-n", "smc", "reno", "guidance")
# methods that need the reward's gradient w.r.t. the pixels
DIFFERENTIABLE_METHODS = ("reno", "guidance")

__all__ = [
    "DIFFERENTIABLE_METHODS",
    "POTENTIALS",
    "STEER_METHODS",
    "FKSteering",
    "GuidanceSettings",
    "RenoSettings",
    "RewardGuidance",
    "SMCSettings",
    "SamplingSetup",
    "SteeringResult",
    "best_of_n",
    "candidate_seed",
    "chi_regularizer",
    "count_model_calls",
    "effective_sample_size",
    "fk_weights",
    "guided_output",
    "reno",
    "resample_indices",
    "reward_guidance",
    "smc",
]
