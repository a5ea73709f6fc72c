"""Reward-gradient methods (DRaFT, AlignProp, ReFL) and Adjoint Matching on the shared trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pipelines
import rewards
from vialign.algorithms.adjoint_matching import lean_adjoint, memoryless_sampler, step_mean, stratified_steps
from vialign.algorithms.draft import sample_k
from vialign.config import TrainConfig, load_config
from vialign.errors import ConfigError, VialignInputError
from vialign.sampling import rollout_prompts
from vialign.trainer import Trainer

SIZE = 32


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3"], ids=["ddpm", "flow"])
def test_lean_adjoint_is_the_reward_gradient_through_the_fixed_noise_chain(model, quiet_libraries):
    """Fine-tuned = base, noise held fixed: a_k == -lambda d r(x_N) / d x_k by autograd, at every k."""
    adapter = pipelines.load_pipeline(model, device="cpu")
    reward = rewards.load_reward("brightness")
    sampler, lam, num_steps = memoryless_sampler(adapter.kind), 7.0, 4
    schedule = adapter.schedule(num_steps, SIZE, SIZE)
    guidance = adapter.make_guidance(1.0)
    prompts = ["a red square", "a blue circle"]
    with torch.no_grad():
        trajectory = rollout_prompts(
            adapter, prompts, [3, 4], schedule, height=SIZE, width=SIZE, guidance=guidance, sampler=sampler
        )
    latents, cond = trajectory.latents, trajectory.cond
    # the noise each step drew, recovered from the stored transitions
    noises, stds = [], []
    with torch.no_grad():
        for k in range(num_steps):
            mean, std = step_mean(adapter, schedule, sampler, k, latents[:, k], cond, guidance, None)
            std = std.reshape(-1, 1, 1, 1) if std.ndim else std
            noises.append((latents[:, k + 1] - mean) / std)
            stds.append(std)

    def reward_of(x):
        return reward(adapter.decode(x), prompts).score.sum()

    x_n = latents[:, -1].clone().requires_grad_(True)
    terminal = -lam * torch.autograd.grad(reward_of(x_n), x_n)[0]
    adjoints = lean_adjoint(adapter, schedule, sampler, latents, terminal, cond, guidance)
    for start in range(num_steps):
        x0 = latents[:, start].clone().requires_grad_(True)
        x = x0
        for k in range(start, num_steps):  # the same chain, differentiable, with the same noise
            mean, _ = step_mean(adapter, schedule, sampler, k, x, cond, guidance, None)
            x = mean + stds[k] * noises[k]
        torch.testing.assert_close(x.detach(), latents[:, -1], rtol=1e-4, atol=1e-5)
        expected = -lam * torch.autograd.grad(reward_of(x), x0)[0]
        assert expected.abs().max() > 0
        scale = expected.abs().max()
        assert (adjoints[:, start] - expected).abs().max() <= 1e-4 * scale, start


def test_memoryless_flow_sde_is_the_paper_drift():
    """Flow-SDE with a = sqrt(2): mean = x + h (2u - x/t) in the paper's time (t = 1 - sigma, u = -v)."""
    from vialign.sampling import flow_sde_step

    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma, sigma_next = 0.6, 0.45
    out = flow_sde_step(x, v, sigma, sigma_next, noise_level=math.sqrt(2.0), noise=torch.zeros_like(x))
    t, h, u = 1 - sigma, sigma - sigma_next, -v
    torch.testing.assert_close(out.mean, x + h * (2 * u - x / t))
    torch.testing.assert_close(out.std, torch.tensor(math.sqrt(2 * (1 - t) / t) * math.sqrt(h)))


