"""Reward shaping (rewards/shaping.py, ``rewards.<name>.shaping``): the transforms against their formulas
by hand, the config's errors, and a tiny GRPO run whose reference rewards, raw rewards and resumed state
are checked against images sampled here and an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics

import pytest
import torch
from test_recipes import prompt_file, small_grpo  # noqa: F401  (prompt_file is a fixture)

from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.errors import RewardInputError
from rewards.shaping import ShapedReward


class Mean(Reward):
    """A fake reward: the mean pixel, with one dimension of its own."""

    info = RewardInfo(
        name="mean",
        description="mean pixel",
        differentiable=True,
        modality="image",
        scale="mean",
        typical_range=(0.0, 1.0),
        needs_prompt=False,
    )

    def score(self, pixels, prompts):
        r = pixels.mean((1, 2, 3))
        return RewardOutput(r, {"half": r / 2})


REFS = {"a": [0.2, 0.6], "b": [0.9, 0.1]}


def fake_references(prompts):
    return torch.tensor([REFS[p] for p in prompts])


def images(values):
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_shaped_rewards_equal_their_formulas():
    pixels, prompts = images([0.3, 0.8, 0.5]), ["a", "b", "a"]
    raw = [0.3, 0.8, 0.5]
    k = 2.5

    par = ShapedReward(Mean(), "par", k=k, references=fake_references)
    out = par(pixels, prompts)
    want = [statistics.fmean(sigmoid(k * (r - ref)) for ref in REFS[p]) for r, p in zip(raw, prompts)]
    assert out.score.tolist() == pytest.approx(want, abs=1e-6)
    assert out.dims["raw"].tolist() == pytest.approx(raw, abs=1e-7)
    assert out.dims["half"].tolist() == pytest.approx([r / 2 for r in raw], abs=1e-7)
    assert par.info.typical_range == (0.0, 1.0) and par.info.needs_prompt and par.info.differentiable

    want = [r - statistics.fmean(REFS[p]) for r, p in zip(raw, prompts)]
    for kind in ("centered", "delta"):  # delta is another name of centered
        delta = ShapedReward(Mean(), kind, references=fake_references)
        assert delta(pixels, prompts).score.tolist() == pytest.approx(want, abs=1e-6)
        assert delta.info.typical_range == (-1.0, 1.0) and delta.info.needs_prompt

    ceiling = ShapedReward(Mean(), "ceiling", value=0.6)
    assert ceiling(pixels, prompts).score.tolist() == pytest.approx([0.3, 0.6, 0.5], abs=1e-7)
    assert ceiling.info.typical_range == (0.0, 0.6) and not ceiling.info.needs_prompt

    # clip: mean -/+ population std of every reward seen so far, this batch included
    clip = ShapedReward(Mean(), "clip")
    seen = []
    for batch in ([0.3, 0.8, 0.5], [0.1, 0.95], [0.5, 0.55, 0.2, 0.9]):
        seen += batch
        mu, sigma = statistics.fmean(seen), statistics.pstdev(seen)
        want = [min(max(r, mu - sigma), mu + sigma) for r in batch]
        assert clip(images(batch), ["x"] * len(batch)).score.tolist() == pytest.approx(want, abs=1e-6)
    state = clip.shaping_state()
    assert state["clip"]["count"] == len(seen)
    again = ShapedReward(Mean(), "clip")
    again.load_shaping_state(json.loads(json.dumps(state)))
    assert again.clip.state_dict() == clip.clip.state_dict()

    # with gather, the statistics are those of the global batch (another process scored [0.0, 1.0])
    gathered = ShapedReward(Mean(), "clip", gather=lambda r: torch.cat([r, torch.tensor([0.0, 1.0])]))
    everything = [0.3, 0.8, 0.0, 1.0]
    mu, sigma = statistics.fmean(everything), statistics.pstdev(everything)
    got = gathered(images([0.3, 0.8]), ["x", "x"]).score.tolist()
    assert got == pytest.approx([min(max(r, mu - sigma), mu + sigma) for r in (0.3, 0.8)], abs=1e-6)

    with pytest.raises(RewardInputError, match="references"):
        ShapedReward(Mean(), "par")
    with pytest.raises(RewardInputError, match="value"):
        ShapedReward(Mean(), "ceiling")


@pytest.mark.parametrize(
    "shaping, key, hint",
    [
        ("{kind: ceiling}", "rewards.brightness.shaping.value", "kind=ceiling needs the ceiling"),
        ("{kind: par, value: 0.5}", "rewards.brightness.shaping.value", "only kind=ceiling takes a value"),
        ("{kind: clip, k: 2}", "rewards.brightness.shaping.k", "only kind=par takes k"),
        (
            "{kind: sqrt}",
            "rewards.brightness.shaping.kind",
            "'par', 'centered', 'delta', 'ceiling' or 'clip'",
        ),
        (
            "{kind: clip, slope: 2}",
            "rewards.brightness.shaping.slope",
            "allowed keys here: k, kind, reference_samples",
        ),
        (
            "{kind: par, reference_samples: 0}",
            "rewards.brightness.shaping.reference_samples",
            ">= 1|equal to 1",
        ),
        ("{kind: ceiling, value: 1, reference_samples: 2}", "shaping.reference_samples", "only kind=par"),
        ("{kind: par, k: 0}", "rewards.brightness.shaping.k", "greater than 0"),
    ],
)
def test_config_errors_name_the_key(shaping, key, hint):
    from vialign.config import TrainConfig, load_config
    from vialign.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config(TrainConfig, None, [f"rewards={{brightness: {{shaping: {shaping}}}}}"])
    assert key in str(error.value)
    assert any(part in str(error.value) for part in hint.split("|")), str(error.value)


def test_config_accepts_shaping_for_training_only():
    from vialign.config import ScoreConfig, TrainConfig, load_config
    from vialign.errors import ConfigError

    config = load_config(
        TrainConfig, None, ["rewards={shapeworld-clip: {weight: 1, shaping: {kind: par, k: 1}}}"]
    )
    shaping = config.rewards["shapeworld-clip"].shaping
    assert (shaping.kind, shaping.k, shaping.value, shaping.reference_samples) == ("par", 1.0, None, 1)
    for kind in ("centered", "delta"):
        spec = load_config(
            TrainConfig,
            None,
            [f"rewards={{brightness: {{shaping: {{kind: {kind}, reference_samples: 3}}}}}}"],
        ).rewards["brightness"]
        assert spec.shaping.needs_references and spec.shaping.reference_samples == 3
    with pytest.raises(ConfigError, match="rewards.brightness.shaping: reward shaping applies to training"):
        load_config(ScoreConfig, None, ["rewards={brightness: {shaping: {kind: clip}}}"])


SHAPED = "rewards={brightness: {shaping: {kind: par, k: 2, reference_samples: 2}}, saturation: {weight: 0.5, shaping: {kind: clip}}}"
UNSHAPED = "rewards={brightness: {}, saturation: {weight: 0.5}}"


def capture_rewards(trainer) -> list:
    """Every output of the trainer's combined reward (the algorithm's calls; reference samples are scored by
    the inner rewards, not through it)."""
    outputs, forward = [], trainer.reward.forward

    def recording(pixels, prompts=None):
        out = forward(pixels, prompts)
        outputs.append(out)
        return out

    trainer.reward.forward = recording
    return outputs


def test_reference_rewards_and_raw_rewards_of_a_grpo_step(tmp_path, tiny_dir, prompt_file, quiet_libraries):  # noqa: F811
    """The cached reference rewards are brightness of images sampled here from the untrained model at the
    documented seeds; step 1's raw rewards are those of the same run without shaping (training samples and
    the global RNG untouched by reference sampling), and its shaped ones equal PAR's formula."""
    from vialign.config import ModelConfig
    from vialign.sample import load_model
    from vialign.sampling import Sampler, rollout_prompts
    from vialign.seeds import mix_seed
    from vialign.trainer import Trainer, reference_seed

    model = tiny_dir("sd3")
    runs = {}
    for name, rewards_option in (("shaped", SHAPED), ("plain", UNSHAPED)):
        trainer = Trainer(small_grpo(tmp_path / name, model, prompt_file, rewards_option), progress=False)
        outputs = capture_rewards(trainer)
        torch.manual_seed(123)
        metrics = trainer.algorithm.step(1)
        runs[name] = trainer, outputs, metrics, torch.get_rng_state()
    shaped, shaped_out, shaped_metrics, shaped_rng = runs["shaped"]
    _, plain_out, plain_metrics, plain_rng = runs["plain"]
    assert torch.equal(shaped_rng, plain_rng)  # reference sampling drew nothing from the global RNG
    assert len(shaped_out) == len(plain_out) == 1
    (out,), (plain,) = shaped_out, plain_out
    for reward in ("brightness", "saturation"):
        assert torch.equal(out.dims[f"{reward}/raw"], plain.dims[reward])
    assert plain_metrics["reward/brightness"] == pytest.approx(float(plain.dims["brightness"].mean()))
    assert shaped_metrics["reward/brightness"] == pytest.approx(float(out.dims["brightness"].mean()))

    # the reference cache against images sampled by hand from the untrained model
    config = shaped.config
    cache = shaped.reference_rewards["brightness"].cache
    prompts = list(dict.fromkeys(shaped.algorithm.context.step_prompts(1, 2, 4)[0]))
    assert sorted(cache) == sorted(prompts) and "saturation" not in shaped.reference_rewards
    fresh = load_model(ModelConfig(path=model), device="cpu", with_lora=False)
    schedule = fresh.schedule(4, 32, 32)
    brightness = shaped.reward.components["brightness"].inner
    for prompt in prompts:
        key = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
        seeds = [mix_seed(config.seed, 0x50415200, key, m) for m in range(2)]
        assert seeds == [reference_seed(config.seed, prompt, m) for m in range(2)]
        with torch.no_grad():
            final = rollout_prompts(
                fresh,
                [prompt] * 2,
                seeds,
                schedule,
                height=32,
                width=32,
                guidance=fresh.make_guidance(None),
                sampler=Sampler(),
            ).final
            want = brightness(fresh.decode(final), [prompt] * 2).score
        torch.testing.assert_close(torch.tensor(cache[prompt]), want, rtol=0, atol=1e-6)

    # the step's shaped rewards by PAR's formula from those references
    batch = shaped.algorithm.context.step_prompts(1, 2, 4)[0]
    raw = out.dims["brightness/raw"].tolist()
    want = [statistics.fmean(sigmoid(2 * (r - ref)) for ref in cache[p]) for r, p in zip(raw, batch)]
    assert out.dims["brightness"].tolist() == pytest.approx(want, abs=1e-6)
    # clip saw exactly the step's 8 saturation rewards
    seen = out.dims["saturation/raw"].double()
    clip = shaped.reward.components["saturation"].clip
    assert clip.count == 8 and clip.mean == pytest.approx(float(seen.mean()), abs=1e-12)
    # inside the algorithm's reference() (online DPO samples there) LoRA stays disabled after a new prompt
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in shaped.adapter.unwrapped_denoiser.modules() if isinstance(m, BaseTunerLayer)]
    with shaped.reference():
        shaped.reference_rewards["brightness"](["a prompt met inside reference()"])
        assert layers and all(layer.disable_adapters for layer in layers)
    assert not any(layer.disable_adapters for layer in layers)
    # evaluation scores the raw reward
    assert shaped._eval_rewards()["brightness"] is brightness


