"""Video generators (Wan2.1, CogVideoX) on tiny real pipelines: ODE parity with stock diffusers'
``WanPipeline`` / ``CogVideoXPipeline``, exact SDE log-probs on 5-D latents, checkpointed gradients through
the chain and the decoder, frame-subset decoding, input errors before any model call, and the UniPC ->
flow Euler replacement."""

from __future__ import annotations

import logging

import pytest
import torch

import pipelines
from pipelines import PipelineInputError, tiny
from vialign.sampling import Sampler, rollout, trajectory_log_probs

PROMPTS = ["a red square", "a photo of a blue dog on the grass"]
SEEDS = [11, 12]
SIZE, FRAMES, STEPS = 32, 9, 4  # 9 frames -> 3 latent frames of 4 x 4
# Short text: a random tiny transformer's cross-attention over 512 mostly-padding tokens averages the prompt
# away (two prompts' Wan videos differ by < 0.01/255); over 16 tokens they differ by ~20/255, so parity
# checks the prompt path too. Wan's default length is checked against the stock encode_prompt separately.
TOKENS = 16
CHANNELS = {"wan": 16, "cogvideox": 4}
GUIDANCE = {"wan": 5.0, "cogvideox": 6.0}
# DDIM's last step to alpha_bar = 1 (set_alpha_to_one, as CogVideoX ships) has std 0: no log-prob there
SDE = {"wan": Sampler(sde="flow-sde", sde_window=(0, 3)), "cogvideox": Sampler(sde="ddim", sde_window=(0, 3))}


@pytest.fixture(scope="module")
def video(tiny_dir):
    """``video(family)`` -> (folder, adapter with 16 text tokens, stock pipeline), built once."""
    cache = {}

    def get(family: str, folder: str | None = None):
        folder = folder or tiny_dir(family)
        if folder not in cache:
            stock = tiny.pipeline_class(family).from_pretrained(folder)
            stock.set_progress_bar_config(disable=True)
            adapter = pipelines.load_pipeline(folder, device="cpu", max_sequence_length=TOKENS)
            cache[folder] = (folder, adapter, stock)
        return cache[folder]

    return get


@pytest.fixture(scope="module")
def wan(video):
    return video("wan")[1]


