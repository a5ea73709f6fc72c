"""Training on video through the one shared trainer (tiny-wan, 9 frames at 32 x 32): model.num_frames,
rewards on the decoded videos (one layout conversion, in the training context), GRPO with exact first-
update ratios, DRaFT with frame-subset decoding, evaluation grids of video frames, config errors before
the model loads, and the Wan2.1 DanceGRPO preset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import rewards
from vialign.config import TrainConfig, load_config
from vialign.errors import ConfigError, VialignInputError
from vialign.trainer import Trainer

ROOT = Path(__file__).parents[1]
FRAMES, SIZE = 9, 32


ALGORITHM = {
    "grpo": [
        "grpo.group_size=2",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=2",
        "grpo.clip_range=0.2",
    ],
    "draft": ["draft.prompts_per_step=2", "draft.micro_batch_size=2", "draft.grad_steps=2"],
    "alignprop": [
        "alignprop.prompts_per_step=2",
        "alignprop.micro_batch_size=2",
        "alignprop.decode_frames=random",
    ],
    "refl": [
        "refl.prompts_per_step=2",
        "refl.micro_batch_size=2",
        "refl.decode_frames=every-k",
        "refl.decode_every=4",
    ],
    "adjoint_matching": ["adjoint_matching.prompts_per_step=2", "adjoint_matching.micro_batch_size=2"],
    "online_dpo": [
        "online_dpo.beta=100",
        "online_dpo.samples_per_prompt=2",
        "online_dpo.pairs_per_step=2",
        "online_dpo.micro_batch_size=2",
    ],
    "raft": ["raft.prompts_per_step=2", "raft.micro_batch_size=2"],
    "rwr": ["rwr.prompts_per_step=2", "rwr.micro_batch_size=2"],
}


def video_config(tmp_path, *extra: str, model: str = "tiny-wan", algorithm: str = "grpo") -> TrainConfig:
    """``algorithm`` on tiny-wan: 2 prompts (x 2 samples for GRPO), 3 steps, no CFG, brightness over all
    frames; ``extra`` overrides win."""
    return load_config(
        TrainConfig,
        None,
        [
            f"algorithm={algorithm}",
            f"model.path={model}",
            f"model.num_frames={FRAMES}",
            "model.max_sequence_length=32",
            f"output_dir={tmp_path / 'run'}",
            "data.train=shapeworld-video:align",
            "data.eval=shapeworld-video:eval",
            "rewards={brightness: {options: {frames: all}}}",
            "finetune.lora_rank=4",
            "optim.lr=1e-2",
            "sampler.num_steps=3",
            f"sampler.height={SIZE}",
            f"sampler.width={SIZE}",
            "sampler.guidance_scale=1.0",
            *ALGORITHM[algorithm],
            "train.max_steps=1",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
            *extra,
        ],
    )


def draft_config(tmp_path, *extra: str) -> TrainConfig:
    return video_config(tmp_path, *extra, algorithm="draft")


def finite_metrics(metrics: dict) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


def test_grpo_on_video_ratio_one_at_the_first_update_and_a_video_evaluation(
    tmp_path, quiet_libraries, monkeypatch
):
    """The rollouts are videos of model.num_frames frames, the reward gets them as B x 3 x F x H x W, the
    first update's ratios are exactly 1, the LoRA moves, and evaluation scores videos (the video oracle's
    accuracy is logged) and draws a grid of each video's first, middle and last frames."""
    config = video_config(
        tmp_path,
        "train.eval_every=1",
        "train.eval_at_start=false",
        "eval.rewards=[shapeworld-video-oracle, brightness]",
        "eval.max_prompts=2",
        "eval.samples_per_prompt=2",
        "eval.batch_size=2",
        "eval.num_steps=2",
    )
    trainer = Trainer(config, progress=False)
    seen = []
    brightness = trainer.reward.components["brightness"]
    original = brightness.forward
    monkeypatch.setattr(
        brightness,
        "forward",
        lambda pixels, prompts=None: seen.append(pixels.shape) or original(pixels, prompts),
    )
    before = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.train()
    assert trainer.algorithm.context.num_frames == FRAMES
    assert seen[0] == (4, 3, FRAMES, SIZE, SIZE)  # the rewards' layout, every frame
    (first,) = trainer.algorithm.last_update_ratios
    assert first.numel() == 4 * 3 and torch.equal(first, torch.ones_like(first))
    assert metrics["ratio/first_update_max_deviation"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable))
    assert finite_metrics(metrics)
    assert {"eval/oracle_accuracy", "eval/oracle/motion", "eval/brightness"} <= set(metrics)
    assert seen[-2:] == [(2, 3, FRAMES, SIZE, SIZE)] * 2  # evaluation: 2 x 2 videos, scored a batch at a time
    grid = Image.open(tmp_path / "run" / "eval" / "step-000001.png")
    assert grid.size == (2 * 2 * (3 * SIZE + 2), 2 * 2 * (SIZE + 2))  # 2 x 2 samples of 3 frames, 2x upscaled


