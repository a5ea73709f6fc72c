"""``model.compile``: the denoiser runs ``torch.compile``d where no gradient is taken (rollouts, sampling,
evaluation) and eager under autograd; each module swapped into ``adapter.denoiser`` gets its own twin."""

from __future__ import annotations

import pytest
import torch

from vialign.config import ModelConfig
from vialign.sample import load_model
from vialign.sampling import Sampler, rollout_prompts, trajectory_log_probs

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture
def compiled_calls(monkeypatch):
    """torch.compile with the ``eager`` backend (dynamo traces, nothing is code-generated: seconds on
    CPU), recording what it was asked to compile and how often each compiled twin runs."""
    real = torch.compile
    record = {"compiled": [], "options": [], "calls": 0}

    def spy(module, **options):
        record["compiled"].append(module)
        record["options"].append(options)
        twin = real(module, backend="eager")

        def call(*args, **kwargs):
            record["calls"] += 1
            return twin(*args, **kwargs)

        return call

    monkeypatch.setattr(torch, "compile", spy)
    return record


def rollout(adapter):
    schedule = adapter.schedule(3, 32, 32)
    return rollout_prompts(
        adapter,
        PROMPTS,
        [0, 1],
        schedule,
        height=32,
        width=32,
        guidance=adapter.make_guidance(3.0),
        sampler=Sampler(sde="flow-sde"),
    )


def test_compiled_rollouts_equal_eager_and_training_stays_eager(tiny_dir, compiled_calls, quiet_libraries):
    eager = load_model(ModelConfig(path=tiny_dir("sd3"), device="cpu"))
    adapter = load_model(
        ModelConfig(path=tiny_dir("sd3"), device="cpu", compile=True, compile_mode="default")
    )
    assert compiled_calls["compiled"] == []  # compiled on first use, not at load
    with torch.no_grad():
        expected, got = rollout(eager), rollout(adapter)
    assert compiled_calls["compiled"] == [adapter.denoiser] and compiled_calls["options"] == [
        {"mode": "default"}
    ]
    assert compiled_calls["calls"] == 3 * 1  # 3 steps, one CFG-batched call each
    torch.testing.assert_close(got.final, expected.final, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.log_probs, expected.log_probs, rtol=0, atol=1e-4)

    calls = compiled_calls["calls"]
    adapter.add_lora(4, 4.0)
    with torch.enable_grad():  # a training pass: the module itself, so gradients and checkpointing are eager
        log_probs = trajectory_log_probs(adapter, got)
    assert compiled_calls["calls"] == calls and log_probs.requires_grad
    torch.testing.assert_close(log_probs.detach(), got.log_probs, rtol=0, atol=1e-4)  # LoRA B starts at 0

    reference = type(adapter.denoiser).from_config(adapter.denoiser_config).eval()  # e.g. a reference model
    original, adapter.denoiser = adapter.denoiser, reference
    with torch.no_grad():
        rollout(adapter)
    adapter.denoiser = original
    with torch.no_grad():
        rollout(adapter)
    assert compiled_calls["compiled"] == [original, reference]  # one twin each, the first one reused


def test_compile_is_off_by_default_and_a_sample_flag(tiny_dir, compiled_calls, quiet_libraries):
    from vialign.cli import build_parser

    adapter = load_model(ModelConfig(path=tiny_dir("sd3"), device="cpu"))
    with torch.no_grad():
        rollout(adapter)
    assert compiled_calls["compiled"] == [] and adapter.compile_options is None
    args = build_parser().parse_args(["sample", "--prompt", "a red square", "--compile"])
    assert args.compile is True
