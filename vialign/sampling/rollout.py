"""Rollouts: run a sampler over a batch and record the trajectory; re-score a stored trajectory.

``rollout`` is the one sampling loop in vialign. It records every state x_0 ... x_N and the exact
log-probs of the stochastic steps (what GRPO needs), and can keep gradients through the last K
steps with per-step activation checkpointing (what DRaFT / AlignProp need). ``trajectory_log_probs``
recomputes the log-probs of stored transitions under the current weights.

Exact ratios. A denoiser's output for one sample changes in the last bits with the batch it is
computed in (matrix kernels block differently for different batch sizes; measured ~1e-6 on CPU), and
summed over thousands of latent dimensions that moves a log-prob by more than GRPO's clip range can
absorb. With ``model_batch_size=m`` every denoiser call sees exactly ``m`` samples: batches are cut
into chunks of ``m`` and the last chunk is padded with copies of its last sample. The same sample then
gives bitwise the same log-prob whatever micro-batch it is re-scored in (1, 2, or the whole batch).
Choose ``m`` = the training micro-batch size; smaller micro-batches waste the padded rows.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.embeds import PromptEmbeds
from pipelines.schedules import Schedule
from vialign.errors import VialignInputError
from vialign.sampling.gaussian import StepOutput
from vialign.sampling.sampler import Sampler, sampler_step

Generators = torch.Generator | Sequence[torch.Generator] | None
Checkpoint = bool | Literal["selective"]

# Selective recompute keeps the outputs of these ops (the matrix products, convolutions and attention:
# most of a step's FLOPs, about a third of its saved activations) and recomputes the rest (norms,
# activations, additions: cheap to recompute, and most of what a plain backward stores).
_KEPT_OPS = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


@functools.cache
def _kept_ops() -> frozenset:
    return frozenset(
        getattr(torch.ops.aten, name).default for name in _KEPT_OPS if hasattr(torch.ops.aten, name)
    )


def _keep_products(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy:
    policy = torch.utils.checkpoint.CheckpointPolicy
    return policy.MUST_SAVE if op in _kept_ops() else policy.PREFER_RECOMPUTE


def _selective_contexts():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_keep_products)


def checkpointed(function: Callable[..., Any], *args: Any, mode: Checkpoint = True) -> Any:
    """``function(*args)`` with activation checkpointing: ``True`` recomputes the whole call in the
    backward pass (memory: its inputs only); ``"selective"`` keeps the outputs of matrix products,
    convolutions and attention and recomputes only the elementwise ops and norms between them (memory:
    about a third of a plain call's); ``False`` runs it plainly. Gradients are the same in every mode.

    ``True`` runs the first forward without recording a graph (torch's reentrant checkpoint): the
    non-reentrant one records the whole graph twice, once in the forward and once in the recompute, and
    where kernels are short (a GPU at small sizes) that bookkeeping is a large share of a forward's time
    (README, "Gradients through the chain"; ``benchmarks/gpu.py`` measures both).
    The gradient it gives reaches the weights through ``loss.backward()``, as every vialign algorithm
    takes it; ``torch.autograd.grad`` through it raises torch's error. At least one input must require
    grad for the recompute to run at all, so when none does (the first step of a window after
    steps without grad) the first tensor input is given ``requires_grad``: its gradient is one extra
    product at the model's input, and nothing reads it."""
    if mode is False:
        return function(*args)
    if mode not in (True, "selective"):
        raise VialignInputError(f"checkpoint must be true, false or 'selective', got {mode!r}")
    if mode == "selective":
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False, context_fn=_selective_contexts
        )
    if not any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args):
        first = next(
            i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor) and arg.is_floating_point()
        )
        args = (*args[:first], args[first].detach().requires_grad_(True), *args[first + 1 :])
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)