def test_draft_first_frame_gradient_equals_the_full_decode_restricted_to_frame_0(tmp_path, quiet_libraries):
    """decode_frames=first decodes latent frame 0 alone and the reward sees that frame only; its gradient
    is the gradient of the same loss computed through a full decode of all 9 frames restricted to
    frame 0 (the VAE is causal), within 1e-6. (The loss is scaled by 1e4 so that the gradients, ~1e-6 on
    this random tiny model, are ~1e-2 and the tolerance means something.)"""
    scale = 1e4
    trainer = Trainer(
        draft_config(tmp_path, "draft.decode_frames=first", f"draft.loss_scale={scale}"), progress=False
    )
    context, adapter = trainer.algorithm.context, trainer.adapter
    decoded = []
    decode = adapter.decode
    adapter.decode = lambda latents, **kw: decoded.append(kw.get("frames")) or decode(latents, **kw)
    grads = []

    def capture(step: int) -> float:
        grads.append([p.grad.detach().clone() for p in trainer.trainable])
        for p in trainer.trainable:
            p.grad = None
        return 0.0

    context.optimizer_step = capture
    metrics = trainer.algorithm.step(1)
    adapter.decode = decode
    assert decoded == [[0]] and finite_metrics(metrics)

    prompts, lo, hi = context.step_prompts(1, 2)
    reward = rewards.load_reward("brightness", frames="all")
    with context.train_mode():
        trajectory = context.rollout(prompts, 1, 0, trainer.algorithm.sampler, grad_steps=2)
        video = adapter.decode(trajectory.final)  # all 9 frames
        assert video.shape == (2, FRAMES, 3, SIZE, SIZE)
        score = reward(video[:, [0]].transpose(1, 2), prompts).score
        (-scale * score.sum() / len(prompts)).backward()
    by_hand = [p.grad.detach().clone() for p in trainer.trainable]
    assert max(float(g.abs().max()) for g in by_hand) > 1e-3
    for ours, expected in zip(grads[0], by_hand):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # the loss over all frames has another gradient: the test tells the two apart
    for p in trainer.trainable:
        p.grad = None
    with context.train_mode():
        trajectory = context.rollout(prompts, 1, 0, trainer.algorithm.sampler, grad_steps=2)
        all_frames = reward(adapter.decode(trajectory.final).transpose(1, 2), prompts).score
        (-scale * all_frames.sum() / len(prompts)).backward()
    assert max(float((p.grad - g).abs().max()) for p, g in zip(trainer.trainable, by_hand)) > 1e-4