def generators(seeds=SEEDS):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def video_rollout(adapter, guidance_scale, sampler=Sampler(), negative_prompt=None, **options):
    schedule = adapter.schedule(STEPS, SIZE, SIZE)
    guidance = adapter.make_guidance(guidance_scale)
    cond = adapter.encode_prompt(PROMPTS)
    uncond = adapter.uncond_embeds(len(PROMPTS), negative_prompt) if guidance.uses_uncond else None
    latents = adapter.initial_latents(generators(), len(PROMPTS), SIZE, SIZE, schedule, num_frames=FRAMES)
    return rollout(
        adapter,
        cond,
        latents,
        schedule,
        sampler=sampler,
        guidance=guidance,
        uncond=uncond,
        generator=generators([s + 100 for s in SEEDS]),
        **options,
    )


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_load_pipeline_picks_the_video_adapter_and_draws_stock_noise(video, family):
    folder, adapter, stock = video(family)
    assert type(adapter) is {"wan": pipelines.WanAdapter, "cogvideox": pipelines.CogVideoXAdapter}[family]
    assert adapter.is_video and type(stock).__name__ in pipelines.supported_pipelines()
    assert f"tiny-{family}" in pipelines.builtin_models()
    assert type(pipelines.load_pipeline(f"tiny-{family}", device="cpu")) is type(adapter)
    schedule = adapter.schedule(STEPS, SIZE, SIZE)
    ours = adapter.initial_latents(generators(), 2, SIZE, SIZE, schedule, num_frames=FRAMES)
    assert ours.shape == (2, CHANNELS[family], 3, SIZE // 8, SIZE // 8) and ours.dtype == torch.float32
    if family == "wan":
        theirs = stock.prepare_latents(2, 16, SIZE, SIZE, FRAMES, torch.float32, "cpu", generators())
    else:  # CogVideoX lays latents out B x F x C x h x w inside the pipeline
        stock.scheduler.set_timesteps(STEPS)
        theirs = stock.prepare_latents(2, 4, FRAMES, SIZE, SIZE, torch.float32, "cpu", generators())
        theirs = theirs.permute(0, 2, 1, 3, 4)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "family,guidance_scale,rotary",
    [("wan", 5.0, None), ("wan", 1.0, None), ("cogvideox", 6.0, True), ("cogvideox", 1.0, True)]
    + [("cogvideox", 6.0, False)],
    ids=["wan-cfg", "wan-no-cfg", "cogvideox-5b-cfg", "cogvideox-5b-no-cfg", "cogvideox-2b-cfg"],
)
def test_ode_sampling_reproduces_stock_video_pipelines(video, tmp_path, family, guidance_scale, rotary):
    if rotary is False:  # CogVideoX-2B: sin-cos position embeddings (for a fixed text length), no rotary ones
        from diffusers import CogVideoXTransformer3DModel

        pipe = tiny.build(family)
        torch.manual_seed(0)
        pipe.transformer = CogVideoXTransformer3DModel.from_config(
            pipe.transformer.config, use_rotary_positional_embeddings=False, max_text_seq_length=TOKENS
        ).eval()
        pipe.save_pretrained(tmp_path / "2b")
        with pytest.raises(PipelineInputError, match=f"use max_sequence_length={TOKENS}"):
            pipelines.load_pipeline(str(tmp_path / "2b"), device="cpu")
        _, adapter, stock = video(family, str(tmp_path / "2b"))
    else:
        _, adapter, stock = video(family)
    with torch.no_grad():
        ours = adapter.decode(video_rollout(adapter, guidance_scale).final)
    theirs = torch.cat(
        [
            stock(
                prompt,
                num_frames=FRAMES,
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="pt",
                max_sequence_length=TOKENS,
            ).frames
            for prompt, generator in zip(PROMPTS, generators())
        ]
    )
    assert ours.shape == theirs.shape == (2, FRAMES, 3, SIZE, SIZE) and ours.dtype == torch.float32
    per_frame = (ours - theirs).abs().amax(dim=(2, 3, 4))
    assert (per_frame <= 1 / 255).all(), f"max difference per frame (x 255): {(per_frame * 255).tolist()}"
    assert (ours[0] - ours[1]).abs().max() > 10 / 255  # prompts and seeds give different videos
    if guidance_scale > 1:  # and guidance changes the prediction
        x = torch.randn(2, CHANNELS[family], 3, 4, 4, generator=torch.Generator().manual_seed(5))
        cond, uncond = adapter.encode_prompt(PROMPTS), adapter.uncond_embeds(2)
        guided = adapter.predict(x, 500.0, cond, adapter.make_guidance(guidance_scale), uncond)
        assert (guided - adapter.predict(x, 500.0, cond)).abs().max() > 0.05


