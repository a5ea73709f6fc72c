"""Step functions: exact Gaussian log-probs, hand-computed values and invariants (tiers a and b)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from vialign.sampling import (
    cps_step,
    dance_sde_step,
    ddim_step,
    flow_ode_step,
    flow_sde_step,
    gaussian_log_prob,
)

SDE_STEPS = {
    "flow-sde": lambda x, v, s, sn, **kw: flow_sde_step(x, v, s, sn, noise_level=0.7, **kw),
    "dance-sde": lambda x, v, s, sn, **kw: dance_sde_step(x, v, s, sn, noise_level=0.3, **kw),
    "cps": lambda x, v, s, sn, **kw: cps_step(x, v, s, sn, noise_level=0.7, **kw),
}


def _inputs(seed: int = 0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_gaussian_log_prob_matches_torch_distributions():
    x, mean, _ = _inputs()
    std = torch.tensor([0.3, 0.7, 1.9])
    expected = Normal(mean, std.view(3, 1, 1, 1)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected, rtol=1e-5, atol=0)
    expected_scalar = Normal(mean, 0.42).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.42), expected_scalar, rtol=1e-5, atol=0)


def test_gaussian_log_prob_by_hand():
    """D = 2, x - mu = (1, -1), s = 0.5: -(1 + 1) / (2 * 0.25) - 2 log 0.5 - log(2 pi) = -4 + 2 log 2 - log 2pi."""
    value = gaussian_log_prob(torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), 0.5)
    assert value.item() == pytest.approx(-4 + 2 * math.log(2) - math.log(2 * math.pi), rel=1e-6)


@pytest.mark.parametrize("kind", list(SDE_STEPS))
@pytest.mark.parametrize("sigmas", [(1.0, 0.8), (0.6, 0.45), (0.2, 0.0)])
def test_flow_sde_log_prob_is_exact_gaussian(kind, sigmas):
    x, v, noise = _inputs(1)
    out = SDE_STEPS[kind](x, v, *sigmas, noise=noise)
    if kind == "cps" and sigmas[1] == 0:
        assert out.log_prob is None and float(out.std) == 0  # s' = 0: CPS's last step is deterministic
        return
    expected = Normal(out.mean, out.std).log_prob(out.x_next).flatten(1).sum(1)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=0)
    # scoring the stored sample gives the same log-prob as drawing it
    rescored = SDE_STEPS[kind](x, v, *sigmas, prev=out.x_next)
    torch.testing.assert_close(rescored.log_prob, out.log_prob, rtol=1e-6, atol=0)
    assert torch.equal(rescored.mean, out.mean)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_log_prob_is_exact_gaussian(eta):
    x0, eps, noise = _inputs(2)
    ab, ab_next = 0.3, 0.55
    out = ddim_step(
        x0, eps, ab**0.5, (1 - ab) ** 0.5, ab_next**0.5, (1 - ab_next) ** 0.5, eta=eta, noise=noise
    )
    expected = Normal(out.mean, out.std).log_prob(out.x_next).flatten(1).sum(1)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=0)


def test_ddim_eta_one_is_ddpm_posterior():
    """eta = 1: std^2 = (1 - ab') / (1 - ab) * (1 - ab / ab') (DDPM's beta tilde), mean by hand."""
    ab, ab_next = 0.3, 0.55
    x0, eps = torch.full((1, 2), 0.5), torch.full((1, 2), -1.0)
    out = ddim_step(
        x0,
        eps,
        ab**0.5,
        (1 - ab) ** 0.5,
        ab_next**0.5,
        (1 - ab_next) ** 0.5,
        eta=1.0,
        noise=torch.zeros(1, 2),
    )
    variance = (1 - ab_next) / (1 - ab) * (1 - ab / ab_next)
    assert float(out.std) ** 2 == pytest.approx(variance, rel=1e-6)
    mean = ab_next**0.5 * 0.5 + math.sqrt(1 - ab_next - variance) * -1.0
    torch.testing.assert_close(out.mean, torch.full((1, 2), mean), rtol=1e-5, atol=1e-7)  # fp32 inputs


def test_flow_sde_mean_and_std_by_hand():
    """s = 0.5, s' = 0.25, a = 0.7, x = 1, v = 2: g^2 = 0.49 * 0.5 / 0.5 = 0.49; eps_hat = 1 + 0.5 * 2 = 2;
    mean = 1 + (2 + 0.49 / 1.0 * 2) * (-0.25) = 0.255; std = 0.7 * sqrt(0.25) = 0.35."""
    out = flow_sde_step(
        torch.ones(1, 1), torch.full((1, 1), 2.0), 0.5, 0.25, noise_level=0.7, noise=torch.zeros(1, 1)
    )
    assert out.mean.item() == pytest.approx(0.255, rel=1e-6)
    assert float(out.std) == pytest.approx(0.35, rel=1e-6)


def test_flow_sde_at_sigma_one_uses_next_sigma():
    """At s = 1, g = a sqrt(1 / (1 - s')): s' = 0.9, a = 0.5 -> g = 0.5 sqrt(10); std = g sqrt(0.1) = 0.5."""
    out = flow_sde_step(
        torch.zeros(1, 1), torch.zeros(1, 1), 1.0, 0.9, noise_level=0.5, noise=torch.zeros(1, 1)
    )
    assert float(out.std) == pytest.approx(0.5, rel=1e-6)
    assert torch.isfinite(out.mean).all()


def test_cps_mean_and_std_by_hand():
    """s = 0.5, s' = 0.25, a = 0.5: std = 0.25 sin(pi / 4); x = 1, v = 2 -> x0 = 0, eps = 2;
    mean = 0.75 * 0 + sqrt(0.0625 - std^2) * 2."""
    out = cps_step(
        torch.ones(1, 1), torch.full((1, 1), 2.0), 0.5, 0.25, noise_level=0.5, noise=torch.zeros(1, 1)
    )
    std = 0.25 * math.sin(math.pi / 4)
    assert float(out.std) == pytest.approx(std, rel=1e-6)
    assert out.mean.item() == pytest.approx(math.sqrt(0.0625 - std**2) * 2, rel=1e-6)


def test_zero_noise_sdes_reduce_to_the_ode():
    x, v, noise = _inputs(3)
    ode = flow_ode_step(x, v, 0.7, 0.55).x_next
    for step in (flow_sde_step, dance_sde_step, cps_step):
        out = step(x, v, 0.7, 0.55, noise_level=0.0, noise=noise)
        torch.testing.assert_close(out.mean, ode, rtol=1e-5, atol=1e-6)
    x0, eps, _ = _inputs(4)
    ab, ab_next = 0.3, 0.55
    ddim = ddim_step(x0, eps, ab**0.5, (1 - ab) ** 0.5, ab_next**0.5, (1 - ab_next) ** 0.5, eta=0.0)
    assert ddim.log_prob is None
    torch.testing.assert_close(
        ddim.x_next, ab_next**0.5 * x0 + (1 - ab_next) ** 0.5 * eps, rtol=1e-6, atol=1e-6
    )


def test_ode_zero_interval_returns_input():
    x, v, _ = _inputs(5)
    assert torch.equal(flow_ode_step(x, v, 0.4, 0.4).x_next, x)


def test_log_prob_peaks_at_the_mean():
    x, v, noise = _inputs(6)
    out = flow_sde_step(x, v, 0.6, 0.5, noise=noise)
    at_mean = flow_sde_step(x, v, 0.6, 0.5, prev=out.mean)
    assert (at_mean.log_prob > out.log_prob).all()


def test_per_sample_sigmas_match_scalar_steps():
    x, v, noise = _inputs(7)
    sigmas, nexts = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    batched = flow_sde_step(x, v, sigmas, nexts, noise=noise)
    for i in range(3):
        single = flow_sde_step(
            x[i : i + 1], v[i : i + 1], float(sigmas[i]), float(nexts[i]), noise=noise[i : i + 1]
        )
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob, rtol=1e-6, atol=0)


def test_per_dim_log_prob_is_the_mean_over_dims():
    x, v, noise = _inputs(8)
    out = dance_sde_step(x, v, 0.6, 0.5, noise=noise)
    torch.testing.assert_close(out.log_prob_per_dim, out.log_prob / x[0].numel())
