"""Adapter pieces against independent references: stock diffusers' latents and schedules, hand-made
predictions, prompt caching, VAE round trip, CFG, loading errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipelines
from pipelines import PipelineInputError, PromptCache, PromptEmbeds, tiny
from pipelines.prediction import convert_prediction
from pipelines.schedules import schedule_from_scheduler

SIZE = 64


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = pipelines.load_pipeline(name, device="cpu")
        return cache[name]

    return get


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_convert_prediction_recovers_x0_and_eps(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    if prediction_type == "flow":
        alpha, sigma = torch.tensor([0.7, 0.2]), torch.tensor([0.3, 0.8])  # alpha = 1 - sigma
    else:
        alpha = torch.tensor([0.6, 0.8])
        sigma = (1 - alpha**2).sqrt()
    a, s = alpha[:, None], sigma[:, None]
    x = a * x0 + s * eps
    output = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0, "flow": eps - x0}[
        prediction_type
    ]
    pred = convert_prediction(output, x, alpha, sigma, prediction_type)
    torch.testing.assert_close(pred.x0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.eps, eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.velocity, eps - x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd-euler", "sdxl", "sd3", "flux"])
def test_initial_latents_are_drawn_as_diffusers_draws_them(adapters, family):
    adapter = adapters(f"tiny-{family}")
    pipe = tiny.build(family)
    schedule = adapter.schedule(5, SIZE, SIZE)
    generators = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    ours = adapter.initial_latents(generators(), 2, SIZE, SIZE, schedule)
    if family == "flux":
        packed, _ = pipe.prepare_latents(2, 4, SIZE, SIZE, torch.float32, "cpu", generators())
        theirs = pipelines.flux.unpack_latents(packed, SIZE // 8, SIZE // 8)
    else:
        channels = (
            pipe.unet.config.in_channels if hasattr(pipe, "unet") else pipe.transformer.config.in_channels
        )
        pipe.scheduler.set_timesteps(5)
        theirs = pipe.prepare_latents(2, channels, SIZE, SIZE, torch.float32, "cpu", generators())
        if family in (
            "sd-euler",
            "sdxl",
        ):  # diffusers keeps Euler's state in sigma space: x_VP = x_VE / sqrt(1 + s^2)
            theirs = theirs / (1 + pipe.scheduler.sigmas[0] ** 2).sqrt()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_flux_schedule_has_the_resolution_dependent_shift(adapters):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    adapter = adapters("tiny-flux")
    for size in (64, 256):
        schedule = adapter.schedule(8, size, size)
        tokens = (size // 16) ** 2
        reference = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
        reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=calculate_shift(tokens))
        assert torch.equal(schedule.sigmas, reference.sigmas.float())
        assert torch.equal(schedule.timesteps, reference.timesteps.float())
    assert not torch.equal(adapter.schedule(8, 64, 64).sigmas, adapter.schedule(8, 256, 256).sigmas)


def test_diffusion_schedules_are_variance_preserving(adapters):
    for name in ("tiny-sd", "tiny-sd-euler"):
        schedule = adapters(name).schedule(10, SIZE, SIZE)
        torch.testing.assert_close(
            schedule.alphas**2 + schedule.sigmas**2, torch.ones(11), rtol=1e-5, atol=1e-6
        )
        assert (schedule.alphas[1:] > schedule.alphas[:-1]).all()
    ddim = adapters("tiny-sd").schedule(10, SIZE, SIZE)
    assert ddim.timesteps.tolist() == [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    final = adapters("tiny-sd").scheduler.alphas_cumprod[0]  # set_alpha_to_one=False: ends at alpha_bar_0
    assert float(ddim.alphas[-1] ** 2) == pytest.approx(float(final), rel=1e-6)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_training_coefficients_match_the_sampling_schedule(adapters, name):
    """alpha_t, sigma_t at arbitrary training timesteps agree with the schedule at its own timesteps."""
    adapter = adapters(name)
    schedule = adapter.schedule(10, SIZE, SIZE)
    alpha, sigma = adapter.coefficients(schedule.timesteps)
    torch.testing.assert_close(alpha, schedule.alphas[:-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sigma, schedule.sigmas[:-1], rtol=1e-6, atol=1e-6)


def test_too_many_steps_is_a_clear_error(adapters):
    with pytest.raises(PipelineInputError, match="gives timestep 1000"):
        adapters("tiny-sd").schedule(1000, SIZE, SIZE)
    with pytest.raises(PipelineInputError, match="exceeds the model's 1000 training timesteps"):
        schedule_from_scheduler(adapters("tiny-sd").scheduler, 1001)
    with pytest.raises(PipelineInputError, match="positive integer"):
        adapters("tiny-sd3").schedule(0, SIZE, SIZE)


def test_prompt_cache_round_trip(adapters, tmp_path):
    """A cached row is the prompt encoded alone, bitwise, whatever was encoded before or beside it (a
    batched encoding moves in the last bits with the batch: a resumed run would not reproduce)."""
    adapter = adapters("tiny-sd3")
    prompts = ["a red square", "a blue circle", "a red square"]
    alone = {p: adapter._encode_prompts([p]) for p in prompts}
    fresh = PromptEmbeds.cat([alone[p] for p in prompts])
    adapter.prompt_cache = PromptCache(adapter.model_id)
    adapter.encode_prompt(["a blue circle", "a green triangle", "a white star"])  # other company first
    cached = adapter.encode_prompt(prompts)
    for name, tensor in fresh.items():
        assert torch.equal(cached.tensors[name], tensor)
    path = tmp_path / "embeds.safetensors"
    assert adapter.precompute_prompt_embeds(prompts + ["a green triangle"], path) == 3
    other = pipelines.load_pipeline("tiny-sd3", device="cpu")
    other.cache_prompts = True
    assert other.load_prompt_embeds(path) == 3
    loaded = other.encode_prompt(prompts)
    for name, tensor in fresh.items():
        assert torch.equal(loaded.tensors[name], tensor)
    with pytest.raises(PipelineInputError, match="holds prompt embeddings of model 'tiny-sd3'"):
        adapters("tiny-sd").load_prompt_embeds(path)


def test_cfg_combines_two_passes(adapters):
    adapter = adapters("tiny-sd")
    cond, uncond = adapter.encode_prompt(["a cat", "a dog"]), adapter.uncond_embeds(2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guided = adapter.predict(x, 500.0, cond, pipelines.Guidance(cfg_scale=6.0), uncond)
    c = adapter.predict(x, 500.0, cond)
    u = adapter.predict(x, 500.0, uncond)
    torch.testing.assert_close(guided, u + 6.0 * (c - u), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs unconditional embeddings"):
        adapter.predict(x, 500.0, cond, pipelines.Guidance(cfg_scale=6.0))


def test_sdxl_unconditional_branch_is_zeros_unless_a_negative_prompt_is_given(adapters):
    adapter = adapters("tiny-sdxl")
    zeros = adapter.uncond_embeds(2)
    assert all((t == 0).all() for _, t in zeros.items()) and len(zeros) == 2
    negative = adapter.uncond_embeds(2, "blurry")
    assert (negative.hidden_states != 0).any()


def test_vae_encode_decode_shapes_and_checks(adapters):
    adapter = adapters("tiny-sd3")
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    latents = adapter.encode(pixels, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    decoded = adapter.decode(latents)
    assert decoded.shape == pixels.shape and 0 <= decoded.min() and decoded.max() <= 1
    with pytest.raises(PipelineInputError, match=r"pixels in \[0, 1\]"):
        adapter.encode(pixels * 255)
    with pytest.raises(PipelineInputError, match="B x 3 x H x W"):
        adapter.encode(pixels[:, :1])


def test_encode_uses_the_vae_scaling(adapters):
    """latent = (posterior mode - shift) * scale, against the VAE called directly."""
    adapter = adapters("tiny-flux")
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    config = adapter.vae.config
    with torch.no_grad():
        mode = adapter.vae.encode(pixels * 2 - 1).latent_dist.mode()
        ours = adapter.encode(pixels, sample=False)
    torch.testing.assert_close(ours, (mode - config.shift_factor) * config.scaling_factor)


def test_attention_backend(adapters):
    assert adapters("tiny-sd").attention == "sdpa"
    with pytest.raises(PipelineInputError, match="xformers"):
        pipelines.load_pipeline("tiny-sd", device="cpu", attention="xformers")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(pipelines.ModelNotFoundError, match="has no model_index.json"):
        pipelines.load_pipeline(str(tmp_path), device="cpu")
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(PipelineInputError, match="not valid JSON"):
        pipelines.load_pipeline(str(tmp_path), device="cpu")


def test_unsupported_pipeline_lists_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadePriorPipeline"}))
    with pytest.raises(PipelineInputError) as error:
        pipelines.load_pipeline(str(tmp_path), device="cpu")
    for name in pipelines.supported_pipelines():
        assert name in str(error.value)


def test_tiny_models_are_deterministic_and_in_eval_mode():
    a, b = tiny.tiny_components("sd3"), tiny.tiny_components("sd3")
    for name, module in a.items():
        if isinstance(module, torch.nn.Module):
            assert not module.training
            for (pa, ta), (pb, tb) in zip(module.state_dict().items(), b[name].state_dict().items()):
                assert pa == pb and torch.equal(ta, tb)


def test_clip_tokenizer_is_clips_vocabulary():
    tokenizer = tiny.clip_tokenizer()
    assert len(tokenizer) == 49408
    ids = tokenizer("a photo of a cat").input_ids
    # OpenAI CLIP's token ids for this prompt (open_clip's tokenizer, the same BPE file)
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"])[0]
    assert ids == reference[: len(ids)].tolist()
