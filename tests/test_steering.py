"""Inference-time steering (vialign.steering): the FK weights and resampling against hand computations,
the ReNO regulariser against torch.distributions.Chi2, each method's neutral setting against plain
sampling (bitwise), the reward-gradient rules against their formulas, and the CLI's checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pipelines
import rewards
from vialign import steering
from vialign.cli import main
from vialign.media import reward_layout
from vialign.sampling import Sampler, rollout_prompts, sde_sampler, trajectory_log_probs
from vialign.seeds import mix_seed
from vialign.steering import (
    FKSteering,
    GuidanceSettings,
    RenoSettings,
    SamplingSetup,
    SMCSettings,
    candidate_seed,
    chi_regularizer,
    effective_sample_size,
    fk_weights,
    guided_output,
    resample_indices,
)

PROMPTS = ["a red square", "a blue circle on the left"]
SEEDS = [11, 12]
SIZE = 64
FAMILIES = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-wan"]  # tiny-wan: 9-frame videos


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = pipelines.load_pipeline(name, device="cpu")
            if cache[name].is_video:
                cache[name].default_num_frames = 9  # as vialign sample --num-frames 9
        return cache[name]

    return get


@pytest.fixture(scope="module")
def brightness():
    return rewards.combine({"brightness": 1.0}).eval()


def _setup(adapter, *, sde: bool = False, steps: int = 4, cfg: float = 3.0) -> SamplingSetup:
    sampler = sde_sampler(adapter.kind) if sde else Sampler()
    return SamplingSetup.for_adapter(
        adapter, steps, height=SIZE, width=SIZE, guidance_scale=cfg, sampler=sampler
    )


def _plain(adapter, setup: SamplingSetup, prompts, seeds) -> torch.Tensor:
    with torch.no_grad():
        return rollout_prompts(
            adapter,
            list(prompts),
            list(seeds),
            setup.schedule,
            height=setup.height,
            width=setup.width,
            guidance=setup.guidance,
            sampler=setup.sampler,
        ).final


# ---------------------------------------------------------------- SMC math, by hand


def test_fk_weights_equal_hand_computation_for_every_potential():
    lam = 2.0
    r = torch.tensor([0.5, 1.0, -1.0])
    prev = torch.tensor([1.0, 0.25, 0.0])
    product = torch.tensor([2.0, 4.0, 0.5])
    e = math.exp
    expected = {
        "max": ([e(2 * 1.0), e(2 * 1.0), e(2 * 0.0)], [1.0, 1.0, 0.0]),
        "add": ([e(2 * 1.5), e(2 * 1.25), e(2 * -1.0)], [1.5, 1.25, -1.0]),
        "diff": ([e(2 * -0.5), e(2 * 0.75), e(2 * -1.0)], [0.5, 1.0, -1.0]),
        "rt": ([e(2 * 0.5), e(2 * 1.0), e(2 * -1.0)], [0.5, 1.0, -1.0]),
    }
    for potential, (weights, carried) in expected.items():
        w, c = fk_weights(potential, lam, r, prev, product, last=False)
        torch.testing.assert_close(w, torch.tensor(weights, dtype=torch.float64))
        torch.testing.assert_close(c, torch.tensor(carried, dtype=torch.float64))
        # the last step: max / add / rt divide by the product of earlier potentials, diff does not
        w_last, _ = fk_weights(potential, lam, r, prev, product, last=True)
        divisor = torch.ones(3, dtype=torch.float64) if potential == "diff" else product.double()
        torch.testing.assert_close(w_last, torch.tensor(weights, dtype=torch.float64) / divisor)
    # clamped to [0, 1e10], NaN -> 0
    w, _ = fk_weights(
        "rt", 100.0, torch.tensor([1.0, float("nan")]), torch.zeros(2), torch.ones(2), last=False
    )
    assert w.tolist() == [1e10, 0.0]


def test_resampling_indices_and_ess_equal_hand_computation():
    weights = torch.tensor([1.0, 0.0, 3.0])  # cdf 0.25, 0.25, 1.0
    uniforms = torch.tensor([0.1, 0.3, 0.9, 0.25])
    assert resample_indices(weights, uniforms).tolist() == [0, 2, 2, 2]  # u = 0.25 is past the first bucket
    assert resample_indices(torch.zeros(3), torch.tensor([0.2, 0.5, 0.8])).tolist() == [0, 1, 2]  # uniform
    assert float(effective_sample_size(torch.tensor([1.0, 1.0, 1.0, 1.0]))) == pytest.approx(4.0)
    assert float(effective_sample_size(torch.tensor([1.0, 0.0, 3.0]))) == pytest.approx(1 / (1 / 16 + 9 / 16))


def test_smc_resamples_with_its_per_prompt_generator(adapters, brightness):
    """A hook step on fixed x0 predictions: the ancestors are the inverse-CDF draws of the hand-computed
    diff potentials, with the uniforms of the prompt's own generator."""
    adapter = adapters("tiny-sd")
    prompts = ["a red square"] * 3
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hook = FKSteering(adapter, brightness, prompts, [5], 3, SMCSettings(lam=3.0, every=1), num_steps=4)
    ancestors = hook.resample(1, x0, x0)
    with torch.no_grad():
        r = brightness(adapter.decode(x0), prompts).score.double()
    weights = torch.exp(3.0 * (r - 0.0))  # diff with r_prev = reward_floor = 0
    uniforms = torch.rand(
        3, generator=torch.Generator().manual_seed(mix_seed(5, 0x534D43)), dtype=torch.float64
    )
    assert ancestors.tolist() == resample_indices(weights, uniforms).tolist()
    torch.testing.assert_close(hook.previous[0], r[ancestors])
    torch.testing.assert_close(hook.product[0], weights[ancestors])


