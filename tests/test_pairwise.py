"""Pref-GRPO's win rates, Parrot's Pareto selection, pairwise judges and advantage-health metrics, each
against a hand computation or a brute force."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import rewards
from rewards.base import Reward, RewardInfo, RewardOutput
from vialign.advantages import advantage_health, group_advantages, group_pairs, pareto_front, win_rates


def test_group_pairs_are_every_unordered_pair_within_a_group():
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert group_pairs(groups).tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]


def test_win_rates_equal_a_hand_count_with_ties_as_half():
    """Group 0 = samples 0..3 with scores 3, 1, 3, 2 (0 and 2 tie); group 1 = samples 4, 5 with 5, 7."""
    scores = torch.tensor([3.0, 1.0, 3.0, 2.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    pairs = group_pairs(groups)
    probability = rewards.bradley_terry(scores[pairs[:, 0]], scores[pairs[:, 1]], temperature=0.5)
    # sample 0 beats 1 and 3, ties 2: 2.5 wins of 3; sample 1: 0; sample 2: 2.5; sample 3 beats 1: 1
    expected = torch.tensor([2.5 / 3, 0.0, 2.5 / 3, 1 / 3, 0.0, 1.0])
    assert torch.equal(win_rates(probability, pairs, groups), expected)
    soft = win_rates(probability, pairs, groups, hard=False)
    sig = torch.sigmoid
    by_hand_0 = (sig(torch.tensor(4.0)) + 0.5 + sig(torch.tensor(2.0))) / 3  # vs 1, 2, 3 at T = 0.5
    torch.testing.assert_close(soft[0], by_hand_0, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft.view(-1)[:4].sum(), torch.tensor(2.0), rtol=0, atol=1e-6)  # G/2 per group


def test_a_nan_judgement_drops_its_group_and_a_group_of_one_is_half():
    groups = torch.tensor([0, 0, 1, 1, 2])
    pairs = group_pairs(groups)
    rates = win_rates(torch.tensor([float("nan"), 0.9]), pairs, groups)
    assert rates[:2].isnan().all() and rates[2:4].tolist() == [1.0, 0.0] and rates[4] == 0.5
    advantages = group_advantages(rates, groups)
    assert (
        advantages.nonfinite_groups == 1 and advantages.zero_std_groups == 1
    )  # the group of one has no spread
    assert advantages.keep.tolist() == [False, False, True, True, False]


def test_pareto_front_equals_a_brute_force_filter():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        n, k = 3 + trial % 9, 2 + trial % 3
        scores = torch.randint(
            0, 4, (n, k), generator=generator
        ).float()  # small integers: ties and equal rows
        brute = [
            not any(
                all(scores[j, r] >= scores[i, r] for r in range(k))
                and any(scores[j, r] > scores[i, r] for r in range(k))
                for j in range(n)
            )
            for i in range(n)
        ]
        assert pareto_front(scores).tolist() == brute
    assert pareto_front(torch.tensor([[1.0, 1.0], [1.0, 1.0]])).tolist() == [
        True,
        True,
    ]  # equal rows both stay
    with pytest.raises(ValueError, match="needs at least two rewards"):
        pareto_front(torch.rand(4, 1))


class Constant(Reward):
    info = RewardInfo("constant", "", True, "image", "", (0, 1), needs_prompt=False)

    def score(self, pixels, prompts):
        return RewardOutput(pixels.mean(dim=(1, 2, 3)))


def test_pointwise_as_pairwise_is_bradley_terry_and_refuses_the_wrong_kind():
    reward = Constant()
    judge = rewards.PointwiseAsPairwise(reward, temperature=0.1)
    a, b = torch.full((2, 3, 4, 4), 0.7), torch.full((2, 3, 4, 4), 0.2)
    b[1] = 0.9
    expected = torch.sigmoid(torch.tensor([0.5, -0.2]) / 0.1)
    torch.testing.assert_close(judge(a, b), expected, rtol=0, atol=1e-6)
    with pytest.raises(rewards.RewardInputError, match="one shape"):
        judge(a, b[:1])
    with pytest.raises(
        rewards.RewardInputError, match="is pointwise: wrap it with rewards.PointwiseAsPairwise"
    ):
        rewards.require_pairwise(reward, "grpo.comparison=pairwise-winrate")
    with pytest.raises(rewards.RewardInputError, match="compares two images"):
        rewards.require_pointwise(judge, "grpo.comparison=pointwise")
    assert rewards.require_pairwise(judge, "x") is judge and rewards.require_pointwise(reward, "x") is reward


def test_advantage_health_flags_a_near_constant_reward_only():
    groups = torch.arange(32) // 4
    healthy = torch.randn(32, generator=torch.Generator().manual_seed(0))
    saturated = 0.93 + 2e-3 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    good, bad = advantage_health(healthy, groups), advantage_health(saturated, groups)
    assert not good.collapsed and good.near_constant_fraction == 0.0 and good.group_std_mean > 0.3
    assert bad.collapsed and bad.near_constant_fraction == 1.0 and bad.group_std_mean < 3e-3
    # what the metric guards against: differences of 0.2% of the reward still make advantages of order 1
    assert group_advantages(saturated, groups).values.abs().max() > 0.8
    mixed = torch.cat([healthy[:16], saturated[16:] + healthy[:16].mean()])
    assert advantage_health(mixed, groups).near_constant_fraction == 0.5


# ------------------------------------------------------------------------------------- in GRPO
class Saturated(Reward):
    """0.93 plus a spread of ~1e-4: a reward that has stopped telling its samples apart."""

    info = RewardInfo("saturated", "test", True, "image", "", (0, 1), needs_prompt=False)

    def score(self, pixels, prompts):
        return RewardOutput(0.93 + 0.1 * (pixels.mean(dim=(1, 2, 3)) - 0.5))


class Amplified(Reward):
    """The same ordering as :class:`Saturated`, at a scale where samples differ: 100 (brightness - 0.5)."""

    info = RewardInfo("amplified", "test", True, "image", "", (-50, 50), needs_prompt=False)

    def score(self, pixels, prompts):
        return RewardOutput(100 * (pixels.mean(dim=(1, 2, 3)) - 0.5))


@pytest.fixture
def test_rewards(monkeypatch):
    import rewards.registry as registry

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    for reward in (Saturated(), Amplified()):
        rewards.register(reward.info.name, reward.info, lambda reward=reward: reward)


def grpo_step(tmp_path, tiny_dir, prompt_file, reward: str, *extra: str):
    from test_recipes import tiny_run

    from vialign.trainer import Trainer

    config = tiny_run(
        tmp_path / reward,
        tiny_dir("sd3"),
        prompt_file,
        "algorithm=grpo",
        f"rewards={{{reward}: {{}}}}",
        "sampler.num_steps=4",
        "train.max_steps=1",
        "grpo.group_size=3",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=3",
        *extra,
    )
    trainer = Trainer(config, progress=False)
    return trainer, trainer.algorithm.step(1)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red square\na blue circle\na green triangle\na white star\n")
    return str(path)


def test_grpo_pairwise_winrate_trains_on_normalised_win_rates(
    tmp_path, tiny_dir, prompt_file, quiet_libraries
):
    trainer, metrics = grpo_step(
        tmp_path, tiny_dir, prompt_file, "brightness", "grpo.comparison=pairwise-winrate"
    )
    scores = trainer.algorithm.last_scores.tolist()
    expected = []
    for group in (scores[:3], scores[3:]):  # by hand: wins over the 2 others, ties 0.5, then z-scores
        rates = [
            sum(1.0 if a > b else 0.5 if a == b else 0.0 for b in group if b is not a) / 2 for a in group
        ]
        mean = sum(rates) / 3
        std = (sum((r - mean) ** 2 for r in rates) / 3) ** 0.5
        expected += [(r - mean) / (std + 1e-4) for r in rates]
    torch.testing.assert_close(trainer.algorithm.last_advantages, torch.tensor(expected), rtol=0, atol=1e-5)
    # ...but win rates are ranks 0, 0.5, 1 whatever the spread: advantages -1.22, 0, 1.22
    assert sorted(trainer.algorithm.last_advantages[:3].tolist())[0] < -1.2
    assert metrics["optimizer_updates"] == 1 and metrics["grad_norm"] > 0


def test_health_warns_on_a_saturated_reward_and_stays_quiet_on_a_healthy_one(
    tmp_path, tiny_dir, prompt_file, test_rewards, caplog, quiet_libraries
):
    """One ordering of the samples at two scales: spread 0.01% of the reward's size is flagged, 10% is not
    (the metric is relative; the tiny model's samples differ by 0.3% in brightness itself)."""
    with caplog.at_level(logging.WARNING, logger="vialign"):
        _, healthy = grpo_step(tmp_path, tiny_dir, prompt_file, "amplified")
    assert healthy["health/near_constant_fraction"] == 0.0 and "near-identical rewards" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="vialign"):
        trainer, saturated = grpo_step(tmp_path, tiny_dir, prompt_file, "saturated")
    assert saturated["health/near_constant_fraction"] == 1.0 and saturated["health/group_std_mean"] < 1e-3
    assert "step 1: 100% of groups have near-identical rewards" in caplog.text
    assert trainer.algorithm.last_advantages.abs().max() > 0.3  # the illusory advantages it warns about