@pytest.mark.parametrize("length", [None, TOKENS], ids=["default-512", "16"])
def test_wan_prompt_embeddings_are_the_stock_pipelines(video, length):
    """UMT5 states of the prompt's tokens, zeros after them (padding), the negative prompt as uncond."""
    folder, _, stock = video("wan")
    adapter = pipelines.load_pipeline(folder, device="cpu", max_sequence_length=length)
    negative = "blurry  &amp; dark "  # the stock pipeline cleans it (HTML entities, whitespace)
    cond, uncond = adapter.encode_prompt(PROMPTS), adapter.uncond_embeds(2, negative)
    with torch.no_grad():
        theirs, theirs_uncond = stock.encode_prompt(
            PROMPTS, [negative] * 2, max_sequence_length=length or 512, device="cpu"
        )
    assert cond.hidden_states.shape == (2, length or 512, 32)
    for ours, reference in ((cond.hidden_states, theirs), (uncond.hidden_states, theirs_uncond)):
        assert torch.equal(ours == 0, reference == 0) and (ours[:, -1] == 0).all()
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def _reference_log_prob(adapter, trajectory, k, sampler):
    """The step's Gaussian written out again in float64 from the model output and scored with
    torch.distributions: Flow-GRPO's SDE (flow), DDIM-eta (diffusion, v-prediction)."""
    schedule, x = trajectory.schedule, trajectory.latents[:, k]
    with torch.no_grad():
        out = torch.cat(
            [
                adapter.predict(
                    x[i : i + 1],
                    schedule.timesteps[k],
                    trajectory.cond[i],
                    trajectory.guidance,
                    trajectory.uncond[i],
                )
                for i in range(len(trajectory))
            ]
        ).double()
    x, level = x.double(), sampler.level
    if adapter.kind == "flow":
        s, s_next = float(schedule.sigmas[k]), float(schedule.sigmas[k + 1])
        g = level * (s / (1 - (s_next if s >= 1 else s))) ** 0.5
        dt = s_next - s
        mean = x + (out + g**2 / (2 * s) * (x + (1 - s) * out)) * dt
        std = g * (-dt) ** 0.5
    else:
        a, s = float(schedule.alphas[k]), float(schedule.sigmas[k])
        a_next, s_next = float(schedule.alphas[k + 1]), float(schedule.sigmas[k + 1])
        x0, eps = a * x - s * out, a * out + s * x
        std = level * (s_next / s) * (1 - a**2 / a_next**2) ** 0.5
        mean = a_next * x0 + (s_next**2 - std**2) ** 0.5 * eps
    normal = torch.distributions.Normal(mean, torch.full_like(mean, std))
    return normal.log_prob(trajectory.latents[:, k + 1].double()).sum(dim=(1, 2, 3, 4))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_sde_log_probs_are_exact_and_rescore_with_ratio_one(video, family):
    _, adapter, _ = video(family)
    sampler = SDE[family]
    trajectory = video_rollout(adapter, GUIDANCE[family], sampler, model_batch_size=1)
    stochastic = list(range(*(sampler.sde_window or (0, STEPS))))
    assert trajectory.latents.shape == (2, STEPS + 1, CHANNELS[family], 3, SIZE // 8, SIZE // 8)
    assert torch.nonzero(trajectory.stochastic).flatten().tolist() == stochastic
    for k in stochastic:
        reference = _reference_log_prob(adapter, trajectory, k, sampler)
        torch.testing.assert_close(trajectory.log_probs[:, k].double(), reference, rtol=1e-5, atol=1e-3)
    recorded = trajectory.log_probs[:, stochastic]
    for micro_batch in (1, 2):
        with torch.no_grad():
            rescored = torch.cat(
                [
                    trajectory_log_probs(
                        adapter, trajectory.select(range(i, i + micro_batch)), model_batch_size=1
                    )
                    for i in range(0, 2, micro_batch)
                ]
            )
        assert torch.equal(rescored, recorded), (
            f"max |ratio - 1| = {(torch.exp(rescored - recorded) - 1).abs().max()}"
        )


def _chain_gradients(adapter, checkpoint: bool) -> dict[str, torch.Tensor]:
    adapter.denoiser.zero_grad(set_to_none=True)
    trajectory = video_rollout(adapter, 5.0, Sampler(sde="flow-sde"), grad_steps=STEPS, checkpoint=checkpoint)
    frames = adapter.decode(trajectory.final, checkpoint=checkpoint)
    weights = torch.linspace(-1, 1, frames.numel()).reshape(
        frames.shape
    )  # a loss on every pixel of every frame
    (frames * weights).sum().backward()
    return {n: p.grad.clone() for n, p in adapter.denoiser.named_parameters() if p.grad is not None}


def test_checkpointed_video_chain_gives_the_plain_chains_gradients(video):
    adapter = pipelines.load_pipeline(
        video("wan")[0], device="cpu", max_sequence_length=TOKENS
    )  # trained: own copy
    for param in adapter.denoiser.parameters():
        param.requires_grad_(True)
    plain = _chain_gradients(adapter, checkpoint=False)
    checkpointed = _chain_gradients(adapter, checkpoint=True)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(adapter.denoiser.parameters()))
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-6, msg=name)