def test_draft_step_on_video_changes_the_lora_and_picks_frames(tmp_path, quiet_libraries):
    from vialign.algorithms.draft import decoded_frames

    trainer = Trainer(draft_config(tmp_path, "draft.decode_frames=first-middle-last"), progress=False)
    before = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.algorithm.step(1)
    assert finite_metrics(metrics) and metrics["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable))
    assert decoded_frames("all", 9) is None
    assert decoded_frames("first", 9) == [0]
    assert decoded_frames("first-middle-last", 9) == [0, 4, 8]
    assert decoded_frames("every-k", 9, every=4) == [0, 4, 8]
    assert decoded_frames("every-k", 33, every=8) == [0, 8, 16, 24, 32]
    draws = {decoded_frames("random", 9, generator=torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert draws <= set(range(9)) and len(draws) > 3
    with pytest.raises(ConfigError, match="needs decode_every"):
        draft_config(tmp_path, "draft.decode_frames=every-k")
    with pytest.raises(ConfigError, match="decode_every is k of decode_frames=every-k"):
        draft_config(tmp_path, "draft.decode_every=2")


@pytest.mark.parametrize("algorithm", ["alignprop", "refl", "adjoint_matching", "online_dpo", "raft", "rwr"])
def test_every_other_sampling_algorithm_takes_a_step_on_video(tmp_path, quiet_libraries, algorithm):
    """The shared trainer serves them all on video (frame subsets: alignprop random, refl every-k)."""
    trainer = Trainer(video_config(tmp_path, algorithm=algorithm), progress=False)
    before = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.algorithm.step(1)
    assert finite_metrics(metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable))


def test_video_config_errors_before_the_model_loads(tmp_path, tiny_dir, quiet_libraries, monkeypatch):
    """An image-only reward on a video model without a frame strategy, model.num_frames on an image model,
    a frame count or size the model cannot take: errors naming the key and the fix, before loading."""

    def no_loading(self):
        raise AssertionError("the model was loaded before the config error")

    monkeypatch.setattr(Trainer, "_load_model", no_loading)
    with pytest.raises(ConfigError, match=r"rewards.shapeworld-clip: .*frame strategy.*frames: uniform"):
        Trainer(video_config(tmp_path, "rewards={shapeworld-clip: {}}"), progress=False)
    with pytest.raises(ConfigError, match="eval.rewards: shapeworld-oracle scores images"):
        Trainer(video_config(tmp_path, "eval.rewards=[shapeworld-oracle]"), progress=False)
    with pytest.raises(ConfigError, match="model.num_frames is for video models.*remove model.num_frames"):
        Trainer(video_config(tmp_path, model="tiny-sd3"), progress=False)
    with pytest.raises(ConfigError, match="rewards.shapeworld-video-oracle: .* scores videos"):
        Trainer(
            video_config(
                tmp_path, "model.num_frames=null", "rewards={shapeworld-video-oracle: {}}", model="tiny-sd3"
            ),
            progress=False,
        )
    folder = tiny_dir("wan")  # model_index.json and the component configs: sizes checked before loading
    with pytest.raises(ConfigError, match=r"model.num_frames: num_frames=10 is not 4k\+1"):
        Trainer(video_config(tmp_path, "model.num_frames=10", model=folder), progress=False)
    with pytest.raises(
        ConfigError, match="sampler.height / sampler.width: height=40 is not a positive multiple of 16"
    ):
        Trainer(video_config(tmp_path, "sampler.height=40", model=folder), progress=False)
    assert not (tmp_path / "run").exists()  # refused before the output folder was touched


def test_video_frames_are_checked_on_the_loaded_model_and_passed_to_rollouts(
    tmp_path, quiet_libraries, monkeypatch
):
    """A built-in name gives its family but not its VAE: the frame count is checked once it loads, before
    training, and then shapes every rollout. Settings that only fit images or videos are refused when the
    algorithm is set up: a pairwise image judge on videos, a frame subset on an image model."""
    monkeypatch.setattr(Trainer, "_setup_finetuning", lambda self: pytest.fail("training set up"))
    with pytest.raises(ConfigError, match=r"model.num_frames: num_frames=11 is not 4k\+1"):
        Trainer(video_config(tmp_path, "model.num_frames=11"), progress=False)
    monkeypatch.undo()
    trainer = Trainer(video_config(tmp_path, "model.num_frames=5", "grpo.micro_batch_size=1"), progress=False)
    trajectory = trainer.algorithm.context.rollout(
        ["a red circle moving left"], 1, 0, trainer.algorithm.sampler
    )
    assert trajectory.final.shape == (1, 16, 2, SIZE // 8, SIZE // 8)  # 5 frames: 2 latent frames
    assert trainer.image_size() == (SIZE, SIZE)
    judged = ["grpo.comparison=pairwise-winrate", "grpo.judge=vlm-pairwise", "overwrite=true"]
    with pytest.raises(VialignInputError, match="grpo.judge compares pairs of images"):
        Trainer(video_config(tmp_path, *judged), progress=False)
    image_draft = ["model.num_frames=null", "draft.decode_frames=first", "overwrite=true"]
    with pytest.raises(VialignInputError, match="draft.decode_frames=first picks frames of videos"):
        Trainer(draft_config(tmp_path, *image_draft, "model.path=tiny-sd3"), progress=False)


def test_reward_layout_is_converted_once_at_the_context():
    from vialign.algorithms.base import VideoPixelsReward
    from vialign.media import reward_layout

    video = torch.rand(2, FRAMES, 3, 8, 8)  # the adapter's B x F x 3 x H x W
    assert reward_layout(video).shape == (2, 3, FRAMES, 8, 8)
    assert torch.equal(reward_layout(video)[:, :, 4], video[:, 4])
    image = torch.rand(2, 3, 8, 8)
    assert reward_layout(image) is image
    combined = rewards.combine({"brightness": 1.0})
    wrapped = VideoPixelsReward(combined)
    assert wrapped.components is combined.components and wrapped.info is combined.info
    expected = combined(video.transpose(1, 2), ["a", "b"]).score
    assert torch.equal(wrapped(video, ["a", "b"]).score, expected)
    with pytest.raises(rewards.RewardInputError, match="3 \\(RGB\\) channels"):
        combined(video, ["a", "b"])  # unconverted, a reward refuses the adapter's layout


def test_wan21_dancegrpo_preset_validates_without_a_download(tmp_path):
    """The preset loads with the repo's config loader, its reward has a frame strategy for video, and its
    size and frame count fit Wan2.1-T2V-1.3B's VAE and patches (checked from config files shaped as the
    hub's, with no weights)."""
    from vialign.trainer import check_model_before_load

    path = ROOT / "configs" / "dance_grpo_wan21.yaml"
    config = load_config(TrainConfig, path)
    assert config.model.path == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and config.model.num_frames == 33
    assert (config.sampler.height, config.sampler.width) == (480, 832)
    assert config.rewards["hpsv2.1"].options["frames"] == "first-middle-last"
    assert config.algorithm == "grpo" and config.settings.train_steps == "dance"
    assert "derived" in path.read_text().split("\nalgorithm:")[0].lower()
    folder = tmp_path / "wan21"
    for name, content in {
        "model_index.json": {"_class_name": "WanPipeline"},
        "vae/config.json": {"z_dim": 16, "temperal_downsample": [False, True, True]},
        "transformer/config.json": {"patch_size": [1, 2, 2], "in_channels": 16},
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))
    local = load_config(TrainConfig, path, [f"model.path={folder}"])
    check_model_before_load(local)  # 480 x 832, 33 frames: fit
    with pytest.raises(ConfigError, match="model.num_frames"):
        check_model_before_load(
            load_config(TrainConfig, path, [f"model.path={folder}", "model.num_frames=32"])
        )
    with pytest.raises(ConfigError, match="rewards.hpsv2.1: .*frame strategy"):
        check_model_before_load(
            load_config(TrainConfig, path, [f"model.path={folder}", "rewards={hpsv2.1: {}}"])
        )


def test_vialign_eval_refuses_a_video_model_with_the_way_to_evaluate_it(tmp_path):
    from vialign.config import EvalConfig
    from vialign.eval import run_eval

    config = load_config(EvalConfig, None, ["model.path=tiny-wan", f"out={tmp_path / 'eval'}"])
    with pytest.raises(VialignInputError, match="video model: evaluate videos in vialign train"):
        run_eval(config)
