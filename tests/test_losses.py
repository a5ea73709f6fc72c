"""Every loss against a hand-built reference: the pure functions of ``vialign.losses`` on fixed tensors,
and each reward-gradient algorithm's parameter gradient against autograd through the same chain written
out by hand (DRaFT-LV's estimator, DRaFT+'s KL term, ReFL's one-step x0), on a tiny SD3 with random LoRA."""

from __future__ import annotations

import math

import pytest
import torch

import pipelines
import rewards
from pipelines.prediction import convert_prediction
from vialign import losses
from vialign.algorithms import TrainingContext
from vialign.algorithms.adjoint_matching import memoryless_sampler, regression_loss
from vialign.algorithms.draft import DRaFT, DraftSettings
from vialign.algorithms.refl import ReFL, ReFLSettings
from vialign.config import TrainSamplerConfig
from vialign.data import prompts_for_step
from vialign.sampling import rollout_prompts

SIZE, STEPS = 32, 3
PROMPTS = ["a red square", "a blue circle"]


# ---------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_denoising_target_is_what_the_converter_inverts(prediction_type):
    """The target at x = alpha x0 + sigma eps, read back by the sampler's own converter, is (x0, eps)."""
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    sigma = torch.tensor([0.3, 0.6, 0.9])
    alpha = 1 - sigma if prediction_type == "flow" else (1 - sigma**2).sqrt()
    x = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    target = losses.denoising_target(prediction_type, x0, eps, alpha, sigma)
    back = convert_prediction(target, x, alpha, sigma, prediction_type)
    torch.testing.assert_close(back.x0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.eps, eps, rtol=1e-5, atol=1e-5)
    output = target + 0.1
    assert losses.denoising_loss(output, prediction_type, x0, eps, alpha, sigma) == pytest.approx(
        0.01, rel=1e-4
    )


def test_denoising_target_rejects_an_unknown_prediction_type():
    with pytest.raises(ValueError, match="unknown prediction type 'x1'"):
        losses.denoising_target("x1", torch.zeros(1), torch.zeros(1), 1.0, 0.0)


def test_reward_loss_renoise_and_output_kl_by_hand():
    scores = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    transform = rewards.LossTransform("hinge", margin=1.0)
    loss = losses.reward_loss(scores, transform, scale=1e-3, count=6)
    assert float(loss.detach()) == pytest.approx(1e-3 * (0.5 + 2.0 + 0.0) / 6)
    loss.backward()
    torch.testing.assert_close(scores.grad, torch.tensor([-1e-3 / 6, -1e-3 / 6, 0.0]))
    x, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    torch.testing.assert_close(losses.renoise(x, noise, 0.8, 0.6), torch.full((2, 1, 2, 2), 0.8 + 1.2))
    output = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    reference = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    kl = losses.output_kl(output, reference)
    torch.testing.assert_close(kl, torch.tensor([(0 + 1 + 4 + 9) / 4, 4 / 4]))
    kl.sum().backward()  # d/d output of mean (o - r)^2 = 2 (o - r) / D
    torch.testing.assert_close(output.grad, 2 * (output.detach() - reference) / 4)


def test_quantile_threshold_and_clipping():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    first = losses.quantile_threshold(values, 0.9, None, 0.9)
    assert first == pytest.approx(float(torch.quantile(values, 0.9)))  # 7.6: linear interpolation
    assert first == pytest.approx(4 + 0.6 * 6)
    second = losses.quantile_threshold(values * 2, 0.9, first, 0.9)
    assert second == pytest.approx(0.9 * first + 0.1 * 2 * first)
    assert losses.quantile_threshold(values * 2, 0.9, first, 0.0) == pytest.approx(2 * first)
    per_sample = values.clone().requires_grad_(True)
    per_sample.clamp(max=first).sum().backward()  # the clipped outlier carries no gradient
    torch.testing.assert_close(per_sample.grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))


