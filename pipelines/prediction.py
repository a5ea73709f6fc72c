"""Convert a denoiser's output into x0_hat, eps_hat and the flow velocity.

Convention (see ``pipelines.schedules``): ``x = alpha * x0 + sigma * eps``.

* ``epsilon``:       output = eps
* ``v_prediction``:  output = alpha * eps - sigma * x0          (Salimans & Ho 2022, variance preserving)
* ``sample``:        output = x0
* ``flow``:          output = eps - x0, with alpha = 1 - sigma    (rectified flow; SD3, FLUX)

All functions work in float32 and broadcast ``alpha``/``sigma`` (floats, 0-d or per-sample [B]
tensors) over the trailing latent dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as float32 broadcastable against ``like`` ([B, ...]): scalars stay 0-d, [B] gets 1s."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 1:
        value = value.reshape(-1, *([1] * (like.ndim - 1)))
    return value


@dataclass
class Prediction:
    """x0_hat and eps_hat of one denoiser call (float32, the latent's shape)."""

    x0: torch.Tensor
    eps: torch.Tensor

    @property
    def velocity(self) -> torch.Tensor:
        """Flow velocity ``eps - x0`` (what SD3/FLUX predict)."""
        return self.eps - self.x0


def convert_prediction(
    output: torch.Tensor,
    x: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma: float | torch.Tensor,
    prediction_type: str,
) -> Prediction:
    """x0_hat and eps_hat from a model ``output`` at state ``x`` with coefficients ``(alpha, sigma)``."""
    output, x = output.float(), x.float()
    a, s = per_sample(alpha, x), per_sample(sigma, x)
    if prediction_type == "epsilon":
        return Prediction(x0=(x - s * output) / a, eps=output)
    if prediction_type == "v_prediction":
        return Prediction(x0=a * x - s * output, eps=a * output + s * x)
    if prediction_type == "sample":
        return Prediction(x0=output, eps=(x - a * output) / s)
    if prediction_type == "flow":
        return Prediction(x0=x - s * output, eps=x + a * output)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def prediction_output(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma: float | torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The model output that :func:`convert_prediction` maps back to ``(x0, eps)`` (its inverse)."""
    a, s = per_sample(alpha, x0), per_sample(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
