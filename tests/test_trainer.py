"""The shared trainer with GRPO on tiny models: on-policy ratios, KL, resume, export, bad input, learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import accelerate_launch
from safetensors.torch import load_file

import rewards
from rewards.base import Reward, RewardInfo, RewardOutput
from vialign.checkpoint import list_checkpoints
from vialign.config import TrainConfig, load_config
from vialign.errors import ConfigError, VialignInputError
from vialign.trainer import Trainer

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a white star"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def make_config(tmp_path, model, prompt_file, **overrides) -> TrainConfig:
    base = [
        f"model.path={model}",
        f"output_dir={tmp_path / 'run'}",
        f"data.train={prompt_file}",
        f"data.eval={prompt_file}",
        "rewards={brightness: {weight: 1.0}}",
        "finetune.lora_rank=4",
        "optim.lr=1e-2",
        "sampler.num_steps=4",
        "sampler.height=32",
        "sampler.width=32",
        "grpo.group_size=3",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=2",
        "grpo.clip_range=0.2",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
        "eval.samples_per_prompt=2",
        "eval.num_steps=4",
    ]
    extra = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(TrainConfig, None, base + extra)


def metric_rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def lora_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in zip(trainer._trainable_names(), trainer.trainable)}


def test_first_update_is_on_policy_and_kl_is_zero(tmp_path, tiny_dir, prompt_file, quiet_libraries):
    # rollout batch 6 per step, training micro-batches of 2 (the last rollout chunk padded): ratios exactly 1
    config = make_config(
        tmp_path, tiny_dir("sd3"), prompt_file, grpo__kl_beta=0.1, sampler__sde_kind="dance-sde"
    )
    Trainer(config, progress=False).train()
    first, second = metric_rows(config.output_dir)[:2]
    for row in (first, second):  # every step's first pass re-scores its own rollouts: on-policy
        assert abs(row["ratio/max"] - 1) <= 1e-6 and abs(row["ratio/min"] - 1) <= 1e-6
    assert first["kl"] == 0.0 and second["kl"] > 0  # LoRA starts as the reference; one update moves it
    # a second pass over the same rollouts after an update is off-policy: the ratios move
    config = make_config(
        tmp_path / "epochs", tiny_dir("sd3"), prompt_file, grpo__inner_epochs=2, train__max_steps=1
    )
    Trainer(config, progress=False).train()
    (row,) = metric_rows(config.output_dir)
    assert row["ratio/max"] - row["ratio/min"] > 1e-4


def test_kl_is_zero_for_the_reference_policy_and_matches_the_gaussian_kl(
    tmp_path, tiny_dir, prompt_file, quiet_libraries
):
    from vialign.losses import gaussian_kl
    from vialign.sampling import evaluate_step, rollout_prompts

    config = make_config(tmp_path, tiny_dir("sd"), prompt_file, grpo__kl_beta=1.0, train__max_steps=1)
    trainer = Trainer(config, progress=False)
    metrics = trainer.algorithm.step(1)
    assert metrics["kl"] == 0.0  # LoRA starts at B = 0: the policy is the reference
    algorithm, adapter = trainer.algorithm, trainer.adapter
    # after the update: the KL of one DDPM step, recomputed from two Normal distributions by torch
    with torch.no_grad():
        trajectory = rollout_prompts(
            adapter,
            PROMPTS[:2],
            [5, 6],
            algorithm.schedule,
            height=32,
            width=32,
            guidance=algorithm.context.guidance,
            sampler=algorithm.sampler,
        )
        common = dict(
            guidance=trajectory.guidance,
            uncond=trajectory.uncond,
            stochastic=True,
            prev=trajectory.latents[:, 2],
        )
        policy = evaluate_step(
            adapter,
            algorithm.schedule,
            algorithm.sampler,
            1,
            trajectory.latents[:, 1],
            trajectory.cond,
            **common,
        )
        with trainer.reference():
            reference = evaluate_step(
                adapter,
                algorithm.schedule,
                algorithm.sampler,
                1,
                trajectory.latents[:, 1],
                trajectory.cond,
                **common,
            )
    std = policy.std.expand_as(policy.mean)
    expected = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(policy.mean, std), torch.distributions.Normal(reference.mean, std)
        )
        .flatten(1)
        .sum(1)
    )
    assert expected.min() > 0
    torch.testing.assert_close(gaussian_kl(policy.mean, reference.mean, policy.std), expected)


def test_resume_is_bitwise_and_ignores_incomplete_checkpoints(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, monkeypatch
):
    model = tiny_dir("sd3")
    straight = make_config(
        tmp_path / "a",
        model,
        prompt_file,
        train__max_steps=4,
        finetune__ema_decay=0.9,
        train__checkpoint_every=2,
    )
    reference = Trainer(straight, progress=False)
    reference.train()
    expected = lora_weights(reference)

    interrupted = make_config(
        tmp_path / "b",
        model,
        prompt_file,
        train__max_steps=4,
        finetune__ema_decay=0.9,
        train__checkpoint_every=2,
    )
    from vialign.algorithms.grpo import GRPO

    original = GRPO.step

    def stop_at_three(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(GRPO, "step", stop_at_three)
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted, progress=False).train()
    monkeypatch.setattr(GRPO, "step", original)
    root = Path(interrupted.output_dir) / "checkpoints"
    # a write that died half-way: a temporary folder, and a folder without state.json
    (root / ".tmp-checkpoint-3-x").mkdir()
    (root / ".tmp-checkpoint-3-x" / "tensors.safetensors").write_bytes(b"partial")
    (root / "checkpoint-3").mkdir()
    (root / "checkpoint-3" / "tensors.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-2"]

    resumed = Trainer(interrupted, resume=True, progress=False)
    assert resumed.start_step == 3
    resumed.train()
    for name, value in lora_weights(resumed).items():
        assert torch.equal(value, expected[name]), name
    for a, b in zip(resumed.ema, reference.ema):
        assert torch.equal(a, b)
    steps = [row["step"] for row in metric_rows(interrupted.output_dir) if "reward/mean" in row]
    assert steps == [1, 2, 3, 4]


def test_failed_checkpoint_write_is_an_error_and_keeps_the_previous_one(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, monkeypatch
):
    import vialign.checkpoint as checkpoint

    config = make_config(
        tmp_path, tiny_dir("sd3"), prompt_file, train__max_steps=2, train__checkpoint_every=1
    )
    trainer = Trainer(config, progress=False)
    original = checkpoint.save_file
    calls = []

    def disk_full(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(VialignInputError, match="No space left on device.*previous checkpoints are intact"):
        trainer.train()
    root = Path(config.output_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-1"]
    assert [p.name for p in root.iterdir()] == ["checkpoint-1"]  # no temporary folder left behind
    load_file(root / "checkpoint-1" / "tensors.safetensors")


def test_exported_lora_loads_in_stock_diffusers(tmp_path, tiny_dir, prompt_file, quiet_libraries):
    from diffusers import StableDiffusion3Pipeline

    from pipelines import load_pipeline
    from vialign.sample import generate_images, to_uint8

    model = tiny_dir("sd3")
    config = make_config(tmp_path, model, prompt_file, train__max_steps=1, optim__lr=0.05)
    Trainer(config, progress=False).train()
    final = Path(config.output_dir) / "final"
    pipe = StableDiffusion3Pipeline.from_pretrained(model).to("cpu")
    pipe.load_lora_weights(final)
    generator = [torch.Generator().manual_seed(s) for s in (0, 1)]
    stock = pipe(
        PROMPTS[:2], num_inference_steps=4, height=32, width=32, generator=generator, output_type="np"
    ).images

    def images(adapter):
        batches = generate_images(
            adapter, PROMPTS[:2], [0, 1], num_steps=4, height=32, width=32, guidance=adapter.make_guidance()
        )
        return to_uint8(torch.cat([pixels for _, pixels in batches]))

    ours = images(load_pipeline(model, lora=str(final)))
    untrained = images(load_pipeline(model))
    assert (abs(ours.astype(int) - (stock * 255).round().astype(int))).max() <= 1
    assert (abs(ours.astype(int) - untrained.astype(int))).max() > 2  # the LoRA changed the images


def test_bad_inputs(tmp_path, tiny_dir, prompt_file, quiet_libraries):
    with pytest.raises(ConfigError, match="grpo: group_size=1 leaves every group without a reward spread"):
        make_config(tmp_path, "tiny-sd3", prompt_file, grpo__group_size=1)
    with pytest.raises(ConfigError, match="grpo.nonsense: unknown key"):
        make_config(tmp_path, "tiny-sd3", prompt_file, grpo__nonsense=1)
    with pytest.raises(ConfigError, match="rewards: at least one"):
        make_config(tmp_path, "tiny-sd3", prompt_file, rewards="{}")
    missing = make_config(tmp_path, "tiny-sd3", str(tmp_path / "nope.txt"))
    with pytest.raises(VialignInputError, match="prompt file not found"):
        Trainer(missing, progress=False)
    config = make_config(tmp_path, tiny_dir("sd3"), prompt_file, train__max_steps=1)
    Trainer(config, progress=False).train()
    with pytest.raises(VialignInputError, match="holds an earlier run; pass --resume"):
        Trainer(config, progress=False)
    assert (Path(config.output_dir) / "metrics.jsonl").exists()  # nothing was deleted


class FlakyReward(Reward):
    """Brightness, but NaN for every sample of the first prompt of a batch."""

    info = RewardInfo(
        name="flaky",
        description="test",
        differentiable=False,
        modality="image",
        scale="",
        typical_range=(0.0, 1.0),
        needs_prompt=True,
    )

    def score(self, pixels, prompts):
        score = pixels.mean((1, 2, 3))
        return RewardOutput(
            torch.where(torch.tensor([p == prompts[0] for p in prompts]), float("nan"), score)
        )


class WrongShapeReward(Reward):
    info = RewardInfo(
        name="wrong-shape",
        description="test",
        differentiable=False,
        modality="image",
        scale="",
        typical_range=(0.0, 1.0),
        needs_prompt=False,
    )

    def score(self, pixels, prompts):
        return RewardOutput(pixels.mean((1, 2, 3))[:-1])


def test_nan_rewards_skip_their_group_and_wrong_shapes_fail(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, caplog
):
    rewards.register("flaky", FlakyReward.info, lambda **_: FlakyReward())
    rewards.register("wrong-shape", WrongShapeReward.info, lambda **_: WrongShapeReward())
    config = make_config(tmp_path / "nan", tiny_dir("sd3"), prompt_file, rewards="{flaky: {}}")
    with caplog.at_level("WARNING"):
        Trainer(config, progress=False).train()
    rows = metric_rows(config.output_dir)
    assert [row["nonfinite_groups"] for row in rows] == [1.0, 1.0]
    assert rows[-1]["count/nonfinite_groups"] == 2.0
    assert all(row["ratio/mean"] == 1.0 for row in rows) and all(row["grad_norm"] > 0 for row in rows)
    assert "NaN or infinite reward skipped" in caplog.text
    config = make_config(tmp_path / "shape", tiny_dir("sd3"), prompt_file, rewards="{wrong-shape: {}}")
    with pytest.raises(rewards.RewardInputError, match="wrong-shape.*one score per image"):
        Trainer(config, progress=False).train()


def test_it_learns_brightness(tmp_path, quiet_libraries):
    """The testbed model made brighter: the eval brightness (ODE, fixed seeds) rises by a margin in 12
    steps (measured: 0.253 -> 0.367; ~8 s on 2 cores). A random tiny model is no use here: its decoder
    maps every latent to ~0.51 +- 0.004, whatever the LoRA does."""
    config = load_config(
        TrainConfig,
        None,
        [
            "model.path=shapeworld",
            f"output_dir={tmp_path / 'run'}",
            "rewards={brightness: {}}",
            "finetune.lora_rank=4",
            "optim.lr=3e-3",
            "sampler.num_steps=6",
            "grpo.group_size=4",
            "grpo.prompts_per_step=4",
            "grpo.micro_batch_size=16",
            "grpo.clip_range=0.2",
            "train.max_steps=12",
            "train.eval_every=12",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
            "eval.samples_per_prompt=2",
            "eval.max_prompts=8",
            "eval.num_steps=6",
            "eval.rewards=[brightness]",
        ],
    )
    Trainer(config, progress=False).train()
    evals = [row["eval/brightness"] for row in metric_rows(config.output_dir) if "eval/brightness" in row]
    assert evals[-1] - evals[0] > 0.05, evals


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny_dir, prompt_file):
    """accelerate launch --multi_gpu --num_processes 2 (gloo on CPU) == one process, same global batch, for
    every algorithm family: GRPO (with KL; and with the recipes' 2 updates per round, shared group noise,
    DanceGRPO's per-sample steps and prompt dropout), DRaFT+ (reference model, 2 micro-batches), ReFL (with the
    denoising regulariser), Adjoint Matching (loss clipping from the global batch), offline DPO (pairs
    and their latent cache), online DPO (whole groups per process), RAFT and RWR (weights from the global
    batch, a group split across processes)."""
    algorithms = [
        "grpo",
        "grpo_recipe",
        "draft",
        "refl",
        "adjoint_matching",
        "dpo",
        "online_dpo",
        "raft",
        "rwr",
    ]
    script = Path(__file__).with_name("train_two_steps.py")
    sys.path.insert(0, str(script.parent))
    from train_two_steps import regularizer_images

    regularizer_images(tmp_path / "images")
    model = tiny_dir("sd3")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out_one, out_two = tmp_path / "one", tmp_path / "two"
    result = subprocess.run(
        [sys.executable, str(script), model, prompt_file, str(out_one), *algorithms],
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    launch = accelerate_launch()
    result = subprocess.run(
        [*launch, str(script), model, prompt_file, str(out_two), *algorithms],
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from vialign.advantages import group_advantages

    for algorithm in algorithms:
        one = load_file(out_one / algorithm / "result.safetensors")
        two = load_file(out_two / algorithm / "result.safetensors")
        state_one, state_two = (
            json.loads((out / algorithm / "state.json").read_text()) for out in (out_one, out_two)
        )
        assert state_two["world_size"] == 2
        if algorithm == "adjoint_matching":  # the clipping threshold: the global batch's, on every process
            assert state_two["algorithm"]["clip_threshold"] == pytest.approx(
                state_one["algorithm"]["clip_threshold"], rel=1e-5
            )
        assert one.keys() == two.keys() and any(k.startswith("weights.") for k in one)
        if algorithm == "grpo":
            groups = torch.arange(8) // 4
            for step in (1, 2):
                # the advantages each process used are those of all 8 rewards pooled (groups spanning
                # processes), and the rewards are one process's (to float rounding of the batch reduction)
                pooled = group_advantages(two[f"scores.{step}"], groups).values
                assert torch.equal(two[f"advantages.{step}"], pooled)
                torch.testing.assert_close(two[f"scores.{step}"], one[f"scores.{step}"], rtol=1e-6, atol=1e-7)
        initial = load_file(out_one / algorithm / "initial.safetensors")
        weights = [key for key in one if key.startswith("weights.")]
        moved = max(float((one[k] - initial[k]).abs().max()) for k in weights)
        assert moved > 1e-4, algorithm  # two steps trained something
        for key in one:
            if key.startswith(("weights.", "ema.")):
                torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5, msg=f"{algorithm} {key}")


@pytest.mark.parametrize(
    "name, model, group, sde, beta",
    [
        ("ddpo_sd15", "CompVis/stable-diffusion-v1-4", 1, "ddim", 0.0),
        ("grpo_sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 12, "ddim", 0.0),
        ("flow_grpo_sd35", "stabilityai/stable-diffusion-3.5-medium", 24, "flow-sde", 0.01),
        ("dance_grpo_flux", "black-forest-labs/FLUX.1-dev", 12, "dance-sde", 0.0),
        ("quickstart_grpo", "shapeworld", 8, "flow-sde", 0.0),
    ],
)
def test_presets_validate_with_published_settings(name, model, group, sde, beta):
    config = load_config(TrainConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert (
        config.model.path,
        config.settings.group_size,
        config.sampler.sde_kind,
        config.settings.kl_beta,
    ) == (
        model,
        group,
        sde,
        beta,
    )
    known = {info.name for info in rewards.list_rewards()}
    assert set(config.rewards) <= known and set(config.eval.rewards) <= known
    assert config.settings.clip_range == 1e-4


def test_prompt_sources(tmp_path):
    from rewards import shapeworld as sw
    from vialign.data import load_prompts, prompts_for_step, split_prompts

    assert load_prompts("shapeworld:all") == [scene.prompt for scene in sw.all_scenes()]
    assert set(load_prompts("shapeworld:held_out")).isdisjoint(load_prompts("shapeworld:train"))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a cat"}\n\n{"caption": "a dog"}\n')
    assert load_prompts(str(jsonl), "caption") == ["a cat", "a dog"]
    with pytest.raises(VialignInputError, match="no string 'prompt' field"):
        load_prompts(str(jsonl))
    with pytest.raises(VialignInputError, match="unknown built-in prompt set"):
        load_prompts("shapeworld:nope")
    train, held = split_prompts([f"p{i}" for i in range(10)], 0.3, seed=0)
    assert len(held) == 3 and not set(train) & set(held) and len(train) == 7
    # every prompt once per pass, whatever the step size; the same (seed, step) gives the same prompts
    prompts = [f"p{i}" for i in range(6)]
    first_pass = prompts_for_step(prompts, 1, 4, seed=1) + prompts_for_step(prompts, 2, 4, seed=1)[:2]
    assert sorted(first_pass) == sorted(prompts)
    assert prompts_for_step(prompts, 2, 4, seed=1) == prompts_for_step(prompts, 2, 4, seed=1)


def test_evaluation_seeds_never_meet_training_seeds(
    tmp_path, tiny_dir, prompt_file, quiet_libraries, monkeypatch, caplog
):
    """Every training draw (sample_seed, any config seed, step and index, step choices included) is below
    2**62; evaluation draws 2**62 + index. Checked on the seeds a real run hands to the sampler: GRPO's
    rollouts and the trainer's evaluation (of the eval prompts and of the regression prompts)."""
    import vialign.algorithms.base as base
    import vialign.sample as sample
    from vialign.algorithms import sample_seed
    from vialign.algorithms.base import EVALUATION_SEEDS, evaluation_seed

    for seed in (0, 1, 12345, 2**40, 2**62):
        for step in (1, 2, 10**6):
            for index in (0, 7, 2**20 - 1, 2**40, 2**41 + 5, 2**42):
                assert 0 <= sample_seed(seed, step, index) < EVALUATION_SEEDS == 2**62
    assert [evaluation_seed(i) for i in (0, 1, 7)] == [2**62, 2**62 + 1, 2**62 + 7]

    drawn = {"train": [], "eval": []}

    def recording(module, kind):
        original = module.rollout_prompts

        def rollout_prompts(adapter, prompts, seeds, *args, **kwargs):
            drawn[kind].extend(int(s) for s in seeds)
            return original(adapter, prompts, seeds, *args, **kwargs)

        monkeypatch.setattr(module, "rollout_prompts", rollout_prompts)

    recording(base, "train")  # TrainingContext.rollout
    recording(sample, "eval")  # generate_images, the trainer's evaluation
    config = make_config(
        tmp_path,
        tiny_dir("sd3"),
        prompt_file,
        train__eval_every=1,
        eval__regression_prompts=prompt_file,
        eval__max_prompts=2,
    )
    Trainer(config, progress=False).train()
    assert "4 of the 4 evaluation prompts are training prompts too" in caplog.text  # data.train == data.eval
    per_eval = 2 * 2 + len(PROMPTS) * 2  # eval prompts x 2 seeds + regression prompts x 2 seeds
    assert len(drawn["eval"]) == 3 * per_eval and len(drawn["train"]) == 2 * 2 * 3
    assert set(drawn["eval"]) == {2**62, 2**62 + 1}
    assert max(drawn["train"]) < 2**62 and not set(drawn["train"]) & set(drawn["eval"])
    rows = [r for r in metric_rows(tmp_path / "run") if "eval/brightness" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval/brightness_se" in r and "eval/regression/brightness" in r for r in rows)