class LinearVelocity:
    """A closed-form flow 'model': v(x) = theta * x, theta a scalar parameter."""

    prediction_type, kind = "flow", "flow"

    def __init__(self, theta: float):
        self.theta = torch.nn.Parameter(torch.tensor(theta))
        self.device = torch.device("cpu")

    def predict(self, x, t, cond, guidance=None, uncond=None):
        return self.theta * x


def test_adjoint_matching_regression_with_a_closed_form_model():
    """Memoryless Flow-SDE step (a = sqrt 2) of v = theta x: mu = x + h [theta x + c (x + (1 - s) theta x)]
    with h = s' - s, c = g^2 / (2 s), g^2 = 2 s / (1 - s); the loss |(mu - mu_base) / std + std a|^2 is
    quadratic in theta, with a gradient written out by hand."""
    schedule = pipelines.load_pipeline("tiny-sd3", device="cpu").schedule(4, SIZE, SIZE)
    sampler = memoryless_sampler("flow")
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 5, 3, 2, 2, generator=generator)
    adjoints = torch.randn(2, 5, 3, 2, 2, generator=generator)
    model, base = LinearVelocity(0.7), LinearVelocity(0.2)

    def reference():  # the base model in place of the fine-tuned one
        class Swap:
            def __enter__(self):
                self.saved = model.theta.data.clone()
                model.theta.data.copy_(base.theta.data)

            def __exit__(self, *exc):
                model.theta.data.copy_(self.saved)

        return Swap()

    steps = [1, 2]
    per_sample = regression_loss(
        model, schedule, sampler, latents, adjoints, steps, None, None, None, reference
    )
    (grad,) = torch.autograd.grad(per_sample.sum(), model.theta)
    expected, expected_grad = torch.zeros(2), torch.tensor(0.0)
    for k in steps:
        s, s_next = float(schedule.sigmas[k]), float(schedule.sigmas[k + 1])
        h = s_next - s
        g2 = 2.0 * s / (1 - s)
        c = g2 / (2 * s)
        std = math.sqrt(g2) * math.sqrt(-h)
        x = latents[:, k]
        slope = h * x * (1 + c * (1 - s))  # d mu / d theta
        residual = (0.7 - 0.2) * slope / std + std * adjoints[:, k + 1]
        expected += residual.square().flatten(1).sum(1) / len(steps)
        expected_grad += (2 * residual * slope / std).sum() / len(steps)
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- algorithms vs autograd by hand


def _context(kind: str = "shapeworld") -> tuple[TrainingContext, list[torch.nn.Parameter], list]:
    """A TrainingContext on a tiny model with random LoRA weights; its optimizer_step records the
    gradients instead of stepping."""
    adapter = pipelines.load_pipeline(kind, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter.add_lora(4, 4.0, None)
        params = adapter.lora_parameters()
        with torch.no_grad():
            for param in params:
                param.normal_(0, 0.1)
    recorded: list = []

    def record(step: int) -> float:
        recorded.append([p.grad.detach().clone() for p in params])
        for p in params:
            p.grad = None
        return 0.0

    context = TrainingContext(
        adapter=adapter,
        reward=rewards.combine({"brightness": 1.0}),
        reward_weights={"brightness": 1.0},
        prompts=PROMPTS,
        seed=3,
        num_steps=STEPS,
        height=SIZE,
        width=SIZE,
        guidance=adapter.make_guidance(1.0),
        sampling=TrainSamplerConfig(),
        reference=adapter.lora_disabled,
        optimizer_step=record,
    )
    return context, params, recorded


def _grads(loss: torch.Tensor, params) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))


def _assert_grads_equal(actual, expected):
    assert any(float(e.abs().max()) > 0 for e in expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-7)


def _step_prompts(context) -> list[str]:
    """The prompts of training step 1, in the order the algorithm draws them."""
    return prompts_for_step(PROMPTS, 1, len(PROMPTS), context.seed)


def _rollout(context, step: int):
    with torch.no_grad():
        return rollout_prompts(
            context.adapter,
            _step_prompts(context),
            [context.sample_seed(step, g) for g in range(len(PROMPTS))],
            context.schedule,
            height=SIZE,
            width=SIZE,
            guidance=context.guidance,
        )