def test_pairwise_winrate_refuses_what_it_cannot_combine_with():
    from vialign.config import TrainConfig, load_config
    from vialign.errors import ConfigError

    for other in ("grpo.reward_mode=per_reward", "grpo.reward_mode=pareto", "grpo.per_prompt_stats=true"):
        with pytest.raises(ConfigError, match="pairwise-winrate makes one win rate per sample"):
            load_config(TrainConfig, None, ["algorithm=grpo", "grpo.comparison=pairwise-winrate", other])


@pytest.mark.parametrize("combine", ["sum", "min"])
def test_grpo_pareto_trains_only_the_non_dominated_samples(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, combine
):
    """Parrot in GRPO: each reward's group advantages summed without the weights, zero for every sample
    another sample of the batch beats on both rewards (checked against a brute-force filter of the logged
    per-reward scores and z-scores computed by hand)."""

    trainer, metrics = grpo_step(
        tmp_path,
        tiny_dir,
        prompt_file,
        "brightness",
        "rewards={brightness: {weight: 1.0}, saturation: {weight: 30.0}}",
        "grpo.reward_mode=pareto",
        f"grpo.pareto_advantages={combine}",
    )
    algorithm = trainer.algorithm
    captured = {}
    original = algorithm.pareto_selected

    def spy(advantages, dims):
        captured.update(dims)
        return original(advantages, dims)

    algorithm.pareto_selected = spy
    algorithm.step(2)
    table = torch.stack([captured["brightness"], captured["saturation"]], 1).tolist()
    dominated = [
        any(all(o >= s for o, s in zip(other, row)) and other != row for other in table) for row in table
    ]

    def z_scores(scores):  # within each group of 3, population std (GRPO's), clipped at 5
        groups = scores.view(2, 3)
        z = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + 1e-4)
        return z.clamp(-5, 5).flatten()

    parts = z_scores(captured["brightness"]), z_scores(captured["saturation"])  # the weight 30 unused
    unweighted = parts[0] + parts[1] if combine == "sum" else torch.minimum(*parts)
    expected = torch.where(torch.tensor(dominated), torch.zeros(6), unweighted)
    torch.testing.assert_close(algorithm.last_advantages, expected, rtol=0, atol=1e-5)
    assert 0 < sum(dominated) < 6, table  # the selection removed some samples, not all


