"""RAFT and reward-weighted regression (vialign/algorithms/reward_weighted.py): their weights against
brute force and the formulas, and one training step's loss and gradient against a by-hand computation."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from test_recipes import prompt_file, tiny_run  # noqa: F401  (prompt_file is a fixture)

from pipelines.adapter import Guidance
from vialign.advantages import raft_selection, rwr_weights
from vialign.algorithms.base import sample_seed
from vialign.algorithms.reward_weighted import REGRESSION_DRAWS
from vialign.data import prompts_for_step
from vialign.errors import VialignInputError
from vialign.sampling import Sampler, rollout_prompts


def test_raft_selection_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        k = 1 + trial % 5
        scores = torch.randint(0, 4, (k * 6,), generator=generator).float()  # many ties
        scores[torch.rand(len(scores), generator=generator) < 0.15] = float("nan")
        values = scores.tolist()
        expected = [False] * len(values)
        for g in range(0, len(values), k):
            finite = [i for i in range(g, g + k) if math.isfinite(values[i])]
            if finite:
                expected[max(finite, key=lambda i: (values[i], -i))] = True  # the first of the best
        assert raft_selection(scores, k).tolist() == expected, (scores, k)
        fraction = [0.05, 0.2, 0.5, 1.0][trial % 4]
        count = max(1, round(fraction * len(values)))
        finite = sorted(
            (i for i in range(len(values)) if math.isfinite(values[i])), key=lambda i: (-values[i], i)
        )
        expected = [i in finite[:count] for i in range(len(values))]
        assert raft_selection(scores, k, mode="global", fraction=fraction).tolist() == expected


def test_rwr_weights_equal_their_formulas():
    r = torch.tensor([0.5, -1.0, float("nan"), 2.0])
    tau = 0.7
    exp = [math.exp(0.5 / tau), math.exp(-1.0 / tau), 0.0, math.exp(2.0 / tau)]
    assert torch.allclose(rwr_weights(r, tau), torch.tensor(exp), rtol=1e-6)
    mean = sum(exp) / 3  # the NaN stays out of the batch mean
    assert torch.allclose(
        rwr_weights(r, tau, normalize="batch"), torch.tensor([e / mean for e in exp]), rtol=1e-6
    )
    big = torch.tensor([1000.0, 999.0])  # exp overflows in float32; the batch form does not
    assert torch.allclose(rwr_weights(big, normalize="batch"), 2 * torch.softmax(big, 0))
    with pytest.raises(ValueError, match="temperature"):
        rwr_weights(r, 0.0)


@pytest.mark.parametrize(
    "family, algorithm, options",
    [
        ("sd3", "raft", ["raft.selection=per_prompt"]),
        ("sd", "raft", ["raft.selection=global", "raft.keep_fraction=0.4", "raft.loss_guidance=conditional"]),
        ("sd3", "rwr", ["rwr.temperature=0.05", "rwr.rollout_model=reference", "rwr.targets=final"]),
        ("sd", "rwr", ["rwr.temperature=0.05", "rwr.normalize=batch"]),
        ("sd3", "rwr", ["rwr.temperature=0.05", "rwr.loss_guidance=sampling", "sampler.guidance_scale=3.0"]),
    ],
)
def test_one_step_equals_the_weighted_denoising_loss_by_hand(
    family,
    algorithm,
    options,
    tmp_path,
    tiny_dir,
    prompt_file,  # noqa: F811
    quiet_libraries,
):
    """The step's loss and gradient equal sum_i w_i |f(alpha x0_i + sigma eps_i, t_i) - target_i|^2 / N built
    here from the same seeds: samples re-drawn with rollout_prompts, weights by hand (best of each group, the
    global top share, or exp(r / tau)), the target by its definition (eps; eps - x0 for flow)."""
    from vialign.trainer import Trainer

    k, prompts_per_step = 3, 2
    config = tiny_run(
        tmp_path,
        tiny_dir(family),
        prompt_file,
        f"algorithm={algorithm}",
        "sampler.num_steps=4",
        f"{algorithm}.samples_per_prompt={k}",
        f"{algorithm}.prompts_per_step={prompts_per_step}",
        f"{algorithm}.micro_batch_size=4",
        *options,
    )
    trainer = Trainer(config, progress=False)
    context, adapter = trainer.algorithm.context, trainer.adapter
    settings = config.settings
    params = [p for p in adapter.lora_parameters()]

    # by hand, before the step changes the weights
    prompts = [
        p for p in prompts_for_step(context.prompts, 1, prompts_per_step, config.seed) for _ in range(k)
    ]
    with torch.no_grad():
        final = rollout_prompts(
            adapter,
            prompts,
            [sample_seed(config.seed, 1, i) for i in range(len(prompts))],
            context.schedule,
            height=context.height,
            width=context.width,
            guidance=context.guidance,
            sampler=Sampler(),
        ).final
        pixels = adapter.decode(final)
        scores = context.reward(pixels, prompts).score.float()
        if settings.targets == "reencoded":  # the VAE's posterior mean of the decoded samples
            final = adapter.encode(pixels, sample=False)
    values = scores.tolist()
    if algorithm == "rwr":
        w = torch.tensor([math.exp(v / 0.05) for v in values])
        if settings.normalize == "batch":
            w = w / w.mean()
        normaliser = len(values)
    elif settings.selection == "per_prompt":
        w = torch.zeros(len(values))
        for g in range(0, len(values), k):
            w[max(range(g, g + k), key=lambda i: (values[i], -i))] = 1
        normaliser = prompts_per_step
    else:
        w = torch.zeros(len(values))
        w[sorted(range(len(values)), key=lambda i: (-values[i], i))[:2]] = 1  # round(0.4 x 6) = 2
        normaliser = 2
    generator = torch.Generator().manual_seed(sample_seed(config.seed, 1, REGRESSION_DRAWS))
    from vialign.algorithms.dpo import dpo_timesteps

    t = dpo_timesteps(adapter, len(prompts), settings, generator)
    noise = torch.randn(final.shape, generator=generator)
    alpha, sigma = adapter.coefficients(t)
    alpha, sigma = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    target = noise - final if adapter.kind == "flow" else noise
    assert adapter.prediction_type in ("flow", "epsilon")
    x_t, cond = alpha * final + sigma * noise, adapter.encode_prompt(prompts)
    scale = context.guidance.cfg_scale
    assert scale > 1 and (scale == 3.0) == ("sampler.guidance_scale=3.0" in options)  # CFG is on
    if settings.loss_guidance == "sampling":  # the guided prediction by its formula: u + s (c - u)
        u = adapter.predict(x_t, t, adapter.encode_prompt([""] * len(prompts)), Guidance())
        c = adapter.predict(x_t, t, cond, Guidance())
        output = u + scale * (c - u)
    else:
        output = adapter.predict(x_t, t, cond, Guidance())
    errors = (output - target).square().flatten(1).mean(1)
    loss = (w * errors).sum() / normaliser
    expected = torch.autograd.grad(loss, params)

    captured = {}

    def capture(step: int) -> float:
        captured["grads"] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return 0.0

    context.optimizer_step = capture
    entered = []
    reference = context.reference

    @contextlib.contextmanager
    def recording_reference():
        entered.append(True)
        with reference():
            yield

    context.reference = recording_reference
    metrics = trainer.algorithm.step(1)
    # the samples come from the reference (here equal to the policy: LoRA B starts at 0) when asked
    assert entered == ([True] if settings.rollout_model == "reference" else [])
    assert metrics["trained_samples"] == int((w > 0).sum())
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for got, want in zip(captured["grads"], expected):
        # micro-batches of 4 against one batch of 6: float32 summation order only
        assert (got - want).norm() <= 1e-5 * want.norm(), ((got - want).norm(), want.norm())


def test_bad_rewards_say_what_to_change(tmp_path, tiny_dir, prompt_file, quiet_libraries):  # noqa: F811
    from vialign.trainer import Trainer

    common = ["overwrite=true", "sampler.num_steps=2", "rewards={brightness: {weight: 10000}}"]
    rwr = tiny_run(tmp_path, tiny_dir("sd3"), prompt_file, "algorithm=rwr", "rwr.prompts_per_step=1", *common)
    with pytest.raises(VialignInputError, match="raise rwr.temperature or set rwr.normalize: batch"):
        Trainer(rwr, progress=False).algorithm.step(1)
    raft = tiny_run(
        tmp_path, tiny_dir("sd3"), prompt_file, "algorithm=raft", "raft.prompts_per_step=1", *common
    )
    trainer = Trainer(raft, progress=False)
    trainer.algorithm.context.reward = lambda pixels, prompts: type(
        "Out", (), {"score": torch.full((len(prompts),), float("nan"))}
    )()
    with pytest.raises(VialignInputError, match="raft: every reward of step 1 is NaN or infinite"):
        trainer.algorithm.step(1)