def test_resampling_reindexes_the_whole_trajectory(adapters, brightness):
    adapter = adapters("tiny-sd3")
    setup = _setup(adapter, sde=True)
    prompts = ["a red square"] * 4
    hook = FKSteering(adapter, brightness, prompts, [3], 4, SMCSettings(lam=50.0, every=1), num_steps=4)
    with torch.no_grad():
        trajectory = rollout_prompts(
            adapter,
            prompts,
            [3, 4, 5, 6],
            setup.schedule,
            height=SIZE,
            width=SIZE,
            guidance=setup.guidance,
            sampler=setup.sampler,
            hook=hook,
        )
    assert [entry["step"] for entry in hook.log] == [0, 1, 2, 3]
    assert all(entry["resampled_groups"] == [0] for entry in hook.log)
    torch.testing.assert_close(trajectory.latents[:, -1], trajectory.final)
    # each row is one ancestral path: re-scoring its stored x_k -> x_{k+1} gives its recorded log-prob (a
    # row whose states or log-probs were not re-indexed with the particles would be off by thousands)
    with torch.no_grad():
        replayed = trajectory_log_probs(adapter, trajectory)
    torch.testing.assert_close(replayed, trajectory.log_probs, rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------- neutral settings are plain sampling


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_settings_reproduce_plain_sampling_bitwise(adapters, brightness, family):
    """best-of-1, SMC with lam = 0 and adaptive resampling, guidance with scale 0: plain sampling."""
    adapter = adapters(family)
    ode, sde = _setup(adapter), _setup(adapter, sde=True)
    plain = _plain(adapter, ode, PROMPTS, SEEDS)
    best = steering.best_of_n(adapter, brightness, PROMPTS, SEEDS, ode, n=1, batch_size=2)
    assert torch.equal(best.latents, plain)
    guided = steering.reward_guidance(
        adapter, brightness, PROMPTS, SEEDS, ode, settings=GuidanceSettings(scale=0.0), batch_size=2
    )
    assert torch.equal(guided.latents, plain)
    particles = 3
    rows_prompts = [p for p in PROMPTS for _ in range(particles)]
    rows_seeds = [candidate_seed(s, j) for s in SEEDS for j in range(particles)]
    plain_sde = _plain(adapter, sde, rows_prompts, rows_seeds)
    result = steering.smc(
        adapter,
        brightness,
        PROMPTS,
        SEEDS,
        sde,
        particles=particles,
        settings=SMCSettings(lam=0.0, adaptive=True, every=1),
        batch_size=6,
    )
    assert all(d["resampled_at"] == [] for d in result.details)
    kept = torch.tensor([i * particles + d["chosen"] for i, d in enumerate(result.details)])
    assert torch.equal(result.latents, plain_sde[kept])
    # the kept particle is the one the reward scores highest
    with torch.no_grad():
        scores = brightness(reward_layout(adapter.decode(plain_sde)), rows_prompts).score.view(2, particles)
    assert [d["chosen"] for d in result.details] == scores.argmax(1).tolist()


def test_best_of_n_keeps_the_highest_reward_candidate(adapters, brightness):
    adapter = adapters("tiny-sd")
    setup = _setup(adapter)
    n = 4
    result = steering.best_of_n(adapter, brightness, PROMPTS, SEEDS, setup, n=n, batch_size=8)
    rows_prompts = [p for p in PROMPTS for _ in range(n)]
    rows_seeds = [candidate_seed(s, j) for s in SEEDS for j in range(n)]
    assert len(set(rows_seeds)) == 8 and rows_seeds[0] == SEEDS[0]
    candidates = _plain(adapter, setup, rows_prompts, rows_seeds)
    with torch.no_grad():
        scores = brightness(adapter.decode(candidates), rows_prompts).score.view(2, n)
    assert [d["chosen"] for d in result.details] == scores.argmax(1).tolist()
    torch.testing.assert_close(result.reward, scores.max(1).values)
    assert result.model_calls == n * 4 * 2  # N candidates x 4 steps x (cond + uncond)


def test_candidate_seeds_draw_different_noise():
    """A CPU generator reads 32 bits of a seed: candidates must differ there, not above."""
    first = torch.randn(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, torch.randn(4, generator=torch.Generator().manual_seed(7 + 2**32)))
    seeds = [candidate_seed(7, j) for j in range(8)]
    assert seeds[0] == 7 and all(0 <= s < 2**32 for s in seeds) and len(set(seeds)) == 8


# ---------------------------------------------------------------- ReNO


def test_reno_regulariser_is_the_chi_log_density_up_to_a_constant():
    d = 48
    chi2 = torch.distributions.Chi2(torch.tensor(float(d), dtype=torch.float64))
    gaps = []
    for scale in (0.5, 1.0, 1.3, 2.0):
        z = scale * torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(int(scale * 10)))
        norm = torch.linalg.vector_norm(z.double())
        # |z| = sqrt(Q), Q ~ chi2_d: p_|z|(r) = p_Q(r^2) * 2r
        log_density = chi2.log_prob(norm**2) + torch.log(2 * norm)
        gaps.append(float(chi_regularizer(z)[0].double() + log_density))
    assert max(gaps) - min(gaps) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_reno_raises_the_reward_and_starts_from_plain_sampling(adapters, brightness, family):
    adapter = adapters(family)
    setup = _setup(adapter, cfg=1.0)
    # tiny-wan's videos barely depend on their initial noise (brightness moves by ~3e-4): more and larger steps
    settings = (
        RenoSettings(iterations=6, lr=500.0) if adapter.is_video else RenoSettings(iterations=3, lr=50.0)
    )
    result = steering.reno(adapter, brightness, PROMPTS, SEEDS, setup, settings=settings, batch_size=2)
    plain = _plain(adapter, setup, PROMPTS, SEEDS)
    with torch.no_grad():
        plain_reward = brightness(reward_layout(adapter.decode(plain)), PROMPTS).score
    torch.testing.assert_close(torch.tensor([d["initial_reward"] for d in result.details]), plain_reward)
    assert all(d["best_reward"] > d["initial_reward"] for d in result.details)
    torch.testing.assert_close(result.reward, torch.tensor([d["best_reward"] for d in result.details]))
    # the weights get no gradient and stay trainable afterwards
    assert all(p.grad is None for p in adapter.denoiser.parameters())