def test_stratified_steps_and_alignprop_k():
    generator = torch.Generator().manual_seed(0)
    steps = stratified_steps(20, 5, generator)
    assert len(steps) == 5 and [s // 4 for s in steps] == [0, 1, 2, 3, 4]
    assert stratified_steps(3, 10, generator) == [0, 1, 2]
    ks = [sample_k(42, 5, 50, torch.Generator().manual_seed(i)) for i in range(200)]
    assert 1 <= min(ks) and max(ks) <= 50 and abs(sum(ks) / len(ks) - 42) < 1.5


def _config(tmp_path, algorithm, *extra):
    batch = {"adjoint_matching": [f"{algorithm}.prompts_per_step=8"]}.get(
        algorithm, [f"{algorithm}.prompts_per_step=8", f"{algorithm}.micro_batch_size=8"]
    )
    return load_config(
        TrainConfig,
        None,
        [
            f"algorithm={algorithm}",
            "model.path=shapeworld",
            f"output_dir={tmp_path / 'run'}",
            "rewards={brightness: {}}",
            "finetune.lora_rank=4",
            "optim.lr=1e-3",
            "sampler.num_steps=6",
            *batch,
            "train.max_steps=4",
            "train.eval_every=4",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
            "eval.samples_per_prompt=2",
            "eval.max_prompts=8",
            "eval.num_steps=6",
            "eval.rewards=[brightness]",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("draft", ["draft.grad_steps=2"]),
        ("alignprop", ["alignprop.k_mean=3", "alignprop.k_std=1"]),
        ("refl", []),
        ("draft", ["draft.lv_samples=2"]),
        (
            "draft",
            ["draft.kl_coeff=0.01", "draft.offload=true", "draft.eta=0.5", "draft.grad_steps=2"],
        ),
        (
            "adjoint_matching",
            [
                "adjoint_matching.reward_multiplier=1000",
                "adjoint_matching.trained_timesteps=6",
                "optim.lr=1e-2",
            ],
        ),
    ],
    ids=["draft-k", "alignprop", "refl", "draft-lv", "draft-plus", "adjoint-matching"],
)
def test_each_method_makes_the_testbed_brighter(tmp_path, algorithm, extra, quiet_libraries):
    """4 steps on the testbed model with the differentiable brightness reward: the held-out eval
    brightness (ODE, fixed seeds; 0.253 at the start) rises by a margin."""
    config = _config(tmp_path, algorithm, *extra)
    Trainer(config, progress=False).train()
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval/brightness"] for row in rows if "eval/brightness" in row]
    assert evals[-1] - evals[0] > 0.02, evals
    assert (Path(config.output_dir) / "final" / "pytorch_lora_weights.safetensors").exists()


def test_gradient_methods_reject_bad_input(tmp_path, quiet_libraries):
    with pytest.raises(
        ConfigError, match=r"draft.grad_steps = 7 exceeds the 6 sampling steps \(sampler.num_steps\)"
    ):
        _config(tmp_path, "draft", "draft.grad_steps=7")
    with pytest.raises(ConfigError, match=r"alignprop.k_mean = 7.0 exceeds the 6 sampling steps"):
        _config(tmp_path, "alignprop", "alignprop.k_mean=7")
    with pytest.raises(ConfigError, match=r"refl.steps = \[3, 6\] must satisfy"):
        _config(tmp_path, "refl", "refl.steps=[3, 6]")
    # AlignProp draws K itself: DRaFT-LV's re-noised last step is DRaFT's (K = 1), not AlignProp's
    with pytest.raises(ConfigError, match="alignprop.lv_samples: unknown key"):
        _config(tmp_path, "alignprop", "alignprop.lv_samples=2")
    # a setting of another algorithm is an error, not silently ignored
    with pytest.raises(ConfigError, match="grpo: settings of the grpo algorithm, but algorithm is 'refl'"):
        _config(tmp_path, "refl", "grpo.kl_beta=0.1")
    with pytest.raises(ConfigError, match="refl.kl_coeff: unknown key"):
        _config(tmp_path, "refl", "refl.kl_coeff=0.1")
    with pytest.raises(ConfigError, match="sde_window"):
        _config(tmp_path, "grpo", "sampler.sde_window=[3, 3]")
    config = _config(tmp_path, "draft", "rewards={shapeworld-oracle: {}}")
    with pytest.raises(rewards.RewardInputError, match="not differentiable; use one of: .*brightness"):
        Trainer(config, progress=False)


@pytest.mark.parametrize(
    "name, algorithm, model",
    [
        ("refl_sd15", "refl", "CompVis/stable-diffusion-v1-4"),
        ("alignprop_sd15", "alignprop", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("draft_sdxl", "draft", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("adjoint_matching_sd15", "adjoint_matching", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("adjoint_matching_flux", "adjoint_matching", "black-forest-labs/FLUX.1-dev"),
        ("quickstart_draft", "draft", "shapeworld"),
        ("quickstart", "refl", "shapeworld"),
        ("quickstart_adjoint", "adjoint_matching", "shapeworld"),
    ],
)
def test_gradient_presets(name, algorithm, model):
    config = load_config(TrainConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert (config.algorithm, config.model.path) == (algorithm, model)
    differentiable = {info.name for info in rewards.list_rewards() if info.differentiable}
    assert set(config.rewards) <= differentiable


def test_refl_regularizer_is_the_denoising_loss_on_captioned_images(tmp_path, quiet_libraries):
    """The regulariser reads {file, prompt} rows, encodes the images, and its loss is the model's own
    denoising error: the pretrained testbed model denoises real renders far better than a zero
    prediction would (a wrong target convention, e.g. x0 - noise, would be ~5x worse than zero)."""
    from PIL import Image

    from rewards import shapeworld as sw

    scenes = sw.all_scenes()[:16]
    rows = []
    for i, scene in enumerate(scenes):
        Image.fromarray((sw.render(scene, seed=i) * 255).round().astype("uint8")).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "prompt": scene.prompt}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    config = _config(
        tmp_path,
        "refl",
        f"refl.regularizer_data={tmp_path / 'pairs.jsonl'}",
        "refl.micro_batch_size=16",
    )
    algorithm = Trainer(config, progress=False).algorithm
    latents, prompts = algorithm.regularizer
    assert latents.shape[0] == 16 and prompts == [s.prompt for s in scenes]
    with torch.no_grad():
        losses = torch.stack([algorithm.regularizer_loss(step, 16) for step in range(1, 9)])
    # target = noise - x0 (flow): E|target|^2 per dim = 1 + E x0^2; a useful denoiser is well below it
    zero_prediction = 1 + latents.square().mean()
    assert losses.mean() < 0.5 * zero_prediction, (losses, zero_prediction)
    with pytest.raises(VialignInputError, match="refl.regularizer_data: nope.jsonl not found"):
        Trainer(_config(tmp_path / "missing", "refl", "refl.regularizer_data=nope.jsonl"), progress=False)


def test_refl_regularizer_on_a_guidance_distilled_flux_equals_the_conditional_loss_by_hand(tmp_path):
    """FLUX.1-dev takes its guidance as an input: the regulariser passes the run's guidance embedding
    (no CFG) and its loss equals the flow-matching loss computed from the same draws by hand."""
    from PIL import Image

    from pipelines.adapter import Guidance

    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    rows = [{"file": "0.png", "prompt": "a red square"}, {"file": "1.png", "prompt": "a blue square"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(
        tmp_path,
        "refl",
        "model.path=tiny-flux",
        "model.device=cpu",
        "sampler.height=32",
        "sampler.width=32",
        "sampler.guidance_scale=3.5",
        f"refl.regularizer_data={tmp_path / 'pairs.jsonl'}",
    )
    algorithm = Trainer(config, progress=False).algorithm
    adapter, (latents, prompts) = algorithm.context.adapter, algorithm.regularizer
    with torch.no_grad():
        loss = algorithm.regularizer_loss(3, 4)
        generator = torch.Generator().manual_seed(algorithm.context.seed * 7_919 + 3)  # the step's draws
        index = torch.randint(len(prompts), (4,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.rand(4, generator=generator) * adapter.scheduler.config.num_train_timesteps
        sigma = (t / adapter.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        embeds = adapter.encode_prompt([prompts[i] for i in index])
        velocity = adapter.predict((1 - sigma) * x0 + sigma * noise, t, embeds, Guidance(embedded=3.5))
        by_hand = (velocity - (noise - x0)).square().mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