def test_pareto_advantages_without_pareto_is_an_error():
    from vialign.config import TrainConfig, load_config
    from vialign.errors import ConfigError

    with pytest.raises(ConfigError, match="pareto_advantages=min sets how reward_mode=pareto"):
        load_config(TrainConfig, None, ["algorithm=grpo", "grpo.pareto_advantages=min"])


def test_grpo_pareto_with_one_reward_is_an_error(tmp_path, tiny_dir, prompt_file, quiet_libraries):
    from vialign.errors import VialignInputError

    with pytest.raises(VialignInputError, match="reward_mode=pareto .* needs two or more rewards"):
        grpo_step(tmp_path, tiny_dir, prompt_file, "brightness", "grpo.reward_mode=pareto")


def test_shaping_transforms_equal_their_formulas():
    from rewards.shaping import RunningClip, ceiling, centered, par

    r = torch.tensor([0.5, 2.0, -1.0])
    refs = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-3.0, 5.0]])
    by_hand = [
        (1 / (1 + math.exp(-2 * 0.5)) + 1 / (1 + math.exp(-2 * -0.5))) / 2,  # k = 2
        0.5,
        (1 / (1 + math.exp(-2 * 2.0)) + 1 / (1 + math.exp(-2 * -6.0))) / 2,
    ]
    torch.testing.assert_close(par(r, refs, k=2.0), torch.tensor(by_hand), rtol=0, atol=1e-6)
    assert torch.equal(centered(r, refs), torch.tensor([0.0, 0.0, -2.0]))
    assert torch.equal(ceiling(r, 1.0), torch.tensor([0.5, 1.0, -1.0]))
    clip = RunningClip()
    first = clip(torch.tensor([0.0, 2.0]))  # mu 1, sigma 1
    assert torch.equal(first, torch.tensor([0.0, 2.0]))
    second = clip(torch.tensor([4.0, float("nan")]))  # seen 0, 2, 4: mu 2, sigma sqrt(8/3); NaN skipped
    sigma = math.sqrt(8 / 3)
    torch.testing.assert_close(second[:1], torch.tensor([2 + sigma]), rtol=0, atol=1e-6)
    assert second[1].isnan() and clip.state_dict()["count"] == 3
    restored = RunningClip()
    restored.load_state_dict(clip.state_dict())
    assert torch.equal(restored(torch.tensor([10.0])), clip(torch.tensor([10.0])))
    with pytest.raises(rewards.RewardInputError, match=r"references must be \[B, M\]"):
        par(r, refs[:2])


