"""A reward that returns NaN or infinity, for every algorithm that trains on a reward.

GRPO drops the groups with a non-finite reward (a warning each step) and trains on the others; when no
group is left the update is skipped. The methods that need every score -- DRaFT, AlignProp, ReFL (a
backward pass through each sample), Adjoint Matching (the reward's gradient) and online DPO (best vs
worst of a group) -- stop with one ``VialignInputError`` before any weight moves.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import test_trainer
import torch
from test_recipes import tiny_run
from test_trainer import lora_weights, metric_rows

import rewards
import rewards.registry as registry
from rewards.base import Reward, RewardInfo, RewardOutput
from vialign.errors import VialignInputError
from vialign.trainer import Trainer

NAN, INF = math.nan, math.inf
prompt_file = test_trainer.prompt_file  # the fixture: four prompts in a file


class NonFiniteReward(Reward):
    """Brightness (differentiable, so the gradient methods accept it), replaced by ``value`` for every
    image, or with ``first_group`` only for the images of the batch's first prompt."""

    def __init__(self, name: str, value: float, first_group: bool = False) -> None:
        super().__init__()
        self.info = RewardInfo(
            name=name,
            description="test",
            differentiable=True,
            modality="image",
            scale="",
            typical_range=(0.0, 1.0),
        )
        self.value, self.first_group = value, first_group

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        score = pixels.mean((1, 2, 3))
        bad = torch.tensor([not self.first_group or p == prompts[0] for p in prompts], device=score.device)
        return RewardOutput(torch.where(bad, score * 0 + self.value, score))


REWARDS = {  # name -> (value, first_group)
    "nan": (NAN, False),
    "inf": (INF, False),
    "nan-first-group": (NAN, True),
    "constant-first-group": (0.5, True),  # a group without spread: dropped the ordinary way
}


@pytest.fixture
def nonfinite_rewards(monkeypatch):
    """The rewards above, registered for one test only."""
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    for name, (value, first_group) in REWARDS.items():
        reward = NonFiniteReward(name, value, first_group)
        rewards.register(name, reward.info, lambda reward=reward: reward)


# the smallest batch of each algorithm
SETTINGS = {
    "grpo": ["grpo.group_size=3", "grpo.prompts_per_step=2", "grpo.micro_batch_size=2"],
    "draft": ["draft.prompts_per_step=2", "draft.micro_batch_size=2"],
    "alignprop": ["alignprop.prompts_per_step=2", "alignprop.micro_batch_size=2"],
    "refl": ["refl.prompts_per_step=2", "refl.micro_batch_size=2"],
    "adjoint_matching": ["adjoint_matching.prompts_per_step=2", "adjoint_matching.micro_batch_size=2"],
    "online_dpo": [
        "online_dpo.beta=100",
        "online_dpo.samples_per_prompt=2",
        "online_dpo.pairs_per_step=2",
        "online_dpo.micro_batch_size=1",
    ],
}


def one_step_config(tmp_path, tiny_dir, prompt_file, algorithm: str, reward: str, *extra: str):
    """One step of ``algorithm`` on tiny SD3 (32 px, 4 sampler steps, LoRA rank 4) with ``reward``."""
    return tiny_run(
        tmp_path / f"{algorithm}-{reward}",
        tiny_dir("sd3"),
        prompt_file,
        f"algorithm={algorithm}",
        f"rewards={{{reward}: {{}}}}",
        "sampler.num_steps=4",
        "train.max_steps=1",
        "train.checkpoint_every=1",  # a step that finished would leave checkpoint-1
        *SETTINGS[algorithm],
        *extra,
    )


GRADIENT_METHOD = (
    "step 1: the reward returned NaN or infinite scores; a gradient method cannot skip them "
    "(check the reward's inputs, or lower optim.lr)"
)
ADJOINT_MATCHING = (
    "step 1: the reward returned NaN or infinite scores; adjoint matching cannot skip them "
    "(check the reward's inputs, or lower optim.lr)"
)
ONLINE_DPO = (
    "step 1: the reward returned NaN or infinite scores; online_dpo cannot pick a best and worst sample "
    "from them (check the reward's inputs, or lower optim.lr)"
)


