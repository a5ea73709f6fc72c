"""The training losses of every algorithm, as pure functions of tensors (docs/algorithms.md).

Nothing here calls a model: the algorithm files (``vialign/algorithms/*.py``) run the sampler, the
denoiser and the reward, and hand the tensors to these functions. Each one is tested against a
hand-built autograd reference (tests/test_losses.py).

=====================  ==========================================================  ====================
function               value                                                       used by
=====================  ==========================================================  ====================
clipped_surrogate      -min(rho A, clip(rho, 1-c, 1+c) A), rho = exp(logp - old)   GRPO (PPO eq. 7)
gaussian_kl            |mu - mu_ref|^2 / (2 s^2), summed (or averaged) over dims     GRPO
denoising_target       eps, v = alpha eps - sigma x0, eps - x0 (flow), or x0          ReFL regulariser
denoising_loss         mean |f(alpha x0 + sigma eps, t) - target|^2                 ReFL regulariser
reward_loss            scale * sum_i l(r_i) / count                                  DRaFT, AlignProp, ReFL
renoise                alpha x_N + sigma eps (DRaFT-LV's re-noised copies)           DRaFT-LV
output_kl              mean over dims of |f_theta - f_ref|^2, per sample              DRaFT+
adjoint_regression     |(mu_ft - mu_base)/s + s a_{k+1}|^2, summed over dims          Adjoint Matching
quantile_threshold     EMA of the q-quantile of per-sample losses                     Adjoint Matching
dpo_loss               -log sigmoid(-beta/2 ((e_w - e_l) - (e_w_ref - e_l_ref)))      Diffusion-/Flow-DPO
=====================  ==========================================================  ====================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipelines.prediction import per_sample


@dataclass
class SurrogateOutput:
    loss: torch.Tensor  # [B] -min(ratio A, clip(ratio) A)
    ratio: torch.Tensor  # [B], detached
    clipped: torch.Tensor  # [B] bool: the clipped branch was taken (its gradient is zero)


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> SurrogateOutput:
    """PPO's clipped surrogate per sample (Schulman et al. 2017, eq. 7), negated to a loss."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return SurrogateOutput(torch.maximum(unclipped, clipped), ratio.detach(), (clipped > unclipped).detach())


def gaussian_kl(
    mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float, *, per_dim: bool = False
) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) = |mean - ref_mean|^2 / (2 std^2), per sample [B];
    ``per_dim`` divides by the number of dimensions (matching mean-reduced log-probs)."""
    std = per_sample(std, mean)
    kl = ((mean.float() - ref_mean.float()) ** 2 / (2 * std**2)).flatten(1).sum(1)
    return kl / mean[0].numel() if per_dim else kl


def denoising_target(
    prediction_type: str,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """What a denoiser of ``prediction_type`` should output at ``alpha x0 + sigma noise``."""
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return per_sample(alpha, x0) * noise - per_sample(sigma, x0) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}: epsilon, v_prediction, sample or flow")


def denoising_loss(
    output: torch.Tensor,
    prediction_type: str,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """The ordinary diffusion / flow-matching loss: mean squared error of ``output`` (the denoiser at
    ``alpha x0 + sigma noise``) against its target."""
    target = denoising_target(prediction_type, x0.float(), noise.float(), alpha, sigma)
    return torch.nn.functional.mse_loss(output.float(), target)


def reward_loss(
    scores: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], scale: float, count: int
) -> torch.Tensor:
    """``scale * sum_i l(r_i) / count``: a batch's share of the mean reward loss over ``count`` samples
    (the global batch), ``l`` a transform of ``rewards.losses`` (-r, a hinge, |r - target|)."""
    return scale * transform(scores).sum() / count


def renoise(x_final: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """DRaFT-LV: the last step's input ``alpha x_N + sigma eps`` re-made from the sample x_N."""
    return per_sample(alpha, x_final) * x_final + per_sample(sigma, x_final) * noise


def output_kl(output: torch.Tensor, reference_output: torch.Tensor) -> torch.Tensor:
    """DRaFT+'s per-sample regulariser: the mean over dimensions of |f_theta - f_ref|^2, [B]."""
    return (output.float() - reference_output.float()).square().flatten(1).mean(1)


def adjoint_regression(
    mean: torch.Tensor, base_mean: torch.Tensor, std: torch.Tensor | float, adjoint_next: torch.Tensor
) -> torch.Tensor:
    """Adjoint Matching's loss at one step, per sample [B] (Domingo-Enrich et al. 2024, eq. 39, in the
    discrete step): ``|(mu_ft(x_k) - mu_base(x_k)) / s_k + s_k a_{k+1}|^2`` summed over dimensions."""
    std = per_sample(std, mean)
    residual = (mean - base_mean) / std + std * adjoint_next
    return residual.square().flatten(1).sum(1)


def quantile_threshold(losses: torch.Tensor, quantile: float, previous: float | None, decay: float) -> float:
    """The clipping threshold of per-sample losses: an EMA (``decay``) of their ``quantile``; the first
    value (``previous`` None) or ``decay == 0`` takes the quantile itself."""
    value = float(torch.quantile(losses.detach().float(), quantile))
    if previous is None or decay == 0:
        return value
    return decay * previous + (1 - decay) * value


@dataclass
class DPOOutput:
    loss: torch.Tensor  # [B] -log sigmoid(-beta / 2 * (model_diff - ref_diff))
    model_diff: torch.Tensor  # [B] mse_w - mse_l under the policy, detached
    ref_diff: torch.Tensor  # [B] the same under the reference, detached
    implicit_accuracy: torch.Tensor  # [B] 1 where model_diff < ref_diff, 1/2 on a tie, else 0


def dpo_loss(
    mse_chosen: torch.Tensor,
    mse_rejected: torch.Tensor,
    ref_mse_chosen: torch.Tensor,
    ref_mse_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """Diffusion-DPO per pair (Wallace et al. 2023, eq. 14, as their train.py computes it: per-sample mean
    squared errors, no factor T): ``-log sigmoid(-beta / 2 * ((e_w - e_l) - (e_w_ref - e_l_ref)))``.
    The chosen and rejected errors must come from the same noise and timestep. With the policy equal to
    the reference the argument is 0 and the loss log 2."""
    model_diff = mse_chosen.float() - mse_rejected.float()
    ref_diff = (ref_mse_chosen.float() - ref_mse_rejected.float()).detach()
    inside = model_diff - ref_diff
    loss = -torch.nn.functional.logsigmoid(-0.5 * beta * inside)
    accuracy = (inside < 0).float() + 0.5 * (inside == 0).float()
    return DPOOutput(loss, model_diff.detach(), ref_diff, accuracy.detach())