def test_resume_restores_the_shaping_state(tmp_path, tiny_dir, prompt_file, quiet_libraries):  # noqa: F811
    """A run resumed from its step-1 checkpoint starts from the saved reference cache and clip statistics,
    and ends with the uninterrupted run's state and metrics."""
    from vialign.trainer import Trainer

    options = [SHAPED, "train.max_steps=2", "train.checkpoint_every=1"]
    whole = Trainer(small_grpo(tmp_path / "whole", tiny_dir("sd3"), prompt_file, *options), progress=False)
    whole.train()
    checkpoints = tmp_path / "whole" / "run" / "checkpoints"
    states = [json.loads(path.read_text()) for path in checkpoints.glob("*/state.json")]
    saved = {state["step"]: state for state in states}
    after_one = saved[1]["reward_shaping"]
    assert set(after_one) == {"brightness", "saturation"}
    assert len(after_one["brightness"]["references"]) == 2 and after_one["saturation"]["clip"]["count"] == 8
    assert saved[2]["reward_shaping"] == whole.shaping_state()

    # interrupted after step 1: a copy of the run without its step-2 checkpoint, resumed
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed_dir)
    for folder in (resumed_dir / "run" / "checkpoints").iterdir():
        if json.loads((folder / "state.json").read_text())["step"] == 2:
            shutil.rmtree(folder)
    config = small_grpo(resumed_dir, tiny_dir("sd3"), prompt_file, *options)
    resumed = Trainer(config, resume=True, progress=False)
    assert resumed.start_step == 2
    assert resumed.shaping_state() == after_one  # restored, not recomputed
    resumed.train()
    assert resumed.shaping_state() == whole.shaping_state()
    rows = [json.loads(line) for line in (resumed_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [
        json.loads(line) for line in (tmp_path / "whole" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in rows if r["step"] == 2] == [strip(r) for r in whole_rows if r["step"] == 2]


@pytest.mark.parametrize("kl_beta", [0.0, 0.01])
def test_full_finetuning_samples_the_initial_weights(
    kl_beta,
    tmp_path,
    tiny_dir,
    prompt_file,  # noqa: F811
    quiet_libraries,
):
    """Full fine-tuning: the reference images come from a frozen copy of the initial denoiser (its own, or
    the algorithm's KL reference shared until a refresh changes that), so a prompt first met after training
    steps and a reference refresh still gets the LoRA run's (untrained model's) reference rewards."""
    from vialign.trainer import Trainer

    options = [SHAPED, "sampler.num_steps=2", "grpo.group_size=2", "grpo.micro_batch_size=2"]
    lora = Trainer(small_grpo(tmp_path / "lora", tiny_dir("sd3"), prompt_file, *options), progress=False)
    full = Trainer(
        small_grpo(
            tmp_path / "full",
            tiny_dir("sd3"),
            prompt_file,
            *options,
            "finetune.method=full",
            f"grpo.kl_beta={kl_beta}",
            "optim.lr=1e-3",
        ),
        progress=False,
    )
    assert full.initial_is_reference == (kl_beta > 0)
    assert (full.initial_denoiser is None) == (kl_beta > 0)
    full.algorithm.step(1)
    full.refresh_reference()  # online DPO's refresh: shaping keeps the initial weights
    assert full.initial_denoiser is not None and not full.initial_is_reference
    trained = dict(full.adapter.unwrapped_denoiser.named_parameters())
    initial = dict(full.initial_denoiser.named_parameters())
    assert any(not torch.equal(trained[n], initial[n]) for n in initial)  # training moved the weights
    prompts = ["two dogs", "a never seen prompt"]
    got = full.reference_rewards["brightness"](prompts)
    want = lora.reference_rewards["brightness"](prompts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert full.adapter.denoiser is full.adapter.unwrapped_denoiser  # the policy is back in place