def _saved_bytes(function) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``function`` runs."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return total


def test_wan_frame_subset_decoding(wan):
    latents = torch.randn(2, 16, 3, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = wan.decode(latents)
        first = wan.decode(latents, frames=[0])
        picked = wan.decode(latents, frames=[4, 0, 8])
    assert full.shape == (2, FRAMES, 3, SIZE, SIZE) and first.shape == (2, 1, 3, SIZE, SIZE)
    torch.testing.assert_close(first[:, 0], full[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(picked, full[:, [4, 0, 8]], rtol=0, atol=1e-5)
    # frame 0 decodes from latent frame 0 alone: at most half the decoder's activation memory of all 9
    grad_latents = latents.clone().requires_grad_(True)
    one = _saved_bytes(lambda: wan.decode(grad_latents, frames=[0]))
    every = _saved_bytes(lambda: wan.decode(grad_latents))
    assert 0 < one <= every / 2, f"frame 0 keeps {one} bytes, all frames {every}"
    with pytest.raises(PipelineInputError, match=r"0\.\.8"):
        wan.decode(latents, frames=[9])
    with pytest.raises(PipelineInputError, match="B x C x F x h x w"):
        wan.decode(latents[:, :, 0])


def test_cogvideox_frame_subsets_decode_whole_vae_chunks(video):
    """CogVideoX's VAE normalises latent frames [0, 3) together, then pairs: frame 0 of 17 decodes 3 of 5."""
    adapter = video("cogvideox")[1]
    latents = torch.randn(1, 4, 5, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = adapter.decode(latents)
        picked = adapter.decode(latents, frames=[0, 9, 16])
    assert full.shape == (1, 17, 3, SIZE, SIZE) and picked.shape == (1, 3, 3, SIZE, SIZE)
    torch.testing.assert_close(picked, full[:, [0, 9, 16]], rtol=0, atol=1e-5)
    assert [adapter._latent_frames_to_decode(n, 5) for n in range(1, 6)] == [3, 3, 3, 5, 5]
    with pytest.raises(PipelineInputError, match=r"num_frames=13 gives 4 latent frames.*8k\+1.*try 9 or 17"):
        adapter.initial_latents(generators(), 2, SIZE, SIZE, adapter.schedule(2, SIZE, SIZE), num_frames=13)
    with pytest.raises(PipelineInputError, match="4 latent frames"):
        adapter.decode(latents[:, :, :4])


def test_wan_video_encode_round_trip_shapes(wan):
    frames = torch.rand(1, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        latents = wan.encode(frames, sample=False)
        mode = wan.vae.encode(frames.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    assert latents.shape == (1, 16, 3, SIZE // 8, SIZE // 8) and latents.dtype == torch.float32
    config = wan.vae.config
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (config.latents_mean, config.latents_std))
    torch.testing.assert_close(latents, (mode - mean) / std, rtol=1e-5, atol=1e-5)
    with pytest.raises(PipelineInputError, match="4k\\+1"):
        wan.encode(frames[:, :8])
    with pytest.raises(PipelineInputError, match="B x F x 3 x H x W"):
        wan.encode(frames[0])


class _Calls:
    """Counts forward calls of the adapter's models."""

    def __init__(self, adapter):
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in adapter.modules().values()]

    def _hook(self, module, args):
        self.count += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_bad_frames_and_sizes_are_refused_before_any_model_call(wan):
    schedule = wan.schedule(STEPS, SIZE, SIZE)
    calls = _Calls(wan)
    try:
        with pytest.raises(PipelineInputError, match=r"num_frames=10 is not 4k\+1.*try 9 or 13"):
            wan.initial_latents(generators(), 2, SIZE, SIZE, schedule, num_frames=10)
        with pytest.raises(PipelineInputError, match="num_frames=0"):
            wan.initial_latents(generators(), 2, SIZE, SIZE, schedule, num_frames=0)
        with pytest.raises(
            PipelineInputError, match="height=40 is not a positive multiple of 16.*try 32 or 48"
        ):
            wan.initial_latents(generators(), 2, 40, SIZE, schedule, num_frames=FRAMES)
        with pytest.raises(PipelineInputError, match="width=24 is not a positive multiple of 16"):
            wan.schedule(STEPS, SIZE, 24)
        with pytest.raises(PipelineInputError, match="multiple of 16"):
            wan.encode(torch.rand(1, FRAMES, 3, 40, 40))
        with pytest.raises(PipelineInputError, match=r"0\.\.8"):
            wan.decode(torch.zeros(1, 16, 3, 4, 4), frames=[-1])
    finally:
        calls.remove()
    assert calls.count == 0
    image = pipelines.load_pipeline("tiny-sd3", device="cpu")
    assert not image.is_video
    with pytest.raises(PipelineInputError, match="num_frames is for video models"):
        image.initial_latents(generators(), 2, 64, 64, image.schedule(2, 64, 64), num_frames=FRAMES)
    with pytest.raises(PipelineInputError, match="frames is for video models"):
        image.decode(torch.zeros(1, 4, 8, 8), frames=[0])


def test_unipc_checkpoint_samples_with_flow_euler_and_says_so(tmp_path, caplog):
    """Wan2.1 ships UniPC (flow_shift); vialign samples with flow Euler at that shift and warns."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    pipe = tiny.build("wan")
    pipe.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    )
    pipe.save_pretrained(tmp_path / "unipc")
    with caplog.at_level(logging.WARNING, logger="pipelines.schedules"):
        adapter = pipelines.load_pipeline(str(tmp_path / "unipc"), device="cpu")
    assert "UniPCMultistepScheduler" in caplog.text and "FlowMatchEulerDiscreteScheduler" in caplog.text
    assert "shift=5.0" in caplog.text
    assert isinstance(adapter.scheduler, FlowMatchEulerDiscreteScheduler)
    reference = FlowMatchEulerDiscreteScheduler(shift=5.0)
    reference.set_timesteps(STEPS)
    schedule = adapter.schedule(STEPS, SIZE, SIZE)
    assert torch.equal(schedule.sigmas, reference.sigmas.float())
    assert torch.equal(schedule.timesteps, reference.timesteps.float())


def test_wan_half_precision_keeps_the_stock_float32_modules(video):
    """bf16 as WanPipeline.from_pretrained(dtype=bf16) has it: norms, time embedding, modulation in fp32."""
    folder, _, _ = video("wan")
    adapter = pipelines.load_pipeline(folder, device="cpu", dtype="bfloat16")
    stock = tiny.pipeline_class("wan").from_pretrained(folder, dtype=torch.bfloat16)
    ours = {n: p.dtype for n, p in adapter.denoiser.named_parameters()}
    assert ours == {n: p.dtype for n, p in stock.transformer.named_parameters()}
    assert {torch.float32, torch.bfloat16} == set(ours.values())


def test_wan_lora_loads_into_stock_diffusers(video, tmp_path):
    folder, _, stock = video("wan")
    adapter = pipelines.load_pipeline(folder, device="cpu")
    adapter.add_lora(rank=2)
    assert adapter.lora_parameters()
    adapter.save_lora(tmp_path / "lora")
    stock.load_lora_weights(str(tmp_path / "lora"))
    try:
        assert stock.transformer.peft_config
    finally:
        stock.unload_lora_weights()
