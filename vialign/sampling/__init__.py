"""Sampling dynamics: stateless step functions with exact Gaussian log-probs, and the rollout loop.

flow.py      flow ODE (Euler), Flow-SDE, Dance-SDE and CPS steps
ddim.py      DDIM (eta = 0) and DDIM-eta steps for diffusion models
gaussian.py  StepOutput and the exact Gaussian log-density
sampler.py   Sampler (ODE or SDE on a window) and the per-step dispatch
rollout.py   rollout(), Trajectory, replay_step(), trajectory_log_probs()
"""

from vialign.sampling.ddim import ddim_step
from vialign.sampling.flow import cps_step, dance_sde_step, flow_ode_step, flow_sde_step
from vialign.sampling.gaussian import StepOutput, gaussian_log_prob
from vialign.sampling.rollout import (
    Checkpoint,
    StepHook,
    Trajectory,
    checkpointed,
    draw_noise,
    evaluate_step,
    replay_step,
    rollout,
    rollout_prompts,
    trajectory_log_probs,
)
from vialign.sampling.sampler import (
    SDE_KINDS,
    Sampler,
    default_sde,
    sampler_step,
    sde_sampler,
    sde_window_problem,
)

__all__ = [
    "SDE_KINDS",
    "Sampler",
    "Checkpoint",
    "StepHook",
    "StepOutput",
    "Trajectory",
    "checkpointed",
    "cps_step",
    "dance_sde_step",
    "ddim_step",
    "default_sde",
    "draw_noise",
    "evaluate_step",
    "flow_ode_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "replay_step",
    "rollout",
    "rollout_prompts",
    "sampler_step",
    "sde_sampler",
    "sde_window_problem",
    "trajectory_log_probs",
]