class StepHook:
    """Steering inside :func:`rollout` (``vialign.steering``); the defaults change nothing.

    ``predict`` gives the model output step ``k`` uses at ``x`` (reward guidance moves it);
    ``resample`` sees x_{k+1} and the x0 prediction of step ``k`` and returns ancestor indices [B] (SMC)
    or None. ``rollout`` then re-indexes the samples, their recorded states and log-probs, so every row
    of the trajectory stays one particle's ancestral path.
    """

    def predict(self, k: int, x: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return model(x)

    def resample(self, k: int, x_next: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor | None:
        return None


@dataclass
class Trajectory:
    """A batch of sampled chains, everything needed to re-score or continue them."""

    latents: torch.Tensor  # [B, N+1, *latent] float32: x_0 (noise) ... x_N (sample); detached
    log_probs: (
        torch.Tensor
    )  # [B, N] float32: log p(x_{k+1} | x_k), summed over latent dims; 0 where not stochastic
    stochastic: torch.Tensor  # [N] bool: steps that drew noise
    final: torch.Tensor  # [B, *latent] x_N; carries the graph of the gradient steps, if any
    schedule: Schedule
    sampler: Sampler
    cond: PromptEmbeds  # [B] the prompts' embeddings (a reference, not a copy)
    uncond: PromptEmbeds | None  # [B] unconditional embeddings when CFG was on
    guidance: Guidance

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> Trajectory:
        """The sub-batch ``index`` (a micro-batch for training)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            final=self.final[index],
            cond=self.cond[index],
            uncond=None if self.uncond is None else self.uncond[index],
        )


def draw_noise(generator: Generators, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Standard normal noise; a list of generators draws sample i from generator i, so each sample's
    noise does not depend on the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise VialignInputError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]).to(
            device
        )
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source).to(device)


def _step_once(
    adapter, schedule, sampler, k, x, cond, uncond, guidance, stochastic, noise, prev, hook=None
) -> StepOutput:
    def model(x_in: torch.Tensor) -> torch.Tensor:
        return adapter.predict(x_in, schedule.timesteps[k], cond, guidance, uncond)

    output = model(x) if hook is None else hook.predict(k, x, model)
    return sampler_step(
        sampler,
        schedule,
        k,
        x,
        output,
        adapter.prediction_type,
        stochastic=stochastic,
        noise=noise,
        prev=prev,
    )


def evaluate_step(
    adapter: GeneratorAdapter,
    schedule: Schedule,
    sampler: Sampler,
    k: int,
    x: torch.Tensor,
    cond: PromptEmbeds,
    *,
    guidance: Guidance,
    uncond: PromptEmbeds | None = None,
    stochastic: bool,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    model_batch_size: int | None = None,
    hook: StepHook | None = None,
) -> StepOutput:
    """Step ``k`` for a batch; with ``model_batch_size`` every denoiser call has exactly that many rows.
    ``hook.predict`` (whole batch only) replaces the model call."""
    batch = x.shape[0]
    if model_batch_size is None:
        return _step_once(
            adapter, schedule, sampler, k, x, cond, uncond, guidance, stochastic, noise, prev, hook
        )
    if hook is not None:
        raise VialignInputError("a steering hook runs on the whole batch: leave model_batch_size unset")
    if model_batch_size < 1:
        raise VialignInputError(f"model_batch_size must be >= 1, got {model_batch_size}")
    parts: list[StepOutput] = []
    for start in range(0, batch, model_batch_size):
        index = torch.arange(start, min(start + model_batch_size, batch), device=x.device)
        size = index.shape[0]
        if size < model_batch_size:  # pad with copies of the last row: same call shape, rows dropped below
            index = torch.cat([index, index[-1:].expand(model_batch_size - size)])
        out = _step_once(
            adapter,
            schedule,
            sampler,
            k,
            x[index],
            cond[index.cpu()],
            None if uncond is None else uncond[index.cpu()],
            guidance,
            stochastic,
            None if noise is None else noise[index],
            None if prev is None else prev[index],
        )
        parts.append(
            StepOutput(
                x_next=out.x_next[:size],
                mean=out.mean[:size],
                std=out.std[:size] if out.std.ndim else out.std,
                log_prob=None if out.log_prob is None else out.log_prob[:size],
                x0=None if out.x0 is None else out.x0[:size],
            )
        )
    std = torch.cat([p.std for p in parts]) if parts[0].std.ndim else parts[0].std
    return StepOutput(
        x_next=torch.cat([p.x_next for p in parts]),
        mean=torch.cat([p.mean for p in parts]),
        std=std,
        log_prob=None if parts[0].log_prob is None else torch.cat([p.log_prob for p in parts]),
        x0=None if parts[0].x0 is None else torch.cat([p.x0 for p in parts]),
    )


def rollout(
    adapter: GeneratorAdapter,
    cond: PromptEmbeds,
    latents: torch.Tensor,
    schedule: Schedule,
    *,
    sampler: Sampler = Sampler(),
    guidance: Guidance = Guidance(),
    uncond: PromptEmbeds | None = None,
    generator: Generators = None,
    grad_steps: int = 0,
    checkpoint: Checkpoint = True,
    model_batch_size: int | None = None,
    offload: bool = False,
    stop: int | None = None,
    progress: bool = False,
    hook: StepHook | None = None,
) -> Trajectory:
    """Sample a batch from ``latents`` (x_0) along ``schedule`` and record the trajectory.

    Args:
        cond, uncond: prompt embeddings, one row per sample (``uncond`` when ``guidance`` uses CFG).
        latents: x_0, e.g. ``adapter.initial_latents(...)``.
        sampler: ODE, or an SDE on a window of steps.
        generator: source of the SDE noise: one generator, or one per sample (batch-independent draws).
        grad_steps: the last ``grad_steps`` steps keep gradients w.r.t. the model's trainable weights
            (0: none, N: the whole chain); ``trajectory.final`` then carries the graph.
        checkpoint: recompute each gradient step's activations in the backward pass instead of storing
            them (memory ~ one step instead of ``grad_steps`` steps; gradients are identical). Take that
            gradient with ``loss.backward()``: ``torch.autograd.grad`` needs ``"selective"`` or ``False``
            (see :func:`checkpointed`);
            ``"selective"`` keeps each step's matrix-product/convolution/attention outputs and recomputes
            the rest (see :func:`checkpointed`: memory grows with ``grad_steps`` again, by about a third of
            a plain step's, for a cheaper backward).
        model_batch_size: fixed denoiser batch for bitwise batch-invariant log-probs (module docstring).
        offload: keep the tensors the backward pass needs in CPU memory (``torch.autograd.graph.save_on_cpu``).
        stop: run steps 0 .. stop-1 only (ReFL stops part-way); ``final`` is then x_stop and ``latents``
            holds x_0 .. x_stop. Default: every step.
        progress: show a progress bar over steps.
        hook: a :class:`StepHook` (steering: reward guidance, SMC resampling).
    """
    batch, num_steps = latents.shape[0], schedule.num_steps
    sampler.check(schedule)
    stop = num_steps if stop is None else stop
    if len(cond) != batch:
        raise VialignInputError(f"{len(cond)} prompt embeddings for {batch} initial latents")
    if not 0 <= stop <= num_steps:
        raise VialignInputError(f"stop must be between 0 and the {num_steps} steps, got {stop}")
    if not 0 <= grad_steps <= stop:
        raise VialignInputError(f"grad_steps must be between 0 and the {stop} steps run, got {grad_steps}")
    if guidance.uses_uncond and uncond is None:
        raise VialignInputError(
            f"guidance with cfg_scale={guidance.cfg_scale} needs unconditional embeddings"
        )
    stochastic = sampler.stochastic_steps(num_steps)
    x = latents.float()
    states, log_probs = [x.detach()], torch.zeros(batch, num_steps, device=x.device)
    for k in tqdm(range(stop), disable=not progress, desc="sampling", leave=False):
        noise = draw_noise(generator, x.shape, x.device) if stochastic[k] else None

        def step(
            x_in: torch.Tensor, noise_in: torch.Tensor | None, k: int = k
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = evaluate_step(
                adapter,
                schedule,
                sampler,
                k,
                x_in,
                cond,
                guidance=guidance,
                uncond=uncond,
                stochastic=bool(stochastic[k]),
                noise=noise_in,
                model_batch_size=model_batch_size,
                hook=hook,
            )
            log_prob = out.log_prob if out.log_prob is not None else torch.zeros(batch, device=x_in.device)
            return out.x_next, log_prob, out.x0

        if k >= stop - grad_steps:
            saved = torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext()
            with torch.enable_grad(), saved:
                x, log_prob, x0_hat = checkpointed(step, x, noise, mode=checkpoint)
        else:
            with torch.no_grad():
                x, log_prob, x0_hat = step(x, noise)
        states.append(x.detach())
        log_probs[:, k] = log_prob.detach()
        if hook is not None:
            ancestors = hook.resample(k, x.detach(), x0_hat.detach())
            if ancestors is not None:
                ancestors = ancestors.to(x.device)
                x, log_probs = x[ancestors], log_probs[ancestors]
                states = [state[ancestors] for state in states]
    return Trajectory(
        latents=torch.stack(states, dim=1),
        log_probs=log_probs,
        stochastic=stochastic,
        final=x,
        schedule=schedule,
        sampler=sampler,
        cond=cond,
        uncond=uncond,
        guidance=guidance,
    )


def rollout_prompts(
    adapter: GeneratorAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    schedule: Schedule,
    *,
    height: int,
    width: int,
    guidance: Guidance,
    negative_prompt: str | None = None,
    initial_seeds: Sequence[int] | None = None,
    num_frames: int | None = None,
    **rollout_options: Any,
) -> Trajectory:
    """:func:`rollout` from prompts: encode them, draw sample i's initial and step noise from
    ``torch.Generator("cpu").manual_seed(seeds[i])`` (as the stock pipelines with a list of
    generators), and run. ``rollout_options`` are :func:`rollout`'s keyword arguments.

    ``initial_seeds``: sample i starts from the x_0 of ``initial_seeds[i]`` instead (samples sharing a
    seed share their x_0, as DanceGRPO's ``init_same_noise``); its step noise is the same as without.
    ``num_frames``: video models only, frames per video (default the model's); image models refuse it.
    """
    if len(prompts) != len(seeds):
        raise VialignInputError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if initial_seeds is not None and len(initial_seeds) != len(seeds):
        raise VialignInputError(f"{len(seeds)} seeds but {len(initial_seeds)} initial seeds")
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    cond = adapter.encode_prompt(prompts)
    uncond = adapter.uncond_embeds(len(prompts), negative_prompt) if guidance.uses_uncond else None
    latents = adapter.initial_latents(
        generators, len(prompts), height, width, schedule, num_frames=num_frames
    )
    if initial_seeds is not None:  # the own x_0 above was still drawn: the step noise stays the same
        shared = [torch.Generator("cpu").manual_seed(int(seed)) for seed in initial_seeds]
        latents = adapter.initial_latents(
            shared, len(prompts), height, width, schedule, num_frames=num_frames
        )
    return rollout(
        adapter,
        cond,
        latents,
        schedule,
        guidance=guidance,
        uncond=uncond,
        generator=generators,
        **rollout_options,
    )


def replay_step(
    adapter: GeneratorAdapter,
    trajectory: Trajectory,
    k: int,
    *,
    model_batch_size: int | None = None,
    guidance: Guidance | None = None,
) -> StepOutput:
    """Step ``k`` of stored transitions re-evaluated under the current weights: the step's mean, std and
    log p_theta(x_{k+1} | x_k) of the stored x_{k+1}. Gradients flow when grad mode is on. ``guidance``
    overrides the rollout's (e.g. training without CFG). Pass the rollout's ``model_batch_size`` for
    bitwise-equal log-probs."""
    if not bool(trajectory.stochastic[k]):
        raise VialignInputError(f"step {k} was deterministic (ODE) in this trajectory: no log-prob")
    guidance = trajectory.guidance if guidance is None else guidance
    return evaluate_step(
        adapter,
        trajectory.schedule,
        trajectory.sampler,
        k,
        trajectory.latents[:, k],
        trajectory.cond,
        guidance=guidance,
        uncond=trajectory.uncond if guidance.uses_uncond else None,
        stochastic=True,
        prev=trajectory.latents[:, k + 1],
        model_batch_size=model_batch_size,
    )


def trajectory_log_probs(
    adapter: GeneratorAdapter,
    trajectory: Trajectory,
    steps: Sequence[int] | None = None,
    *,
    model_batch_size: int | None = None,
    guidance: Guidance | None = None,
    per_dim: bool = False,
) -> torch.Tensor:
    """log p_theta(x_{k+1} | x_k) of the stored transitions under the current weights: [B, len(steps)].

    ``steps`` defaults to every stochastic step; ``per_dim`` divides by the number of latent
    dimensions; the other arguments are :func:`replay_step`'s.
    """
    stochastic_steps = [int(k) for k in torch.nonzero(trajectory.stochastic).flatten()]
    steps = stochastic_steps if steps is None else [int(k) for k in steps]
    deterministic_steps = [k for k in steps if k not in stochastic_steps]
    if deterministic_steps:
        raise VialignInputError(
            f"steps {deterministic_steps} were deterministic (ODE) in this trajectory: no log-prob"
        )
    columns = []
    for k in steps:
        out = replay_step(adapter, trajectory, k, model_batch_size=model_batch_size, guidance=guidance)
        columns.append(out.log_prob_per_dim if per_dim else out.log_prob)
    return torch.stack(columns, dim=1)
