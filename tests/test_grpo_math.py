"""GRPO's pieces against hand-computed values and torch.distributions (docs/algorithms.md, "GRPO")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vialign.advantages import STD_EPS, PerPromptStatTracker, group_advantages, per_reward_advantages
from vialign.algorithms.grpo import trained_steps
from vialign.losses import clipped_surrogate, gaussian_kl


def test_group_advantages_match_numpy():
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    result = group_advantages(rewards, groups, clip=None)
    expected = []
    for g in (rewards[:3].numpy(), rewards[3:].numpy()):
        expected += list((g - g.mean()) / (np.std(g) + STD_EPS))
    np.testing.assert_allclose(result.values.numpy(), expected, rtol=1e-6)
    assert result.keep.all() and result.num_groups == 2


def test_global_std_and_clipping():
    rewards = torch.tensor([0.0, 10.0, 1.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1])
    result = group_advantages(rewards, groups, std="global", clip=None)
    centred = np.array([-5.0, 5.0, -0.5, 0.5])
    np.testing.assert_allclose(
        result.values.numpy(), centred / (np.std(rewards.numpy()) + STD_EPS), rtol=1e-6
    )
    clipped = group_advantages(
        torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0]), torch.zeros(8, dtype=torch.long), clip=2.0
    )
    assert clipped.values.max() == 2.0  # the z-score of the outlier is sqrt(7) = 2.65 before clipping


def test_zero_std_and_nonfinite_groups_are_dropped():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, float("nan"), 3.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    result = group_advantages(rewards, groups)
    assert result.keep.tolist() == [False, False, True, True, False, False]
    assert result.zero_std_groups == 1 and result.nonfinite_groups == 1
    assert result.values[~result.keep].abs().sum() == 0
    np.testing.assert_allclose(result.values[2:4].numpy(), [-1 / (1 + STD_EPS), 1 / (1 + STD_EPS)], rtol=1e-6)
    assert torch.isfinite(result.values).all()


def test_per_reward_advantages_are_weighted_sums():
    groups = torch.tensor([0, 0, 0, 0])
    a, b = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([100.0, 0.0, 0.0, 100.0])
    result = per_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, groups, clip=None)
    za = (a - a.mean()) / (a.std(unbiased=False) + STD_EPS)
    zb = (b - b.mean()) / (b.std(unbiased=False) + STD_EPS)
    torch.testing.assert_close(result.values, za + 0.5 * zb)


def test_per_prompt_tracker_uses_the_buffer_once_full():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.advantages(["p", "p", "q", "q"], torch.tensor([1.0, 3.0, 10.0, 20.0]), clip=None)
    batch = torch.tensor([1.0, 3.0, 10.0, 20.0])
    expected = (batch - batch.mean()) / (batch.std(unbiased=False) + STD_EPS)  # too few per prompt yet
    torch.testing.assert_close(first.values, expected)
    second = tracker.advantages(["p", "p"], torch.tensor([5.0, 7.0]), clip=None)
    buffer = torch.tensor([1.0, 3.0, 5.0, 7.0])
    torch.testing.assert_close(
        second.values, (torch.tensor([5.0, 7.0]) - 4.0) / (buffer.std(unbiased=False) + STD_EPS)
    )
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()


def test_clipped_surrogate_by_hand():
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.05, 0.95]))
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, -1.0, -2.0, 2.0])
    out = clipped_surrogate(log_prob, old, advantages, clip_range=0.2)
    # A > 0 and ratio 1.5: min(1.5, 1.2) -> 1.2; A < 0 and ratio 0.5: min(-0.5, -0.8) -> -0.8;
    # inside the range the ratio is used as it is.
    torch.testing.assert_close(out.loss, torch.tensor([-1.2, 0.8, 2.1, -1.9]))
    assert out.clipped.tolist() == [True, True, False, False]
    log_prob = log_prob.clone().requires_grad_(True)
    clipped_surrogate(log_prob, old, advantages, 0.2).loss.sum().backward()
    assert log_prob.grad[:2].abs().sum() == 0  # clipped branches carry no gradient
    torch.testing.assert_close(log_prob.grad[2:], torch.tensor([2.0 * 1.05, -2.0 * 0.95]))


@pytest.mark.parametrize("per_sample_std", [False, True])
def test_gaussian_kl_matches_torch_distributions(per_sample_std):
    generator = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    std = torch.tensor([0.3, 0.7, 1.1]).view(3, 1, 1, 1) if per_sample_std else torch.tensor(0.4)
    expected = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, std.expand_as(mean)),
            torch.distributions.Normal(ref, std.expand_as(ref)),
        )
        .flatten(1)
        .sum(1)
    )
    torch.testing.assert_close(gaussian_kl(mean, ref, std), expected)
    torch.testing.assert_close(gaussian_kl(mean, ref, std, per_dim=True), expected / 100)
    assert gaussian_kl(mean, mean, std).abs().max() == 0


def test_trained_steps():
    stochastic = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert trained_steps(stochastic) == stochastic
    assert trained_steps(stochastic, mode="all_but_last") == stochastic[:-1]
    assert trained_steps(stochastic, mode="first", fraction=0.3) == [0, 1, 2]
    chosen = trained_steps(
        stochastic, mode="random", fraction=0.6, generator=torch.Generator().manual_seed(1)
    )
    again = trained_steps(stochastic, mode="random", fraction=0.6, generator=torch.Generator().manual_seed(1))
    assert chosen == again and len(chosen) == 6 and set(chosen) <= set(stochastic)
    with pytest.raises(ValueError, match="sampler.kind=sde"):
        trained_steps([])
    assert math.isclose(len(trained_steps(list(range(3)), mode="first", fraction=0.1)), 1)
