"""Rollouts on tiny real models: stored trajectories re-score exactly (ratio 1) in any micro-batch, and
per-step checkpointing gives the same gradients as the plain chain."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pipelines
from vialign.sampling import Sampler, rollout_prompts, trajectory_log_probs

PROMPTS = ["a red square", "a blue circle on the left", "a small green triangle", "a photo of a cat"]
SIZE = 64


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = pipelines.load_pipeline(name, device="cpu")
        return cache[name]

    return get


def _rollout(adapter, sampler, *, num_steps=4, guidance_scale=3.0, prompts=PROMPTS, seed=0, **options):
    schedule = adapter.schedule(num_steps, SIZE, SIZE)
    seeds = [seed + i for i in range(len(prompts))]
    guidance = adapter.make_guidance(guidance_scale)
    return rollout_prompts(
        adapter,
        prompts,
        seeds,
        schedule,
        height=SIZE,
        width=SIZE,
        guidance=guidance,
        sampler=sampler,
        **options,
    )


@pytest.mark.parametrize(
    "model,sampler",
    [
        ("tiny-sd3", Sampler(sde="flow-sde")),
        ("tiny-sd3", Sampler(sde="dance-sde")),
        ("tiny-flux", Sampler(sde="cps", sde_window=(0, 3))),
        ("tiny-sd", Sampler(sde="ddim", noise_level=1.0)),
        ("tiny-sdxl", Sampler(sde="ddim", noise_level=0.7, sde_window=(1, 3))),
    ],
    ids=["sd3-flow-sde", "sd3-dance-sde", "flux-cps", "sd-ddim", "sdxl-ddim-window"],
)
def test_rescoring_a_trajectory_gives_ratio_exactly_one_in_any_micro_batch(adapters, model, sampler):
    adapter = adapters(model)
    trajectory = _rollout(adapter, sampler, model_batch_size=2)
    stochastic = torch.nonzero(trajectory.stochastic).flatten().tolist()
    assert stochastic == list(range(*(sampler.sde_window or (0, 4))))
    recorded = trajectory.log_probs[:, stochastic]
    assert torch.isfinite(recorded).all() and (recorded != 0).all()
    for micro_batch in (1, 2, 3, len(PROMPTS)):
        with torch.no_grad():
            rescored = torch.cat(
                [
                    trajectory_log_probs(
                        adapter,
                        trajectory.select(range(i, min(i + micro_batch, len(PROMPTS)))),
                        model_batch_size=2,
                    )
                    for i in range(0, len(PROMPTS), micro_batch)
                ]
            )
        ratio = torch.exp(rescored - recorded)
        assert torch.equal(rescored, recorded), (
            f"micro-batch {micro_batch}: max |ratio - 1| = {(ratio - 1).abs().max()}"
        )


def test_trajectory_records_every_state_and_matches_its_final(adapters):
    adapter = adapters("tiny-sd3")
    trajectory = _rollout(adapter, Sampler(sde="flow-sde", sde_window=(1, 3)))
    assert trajectory.latents.shape == (4, 5, 4, 8, 8)
    assert torch.equal(trajectory.latents[:, -1], trajectory.final)
    assert trajectory.stochastic.tolist() == [False, True, True, False]
    assert (trajectory.log_probs[:, [0, 3]] == 0).all()
    with pytest.raises(ValueError, match="deterministic"):
        trajectory_log_probs(adapter, trajectory, steps=[0])


def test_sde_samples_do_not_depend_on_the_batch(adapters):
    """Sample i draws all its noise from its own generator: alone or in a batch, the same chain."""
    adapter = adapters("tiny-sd3")
    together = _rollout(adapter, Sampler(sde="flow-sde"), model_batch_size=1)
    alone = _rollout(adapter, Sampler(sde="flow-sde"), model_batch_size=1, prompts=PROMPTS[2:3], seed=2)
    assert torch.equal(together.latents[2:3], alone.latents)
    assert torch.equal(together.log_probs[2:3], alone.log_probs)


def _chain_gradients(
    adapter, sampler, checkpoint, grad_steps: int, backward_mode=None
) -> dict[str, torch.Tensor]:
    adapter.denoiser.zero_grad(set_to_none=True)
    trajectory = _rollout(
        adapter, sampler, num_steps=5, grad_steps=grad_steps, checkpoint=checkpoint, prompts=PROMPTS[:2]
    )
    pixels = adapter.decode(trajectory.final, checkpoint=False)
    weights = torch.linspace(-1, 1, pixels.numel()).reshape(pixels.shape)  # a loss that touches every pixel
    with backward_mode or contextlib.nullcontext():
        (pixels * weights).sum().backward()
    return {n: p.grad.clone() for n, p in adapter.denoiser.named_parameters() if p.grad is not None}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it (here: during the backward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "model,sampler",
    [("tiny-sd", Sampler(sde="ddim", noise_level=1.0)), ("tiny-sd3", Sampler(sde="flow-sde"))],
    ids=["unet", "flow"],
)
@pytest.mark.parametrize("grad_steps", [1, 5])
def test_checkpointed_chain_gives_the_plain_chains_gradients(adapters, model, sampler, grad_steps):
    adapter = pipelines.load_pipeline(model, device="cpu")  # a fresh copy: this test trains the weights
    for param in adapter.denoiser.parameters():
        param.requires_grad_(True)
    plain = _chain_gradients(adapter, sampler, checkpoint=False, grad_steps=grad_steps)
    checkpointed = _chain_gradients(adapter, sampler, checkpoint=True, grad_steps=grad_steps)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(adapter.denoiser.parameters()))
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-6, msg=name)


def _graph_nodes(output: torch.Tensor) -> int:
    """How many autograd nodes the backward of ``output`` would visit."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_checkpointed_forward_records_no_graph_inside_a_step(adapters, model):
    """``checkpoint=True`` runs each step's first forward without recording its graph (the recompute
    records it): the chain's graph is a few nodes a step, where the plain chain's holds every op."""
    adapter = pipelines.load_pipeline(model, device="cpu")
    for param in adapter.denoiser.parameters():
        param.requires_grad_(True)
    sampler = Sampler(sde="ddim" if adapter.kind == "diffusion" else "flow-sde")
    nodes = {
        mode: _graph_nodes(
            _rollout(adapter, sampler, num_steps=5, grad_steps=4, checkpoint=mode, prompts=PROMPTS[:2]).final
        )
        for mode in (False, True, "selective")
    }
    assert nodes[True] <= 4 * 4, nodes  # a step: the checkpoint's node, its input's leaf, the copy of x
    assert nodes[False] > 100 * 4 and nodes["selective"] > 100 * 4, nodes  # whole graphs, every op a node