def test_draft_lv_gradient_is_the_mean_over_renoised_last_steps(quiet_libraries):
    context, params, recorded = _context()
    settings = DraftSettings(prompts_per_step=2, micro_batch_size=2, lv_samples=3, loss_scale=2.0)
    DRaFT(settings, context).step(1)
    adapter, schedule, last = context.adapter, context.schedule, STEPS - 1
    final = _rollout(context, 1).latents[:, -1]
    loss = 0.0
    for repeat in range(
        3
    ):  # x'_{N-1} = alpha x_N + sigma eps_j, one flow Euler step with grad, decode, score
        generator = torch.Generator().manual_seed(context.sample_seed(1, 2**41 + 0 * 64 + repeat))
        eps = torch.randn(final.shape, generator=generator)
        x = schedule.alphas[last] * final + schedule.sigmas[last] * eps
        v = adapter.predict(x, schedule.timesteps[last], adapter.encode_prompt(_step_prompts(context)))
        x_next = x + (schedule.sigmas[last + 1] - schedule.sigmas[last]) * v
        brightness = context.reward(adapter.decode(x_next), _step_prompts(context)).score
        loss = loss + 2.0 * (-brightness).sum() / (2 * 3)
    _assert_grads_equal(recorded[0], _grads(loss, params))


def test_draft_plus_gradient_adds_the_window_kl(quiet_libraries):
    context, params, recorded = _context()
    settings = DraftSettings(prompts_per_step=2, micro_batch_size=2, grad_steps=2, kl_coeff=0.7)
    DRaFT(settings, context).step(1)
    adapter, schedule = context.adapter, context.schedule
    states, cond = _rollout(context, 1).latents, adapter.encode_prompt(_step_prompts(context))
    x = states[:, STEPS - 2]
    kl = torch.zeros(2)
    for k in (STEPS - 2, STEPS - 1):  # the last K = 2 steps with grad, and the KL at the stored states
        v = adapter.predict(x, schedule.timesteps[k], cond)
        stored = states[:, k]
        policy = adapter.predict(stored, schedule.timesteps[k], cond)
        with torch.no_grad(), adapter.lora_disabled():
            ref = adapter.predict(stored, schedule.timesteps[k], cond)
        kl = kl + (policy - ref).square().flatten(1).mean(1)
        x = x + (schedule.sigmas[k + 1] - schedule.sigmas[k]) * v
    brightness = context.reward(adapter.decode(x), _step_prompts(context)).score
    loss = (-brightness).sum() / 2 + 0.7 * (kl / 2).sum() / 2
    _assert_grads_equal(recorded[0], _grads(loss, params))
    # the KL part alone: its gradient is 2 coeff (f - f_ref) df/dtheta, not zero at random LoRA weights
    assert any(float(g.abs().max()) > 0 for g in _grads(0.7 * (kl / 2).sum() / 2, params) if g is not None)


@pytest.mark.parametrize("kind", ["shapeworld", "shapeworld-unet"], ids=["flow", "epsilon"])
def test_refl_gradient_is_the_one_step_x0_loss(kind, quiet_libraries):
    context, params, recorded = _context(kind)
    settings = ReFLSettings(prompts_per_step=2, micro_batch_size=2, steps=(1, 1), loss_scale=1e-3)
    ReFL(settings, context).step(1)
    adapter, schedule, s = context.adapter, context.schedule, 1
    x = _rollout(context, 1).latents[:, s]  # the ODE down to step s, no grad
    output = adapter.predict(x, schedule.timesteps[s], adapter.encode_prompt(_step_prompts(context)))
    alpha, sigma = schedule.alphas[s], schedule.sigmas[s]
    x0 = x - sigma * output if kind == "shapeworld" else (x - sigma * output) / alpha  # flow: v; SD: eps
    brightness = context.reward(adapter.decode(x0), _step_prompts(context)).score
    loss = 1e-3 * (-brightness).sum() / 2
    _assert_grads_equal(recorded[0], _grads(loss, params))