@pytest.mark.parametrize(
    "algorithm, reward, message",
    [
        ("draft", "nan", GRADIENT_METHOD),
        ("draft", "inf", GRADIENT_METHOD),
        ("alignprop", "nan", GRADIENT_METHOD),
        ("refl", "nan", GRADIENT_METHOD),
        ("adjoint_matching", "nan", ADJOINT_MATCHING),
        ("adjoint_matching", "inf", ADJOINT_MATCHING),
        ("online_dpo", "nan", ONLINE_DPO),
        ("online_dpo", "inf", ONLINE_DPO),
    ],
)
def test_methods_that_need_every_score_stop_before_any_weight_moves(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, nonfinite_rewards, algorithm, reward, message
):
    config = one_step_config(tmp_path, tiny_dir, prompt_file, algorithm, reward)
    trainer = Trainer(config, progress=False)
    before = lora_weights(trainer)
    with pytest.raises(VialignInputError) as raised:
        trainer.train()
    assert str(raised.value) == message
    after = lora_weights(trainer)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    run = Path(config.output_dir)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "final").exists()


@pytest.mark.parametrize("reward", ["nan", "inf"])
def test_grpo_skips_the_update_when_every_group_is_nonfinite(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, nonfinite_rewards, caplog, reward
):
    config = one_step_config(tmp_path, tiny_dir, prompt_file, "grpo", reward)
    trainer = Trainer(config, progress=False)
    before = lora_weights(trainer)
    with caplog.at_level("WARNING"):
        trainer.train()  # a skipped step is no error: the run goes on (and saves, and exports)
    assert "step 1: 2 group(s) with a NaN or infinite reward skipped (2 so far)" in caplog.text
    assert "step 1: every group had a NaN or infinite reward; update skipped" in caplog.text
    after = lora_weights(trainer)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    (row,) = metric_rows(config.output_dir)
    assert row["nonfinite_groups"] == 2 and row["count/skipped_updates"] == 1
    assert "grad_norm" not in row and "optimizer_updates" not in row  # no update, so no NaN loss either
    assert (Path(config.output_dir) / "checkpoints" / "checkpoint-1").exists()


def test_grpo_trains_on_the_finite_group_only(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, nonfinite_rewards, caplog
):
    """One group NaN, one finite: the update is exactly the one where the NaN group is a group without
    spread (dropped the ordinary way), so the NaN group has no say at all; and it does move the weights."""
    initial, trained = {}, {}
    for reward in ("nan-first-group", "constant-first-group"):
        # the update through one of the 4 steps is enough here, and a quarter of the time
        config = one_step_config(
            tmp_path,
            tiny_dir,
            prompt_file,
            "grpo",
            reward,
            "grpo.train_steps=first",
            "grpo.step_fraction=0.25",
        )
        trainer = Trainer(config, progress=False)
        initial[reward] = lora_weights(trainer)
        with caplog.at_level("WARNING"):
            trainer.train()
        trained[reward] = lora_weights(trainer)
        advantages = trainer.algorithm.last_advantages
        assert torch.equal(advantages[:3], torch.zeros(3)) and advantages[3:].abs().min() > 0
    assert "step 1: 1 group(s) with a NaN or infinite reward skipped (1 so far)" in caplog.text
    nan_run, constant_run = trained["nan-first-group"], trained["constant-first-group"]
    assert all(value.isfinite().all() for value in nan_run.values())
    assert any(not torch.equal(nan_run[name], value) for name, value in initial["nan-first-group"].items())
    for name, value in nan_run.items():
        torch.testing.assert_close(value, constant_run[name], rtol=0, atol=0)


def test_the_command_reports_a_nonfinite_reward_as_one_error(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, nonfinite_rewards, capsys
):
    """``vialign train`` with online DPO (whose error used to be a plain ValueError and a traceback)."""
    from vialign.cli import main

    preset = tmp_path / "online_dpo.yaml"
    preset.write_text(
        "algorithm: online_dpo\n"
        f"model: {{path: {tiny_dir('sd3')}}}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {prompt_file}, eval: null}}\nrewards: {{nan: {{}}}}\nfinetune: {{lora_rank: 4}}\n"
        "sampler: {height: 32, width: 32, num_steps: 4}\n"
        "online_dpo: {beta: 100, samples_per_prompt: 2, pairs_per_step: 2, micro_batch_size: 1}\n"
        "train: {max_steps: 1, eval_every: 0, checkpoint_every: 0, tensorboard: false}\n"
    )
    assert main(["train", str(preset)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("vialign: error:") == 1
    assert err.strip().splitlines()[-1] == f"vialign: error: {ONLINE_DPO}"  # after the progress bar