def test_reno_optimises_each_image_on_its_own(adapters, brightness):
    adapter = adapters("tiny-sd")
    setup = _setup(adapter, cfg=1.0)
    settings = RenoSettings(iterations=3, lr=50.0)
    both = steering.reno(adapter, brightness, PROMPTS, SEEDS, setup, settings=settings, batch_size=2)
    alone = steering.reno(adapter, brightness, PROMPTS[1:], SEEDS[1:], setup, settings=settings, batch_size=1)
    torch.testing.assert_close(both.reward[1:], alone.reward, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- reward-gradient guidance


def test_guided_output_follows_the_rules():
    torch.manual_seed(0)
    x, out, grad = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    alpha, sigma, s = 0.6, 0.8, 0.7
    torch.testing.assert_close(
        guided_output(out, x, grad, alpha, sigma, "epsilon", s), out - s * sigma * grad
    )
    torch.testing.assert_close(guided_output(out, x, grad, 0.4, 0.6, "flow", s), out - s * 0.6 * grad)
    for kind in ("v_prediction", "sample"):
        moved = guided_output(out, x, grad, alpha, sigma, kind, s)
        eps_before = pipelines.convert_prediction(out, x, alpha, sigma, kind).eps
        eps_after = pipelines.convert_prediction(moved, x, alpha, sigma, kind).eps
        torch.testing.assert_close(eps_after, eps_before - s * sigma * grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_raises_the_reward(adapters, brightness, family):
    adapter = adapters(family)
    setup = _setup(adapter)
    plain = steering.reward_guidance(
        adapter, brightness, PROMPTS, SEEDS, setup, settings=GuidanceSettings(scale=0.0)
    )
    guided = steering.reward_guidance(
        adapter, brightness, PROMPTS, SEEDS, setup, settings=GuidanceSettings(scale=200.0)
    )
    assert (guided.reward > plain.reward).all()
    calls = 4 * (2 if setup.guidance.uses_uncond else 1)  # FLUX: guidance embedding, one pass
    assert guided.model_calls == plain.model_calls == calls  # the guided forward replaces the plain one


# ---------------------------------------------------------------- the CLI


def _run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_cli_rejects_bad_steering_before_loading_the_model(capsys, tmp_path):
    """Each bad steering input is named; the model path does not exist, so an error about it would mean
    the model was reached first."""
    missing = [
        "--model",
        str(tmp_path / "no-model"),
        "--prompt",
        "a red square",
        "--out",
        str(tmp_path / "o"),
    ]
    errors = []

    def _run(args, capsys):
        code, err = _run_cli(args, capsys)
        errors.append(err)
        return code, err

    code, err = _run(["sample", *missing, "--steer", "reno", "--reward", "shapeworld-oracle"], capsys)
    assert code == 2 and "not differentiable" in err and "shapeworld-clip" in err
    code, err = _run(["sample", *missing, "--steer", "guidance", "--reward", "shapeworld-oracle"], capsys)
    assert code == 2 and "not differentiable" in err
    code, err = _run(["sample", *missing, "--steer", "smc", "--reward", "brightness"], capsys)
    assert code == 2 and "--sampler sde" in err and "flow-sde" in err
    code, err = _run(
        ["sample", *missing, "--steer", "best-of-n", "--reward", "brightness", "--particles", "0"], capsys
    )
    assert code == 2 and "particles" in err
    code, err = _run(
        [
            "sample",
            *missing,
            "--sampler",
            "sde",
            "--steer",
            "smc",
            "--reward",
            "brightness",
            "steer.smc.potential=best",
        ],
        capsys,
    )
    assert code == 2 and "potential" in err and "diff" in err
    code, err = _run(
        [
            "sample",
            *missing,
            "--sampler",
            "sde",
            "--num-steps",
            "8",
            "--steer",
            "smc",
            "--reward",
            "brightness",
            "steer.smc.end=9",
        ],
        capsys,
    )
    assert code == 2 and "past the last" in err
    code, err = _run(["sample", *missing, "--steer", "best-of-n", "--reward", "no-such-reward"], capsys)
    assert code == 2 and "no-such-reward" in err
    code, err = _run(["sample", *missing, "--steer", "best-of-n"], capsys)
    assert code == 2 and "--reward" in err
    assert not any("no-model" in e for e in errors)


def test_cli_best_of_n_writes_its_record(capsys, tmp_path):
    out = tmp_path / "steered"
    code, err = _run_cli(
        [
            "sample",
            "--model",
            "tiny-sd3",
            "--prompt",
            "a red square",
            "--prompt",
            "two dogs",
            "--num-steps",
            "3",
            "--steer",
            "best-of-n",
            "--reward",
            "brightness",
            "--particles",
            "3",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00000.png", "00001.png"]
    for row in rows:
        assert row["steer"] == "best-of-n" and row["steer_options"]["particles"] == 3
        assert row["nfe"] == 3 * 3 * 2 and row["wall_s"] > 0
        assert row["steer_reward"] == max(row["steer_details"]["candidate_rewards"])
        assert (out / row["file"]).is_file()