def test_checkpointed_chain_is_differentiated_by_backward_and_selective_by_autograd_grad():
    """``checkpoint=True`` (reentrant) gives its gradient to ``backward()`` only: the weights are not in the
    chain's recorded graph, so ``autograd.grad`` with respect to them is refused (torch's error);
    ``"selective"`` (non-reentrant) serves ``autograd.grad``, with the same values as the backward."""
    adapter = pipelines.load_pipeline("tiny-sd3", device="cpu")
    params = list(adapter.denoiser.parameters())
    for param in params:
        param.requires_grad_(True)
    sampler = Sampler(sde="flow-sde")
    full = _rollout(adapter, sampler, grad_steps=2, checkpoint=True, prompts=PROMPTS[:1])
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(full.final.sum(), params)
    full = _rollout(adapter, sampler, grad_steps=2, checkpoint=True, prompts=PROMPTS[:1])
    full.final.sum().backward()
    selective = _rollout(adapter, sampler, grad_steps=2, checkpoint="selective", prompts=PROMPTS[:1])
    grads = torch.autograd.grad(selective.final.sum(), params)
    assert any(g.abs().sum() > 0 for g in grads)
    for param, grad in zip(params, grads):
        torch.testing.assert_close(grad, param.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_selective_recompute_gives_the_plain_gradients_without_recomputing_products(model):
    """``checkpoint="selective"``: the backward pass re-runs none of the forward's convolutions or matrix
    products (full recompute re-runs every one of them) and the gradients equal the plain chain's."""
    adapter = pipelines.load_pipeline(model, device="cpu")
    for param in adapter.denoiser.parameters():
        param.requires_grad_(True)
    sampler = Sampler(sde="ddim" if adapter.kind == "diffusion" else "flow-sde")
    counters = {mode: _OpCounter() for mode in (False, True, "selective")}
    grads = {
        mode: _chain_gradients(adapter, sampler, mode, grad_steps=5, backward_mode=counter)
        for mode, counter in counters.items()
    }
    products = ("convolution", "mm", "addmm", "bmm", "baddbmm")
    recomputed = {mode: sum(c.counts[op] for op in products) for mode, c in counters.items()}
    with _OpCounter() as forward:
        with torch.no_grad():
            _rollout(adapter, sampler, num_steps=5, prompts=PROMPTS[:2])
    forward_products = sum(forward.counts[op] for op in products)
    assert forward_products > 0
    # the plain backward runs products of its own (a linear layer's gradients are matrix products)
    # full recompute re-runs each forward; its window's first input is given requires_grad, which costs at
    # most one product more (a linear input layer's input gradient; a convolution's comes in the same op)
    assert 0 <= recomputed[True] - recomputed[False] - forward_products <= 1, (
        "full recompute re-runs each forward"
    )
    assert recomputed["selective"] == recomputed[False], "selective recompute re-runs none of them"
    for name in grads[False]:
        torch.testing.assert_close(
            grads["selective"][name], grads[False][name], rtol=1e-6, atol=1e-6, msg=name
        )


def test_unknown_checkpoint_mode_is_refused(adapters):
    with pytest.raises(ValueError, match="selective"):
        _rollout(adapters("tiny-sd3"), Sampler(), num_steps=2, grad_steps=1, checkpoint="sometimes")


def test_no_grad_steps_keep_no_graph(adapters):
    adapter = adapters("tiny-sd3")
    trajectory = _rollout(adapter, Sampler(), grad_steps=0)
    assert not trajectory.final.requires_grad
    with pytest.raises(ValueError, match="grad_steps"):
        _rollout(adapter, Sampler(), num_steps=3, grad_steps=4)


def test_low_precision_models_keep_float32_step_math():
    """bf16 denoiser, fp32 states and log-probs; LoRA master weights stay fp32."""
    adapter = pipelines.load_pipeline("tiny-sd3", device="cpu", dtype="bfloat16")
    assert adapter.denoiser.dtype == torch.bfloat16
    trajectory = _rollout(adapter, Sampler(sde="flow-sde"), model_batch_size=2)
    assert trajectory.latents.dtype == torch.float32 and trajectory.log_probs.dtype == torch.float32
    assert torch.isfinite(trajectory.log_probs).all()
    with torch.no_grad():
        rescored = trajectory_log_probs(adapter, trajectory.select([1]), model_batch_size=2)
    assert torch.equal(rescored, trajectory.log_probs[1:2])
    adapter.add_lora(rank=2)
    assert {p.dtype for p in adapter.lora_parameters()} == {torch.float32}
    with torch.no_grad():
        with_lora = trajectory_log_probs(adapter, trajectory.select([1]), model_batch_size=2)
    assert torch.equal(with_lora, rescored)  # LoRA B starts at zero: same policy, bitwise
    pixels = adapter.decode(trajectory.final)
    assert pixels.dtype == torch.float32 and pixels.shape == (4, 3, SIZE, SIZE)


def test_flux_needs_its_guidance_embedding(adapters):
    adapter = adapters("tiny-flux")
    cond = adapter.encode_prompt(["a cat"])
    with pytest.raises(ValueError, match="guidance embedding"):
        adapter.predict(torch.zeros(1, 4, 8, 8), 500.0, cond, pipelines.Guidance())