class MeanJudge(rewards.PairwiseReward):
    """P(a better) = sigmoid(200 (brightness(a) - brightness(b))); records the size of every call."""

    info = RewardInfo("mean-judge", "test", False, "image", "probability", (0, 1), needs_prompt=False)

    def __init__(self):
        super().__init__()
        self.calls = []

    def compare(self, pixels_a, pixels_b, prompts):
        self.calls.append(len(prompts))
        brightness = rewards.load_reward("brightness")
        return torch.sigmoid(200 * (brightness(pixels_a).score - brightness(pixels_b).score))


def test_grpo_with_a_pairwise_judge_trains_on_its_win_rates(
    tmp_path, tiny_dir, prompt_file, monkeypatch, quiet_libraries
):
    """grpo.judge: every unordered pair of each group judged once (3 pairs per group of 3, in calls of at
    most judge_batch_size=2 pairs, groups batched together), soft win rates = the judge's probabilities summed over the G - 1 others,
    then the group z-scores; by hand from the samples' brightness (the training reward, logged)."""
    judge = MeanJudge()
    monkeypatch.setattr(rewards, "load_pairwise", lambda name, **options: judge, raising=False)
    trainer, metrics = grpo_step(
        tmp_path,
        tiny_dir,
        prompt_file,
        "brightness",
        "grpo.comparison=pairwise-winrate",
        "grpo.judge=mean-judge",
        "grpo.judge_batch_size=2",
        "grpo.win_rate=soft",
    )
    assert judge.calls == [2, 2, 2]  # 2 groups x 3 pairs, in batches of 2
    means = trainer.algorithm.last_scores.tolist()
    expected = []
    for group in (means[:3], means[3:]):
        rates = [
            sum(1 / (1 + math.exp(-200 * (a - b))) for j, b in enumerate(group) if j != i) / 2
            for i, a in enumerate(group)
        ]
        mean = sum(rates) / 3
        std = (sum((r - mean) ** 2 for r in rates) / 3) ** 0.5
        expected += [(r - mean) / (std + 1e-4) for r in rates]
    torch.testing.assert_close(trainer.algorithm.last_advantages, torch.tensor(expected), rtol=0, atol=1e-4)
    assert metrics["optimizer_updates"] == 1


def test_a_judge_needs_pairwise_winrate_and_a_pairwise_reward(
    tmp_path, tiny_dir, prompt_file, monkeypatch, quiet_libraries
):
    from vialign.config import TrainConfig, load_config
    from vialign.errors import ConfigError

    with pytest.raises(ConfigError, match="set grpo.comparison=pairwise-winrate"):
        load_config(TrainConfig, None, ["algorithm=grpo", "grpo.judge=vlm-pairwise"])
    monkeypatch.setattr(rewards, "load_pairwise", lambda name, **options: Amplified(), raising=False)
    with pytest.raises(
        rewards.RewardInputError, match="grpo.judge needs a pairwise reward.*PointwiseAsPairwise"
    ):
        grpo_step(
            tmp_path, tiny_dir, prompt_file, "brightness", "grpo.comparison=pairwise-winrate", "grpo.judge=x"
        )
