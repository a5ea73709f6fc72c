"""One prepared GPU run of vialign's benchmarks at real architectures with random weights (no download).

    python benchmarks/gpu.py --install-wheels gpu_wheels      # once, where the image lacks diffusers & co.
    python benchmarks/gpu.py --out OUT_DIR [--budget 420] [--device cuda] [--sections 1 2 4 5 3]
    python benchmarks/gpu.py --device cpu --smoke --out /tmp/gpusmoke   # tiny configs: checks the script

``gpu_wheels/`` (git-ignored) holds CPython 3.12 manylinux wheels of what a bare CUDA image lacks
(diffusers, open_clip_torch, ftfy, wcwidth, pydantic and its core, requests...): fetch them with
``pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps -d
gpu_wheels diffusers open_clip_torch ftfy wcwidth pydantic pydantic-core annotated-types
typing-inspection typing_extensions requests urllib3 idna charset_normalizer certifi``. The figures of
the last run are in benchmarks/results/gpu.md.

Models are built on the device from configs in code: SD 1.5's UNet2DConditionModel, CLIP ViT-L/14's
text encoder and SD's AutoencoderKL (tokenizer: OpenAI CLIP's BPE that open_clip ships, as
``pipelines.tiny``), and a CLIP ViT-L/14 CLIPModel for scoring. Sections (each in try/except; a
section is skipped once ``--budget`` seconds have passed; a hard alarm stops the run at
``--hard-limit`` and still writes what was measured):

  1. sampling: vialign / stock diffusers time ratio, 512x512, 20 steps, CFG, batch 4 — runs
     ``benchmarks/sampling.py``'s ``benchmark_family`` on this model (its clock synchronised with CUDA);
  2. memory: gradients through the whole chain (+ VAE decode), 256x256, batch 1, N = 10 and 50, and
     512x512 batch 4 at N = 8: peak ``max_memory_allocated`` above the weights and time of the plain
     chain, per-step checkpointing (full recompute, ``checkpoint=True``), the same with torch's
     non-reentrant checkpoint that records each step's graph in the forward too (``checkpoint_graph``:
     vialign's implementation before 2026-12-05, kept here as the yardstick), selective recompute
     (``checkpoint="selective"``) and activations offloaded to host memory (as ``benchmarks/memory.py``
     calls ``rollout_prompts``); ``--memory-steps``/``--memory-repeats``/``--memory-modes`` shorten it
     (e.g. on a CPU);
  3. compile: ODE rollout with the denoiser eager vs ``torch.compile``'d (``adapter.denoiser`` is what
     ``_forward`` calls), 512x512 batch 4; compile time apart;
  4. grpo: ``benchmarks/grpo_step.py``'s step / model-call ratio on this model saved as a diffusers folder;
  5. scoring: ``benchmarks/scoring.py``'s ``vialign score`` vs per-image loop at CLIP ViT-L/14;
  6. fsdp: memory of one full fine-tuning step of the SD 1.5 UNet (rollout with gradients through its
     last step, decode, backward, AdamW) unsharded vs ``fully_shard``-ed over 8 ranks; the 8 ranks are
     torch's fake process group (one process plays rank 0; collectives move no data): what each of 8
     GPUs would hold, measurable on one;
  7. flux: FLUX.1-dev's transformer and VAE (11.9B + 84M, random, no text encoders: random prompt
     embeddings given to both paths): sampling vialign vs stock FluxPipeline at 1024x1024, then the
     same full fine-tuning step sharded over 8 fake ranks, run as section 8 in a child process with
     ``CUDA_LAUNCH_BLOCKING=1`` (a CUDA fault there, as on 2026-12-04, then names its kernel and leaves
     this run's CUDA context intact); when that child fails, again with 2 double and 2 single blocks
     of FLUX's width (``--flux-blocks 2 2``) and with 2 fake ranks, to tell depth from sharding;
  8. flux_fsdp: that step alone (what the child runs).

Writes ``OUT/gpu.json`` and ``OUT/gpu.md`` after every section (``--out`` ending in .json: that file).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "gpu_wheels"
SITE_FALLBACK = WHEELS / "_site"  # wheels extracted here when pip cannot install them
UPGRADE_IF_OLDER = {"typing_extensions"}  # installed even when present, if older than the wheel
START = time.perf_counter()

# ---------------------------------------------------------------------------------------------- configs
# runwayml/stable-diffusion-v1-5 unet/config.json (859.5M parameters)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# vae/config.json (83.7M)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# openai/clip-vit-large-patch14's text tower (123.1M), ids of the BPE that pipelines.tiny builds
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# the full openai/clip-vit-large-patch14 CLIPModel (427.6M), for scoring
CLIP_VIT_L_14 = {
    "text_config": {
        k: CLIP_L_TEXT[k]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
    },
    "projection_dim": 768,
}
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_TEXT = {
    **CLIP_L_TEXT,
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}

# black-forest-labs/FLUX.1-dev transformer/config.json (11.9B parameters) and vae/config.json (83.8M)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# per-section sizes: real run, and --smoke
PLAN = {
    "full": dict(
        sampling=dict(size=512, steps=20, batch=4, repeats=5, guidance=7.5),
        memory=dict(
            size=256,
            batch=1,
            steps=(10, 50),
            repeats=3,
            guidance=4.0,
            modes=("nograd", "checkpoint", "checkpoint_graph", "selective", "plain"),  # offload: 10-14x plain
            large=dict(
                size=512, batch=4, steps=8, modes=("checkpoint", "checkpoint_graph", "selective", "plain")
            ),
        ),
        compile=dict(size=512, steps=20, batch=4, repeats=3, guidance=7.5, min_seconds_left=100),
        grpo=dict(size=256, steps=10, group_size=8, prompts=8, micro_batch=32, repeats=3),
        scoring=dict(
            architecture="vit-l-14", images=256, per_prompt=4, size=512, batch=32, reload_images=4, repeats=3
        ),
        fsdp=dict(size=512, steps=4, world_size=8),
        flux=dict(
            size=1024, steps=12, batch=1, repeats=3, guidance=3.5, fsdp_size=512, fsdp_steps=4, world_size=8
        ),
    ),
    "smoke": dict(
        sampling=dict(size=64, steps=3, batch=2, repeats=3, guidance=7.5),
        memory=dict(
            size=64,
            batch=1,
            steps=(2, 4),
            repeats=3,
            guidance=4.0,
            modes=("nograd", "checkpoint", "checkpoint_graph", "selective", "offload", "plain"),
            large=dict(
                size=128, batch=2, steps=2, modes=("checkpoint", "checkpoint_graph", "selective", "plain")
            ),
        ),
        compile=dict(size=64, steps=3, batch=2, repeats=3, guidance=7.5, min_seconds_left=0),
        grpo=dict(size=64, steps=3, group_size=2, prompts=2, micro_batch=4, repeats=3),
        scoring=dict(architecture="tiny", images=8, per_prompt=4, size=64, batch=4, reload_images=2),
        fsdp=dict(size=64, steps=2, world_size=8),
        flux=dict(
            size=64, steps=3, batch=1, repeats=2, guidance=3.5, fsdp_size=64, fsdp_steps=2, world_size=8
        ),
    ),
}
SECTIONS = {
    "1": "sampling",
    "2": "memory",
    "3": "compile",
    "4": "grpo",
    "5": "scoring",
    "6": "fsdp",
    "7": "flux",
    "8": "flux_fsdp",
}


# ---------------------------------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", flush=True)


class HardLimit(BaseException):
    """Raised by SIGALRM: the run is out of time; what was measured is still written."""


def _version_key(version: str):
    try:
        from packaging.version import Version

        return Version(version)
    except Exception:  # noqa: BLE001
        return tuple(int(p) if p.isdigit() else 0 for p in version.replace("-", ".").split("."))


def install_wheels(folder: Path) -> int:
    """pip-install (no index, no deps) each wheel in ``folder`` whose distribution is not installed;
    if pip cannot, extract them into gpu_wheels/_site, which the benchmark puts on sys.path."""
    import importlib.metadata as md

    todo = []
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        older = (
            have is not None
            and name.lower() in UPGRADE_IF_OLDER
            and _version_key(have) < _version_key(version)
        )
        if have is None or older:
            todo.append(wheel)
        print(
            f"{name:22s} wheel {version:18s} installed {have or '-':12s} -> {'install' if wheel in todo else 'keep'}"
        )
    if not todo:
        return 0
    env = {**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *map(str, todo)]
    if subprocess.run(command, env=env, check=False).returncode == 0:
        print(f"pip installed {len(todo)} wheels")
        return 0
    print(
        f"pip failed; extracting {len(todo)} wheels into {SITE_FALLBACK} (put on sys.path by the benchmark)"
    )
    SITE_FALLBACK.mkdir(parents=True, exist_ok=True)
    for wheel in todo:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(SITE_FALLBACK)
    return 0


def prepare_imports() -> list[str]:
    """Make vialign, rewards, pipelines, vialign_assets and open_clip's tokenizer importable from the
    checkout, whether or not the project is installed. Returns notes of what was patched."""
    notes = []
    for path in (SITE_FALLBACK, REPO):
        if path.is_dir() and str(path) not in sys.path:
            sys.path.insert(0, str(path))
    if importlib.util.find_spec("vialign_assets") is None:  # pyproject maps it to assets/
        spec = importlib.util.spec_from_file_location(
            "vialign_assets",
            REPO / "assets" / "__init__.py",
            submodule_search_locations=[str(REPO / "assets")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["vialign_assets"] = module
        spec.loader.exec_module(module)
        notes.append("vialign_assets registered from assets/")
    try:
        import open_clip  # noqa: F401
    except ImportError as error:  # e.g. no torchvision: its tokenizer module alone needs none of that
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            notes.append(f"open_clip missing ({error}); CLIP tokenizers will fail")
        else:
            for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
                del sys.modules[name]  # what the failed import left half-done
            stub = types.ModuleType("open_clip")
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules["open_clip"] = stub
            notes.append(f"open_clip import failed ({error}); using open_clip.tokenizer alone")
    return notes


def load_benchmark(name: str):
    """A benchmarks/<name>.py module, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"vialign_benchmark_{name}", REPO / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def patched(target, **attributes):
    """Set attributes on a module or object for the block; restore (or delete) them after."""
    missing = object()
    saved = {name: getattr(target, name, missing) for name in attributes}
    for name, value in attributes.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(target, name)
            else:
                setattr(target, name, value)


class MedianRecorder:
    """Stands in for the ``statistics`` module of a benchmark: records what each ``median`` got."""

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def median(self, values):
        self.calls.append(list(values))
        return statistics.median(self.calls[-1])

    def __getattr__(self, name):
        return getattr(statistics, name)


def tee_print(lines: list[str]):
    def _print(*parts, **kwargs):
        lines.append(" ".join(str(p) for p in parts))
        print(*parts, **kwargs, flush=True)

    return _print


def summary(values: list[float]) -> dict:
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "runs": len(values),
        "times_s": [round(v, 5) for v in values],
    }


# ---------------------------------------------------------------------------------------------- context
class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype_name = args.dtype or ("bfloat16" if self.cuda else "float32")
        self.dtype = getattr(torch, self.dtype_name)
        self.plan = PLAN["smoke" if args.smoke else "full"]
        self._pipe = None
        self.tmp = Path(tempfile.mkdtemp(prefix="vialign-gpu-"))

    def clock(self) -> float:
        """time.perf_counter after the device has finished the work queued so far."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def memory_gb(self) -> dict:
        if not self.cuda:
            return {}
        torch = self.torch
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            "allocated_gb": round(torch.cuda.memory_allocated(self.device) / 2**30, 2),
            "reserved_gb": round(torch.cuda.memory_reserved(self.device) / 2**30, 2),
            "free_gb": round(free / 2**30, 2),
            "total_gb": round(total / 2**30, 2),
        }

    def seconds_left(self) -> float:
        return self.args.budget - (time.perf_counter() - START)

    def pipe(self):
        """The random SD 1.5-architecture StableDiffusionPipeline (built once, on the device)."""
        if self._pipe is None:
            self._pipe = build_sd15(self.device, self.dtype, tiny=self.args.smoke)
        return self._pipe

    def adapter(self, pipe=None):
        import pipelines

        return pipelines.StableDiffusionAdapter.from_pipeline(
            pipe or self.pipe(), model_id="sd15-random", device=self.device, dtype=self.dtype
        )


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def build_sd15(device, dtype, tiny: bool):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines import tiny as tiny_pipelines

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # parameters are created (and randomly initialised) on the device
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else CLIP_L_TEXT)))
    for module in (unet, vae, text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_pipelines.clip_tokenizer(),
        scheduler=DDIMScheduler(**tiny_pipelines.SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    log(
        f"built {'tiny' if tiny else 'SD 1.5'}-architecture pipeline on {device} in {dtype} "
        f"({time.perf_counter() - start:.1f} s): unet {count(unet):.1f}M, vae {count(vae):.1f}M, "
        f"text encoder {count(text_encoder):.1f}M parameters"
    )
    return pipe


def architecture_check() -> dict:
    """Parameter counts of the real configs, built on the meta device (no memory): checks the configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        counts = {
            "unet_M": count(UNet2DConditionModel(**SD15_UNET)),
            "vae_M": count(AutoencoderKL(**SD15_VAE)),
            "text_encoder_M": count(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))),
            "clip_vit_l_14_M": count(CLIPModel(CLIPConfig(**CLIP_VIT_L_14))),
        }
    return {k: round(v, 2) for k, v in counts.items()}


# ---------------------------------------------------------------------------------------------- sections
def section_sampling(ctx: Context) -> dict:
    """benchmarks/sampling.py's benchmark_family, on the SD 1.5-architecture pipeline on the device."""
    plan = ctx.plan["sampling"]
    sampling = load_benchmark("sampling")
    pipe = ctx.pipe()

    class AdapterOnDevice:  # sampling.py places its adapter on the CPU; here: the context's device/dtype
        @staticmethod
        def from_pipeline(pipe, *, model_id, device=None):
            return ctx.adapter(pipe)

    recorder, lines = MedianRecorder(), []
    options = argparse.Namespace(
        steps=plan["steps"],
        batch=plan["batch"],
        size=plan["size"],
        repeats=plan["repeats"],
        guidance=plan["guidance"],
    )
    prompts = [f"a photo of object number {i}" for i in range(plan["batch"])]
    with patched(
        sampling,
        tiny=types.SimpleNamespace(build=lambda family: pipe),
        pipelines=types.SimpleNamespace(ADAPTERS={type(pipe).__name__: AdapterOnDevice}),
        time=types.SimpleNamespace(perf_counter=ctx.clock),
        statistics=recorder,
        print=tee_print(lines),
    ):
        sampling.benchmark_family("sd", prompts, options)
    stock, ours = recorder.calls[0], recorder.calls[1]
    max_diff = None
    for line in lines:
        if "max pixel difference" in line:
            with contextlib.suppress(ValueError):
                max_diff = float(line.rsplit("max pixel difference", 1)[1].strip(" )"))
    return {
        "config": {**plan, "dtype": ctx.dtype_name, "scheduler": "DDIM"},
        "stock": summary(stock),
        "vialign": summary(ours),
        "ratio_vialign_over_stock": statistics.median(ours) / statistics.median(stock),
        "ratio_of_minima": min(ours) / min(stock),
        "max_pixel_difference": max_diff,
        "target": "ratio <= 1.05",
    }


def section_memory(ctx: Context) -> dict:
    """Gradients through all N steps and the decode: no grad / checkpointed / plain (memory.py's calls)."""
    import torch

    from vialign.sampling import Sampler, rollout_prompts

    # the module, not the function ``vialign.sampling.rollout`` that shadows it as an attribute
    rollout_module = importlib.import_module("vialign.sampling.rollout")

    graph_calls = []

    def graph_checkpointed(function, *args, mode=True):
        """The yardstick: torch's non-reentrant checkpoint, whose forward records the step's graph."""
        graph_calls.append(1)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    plan = dict(ctx.plan["memory"])
    if ctx.args.memory_steps:
        plan.update(steps=tuple(ctx.args.memory_steps))
        plan.pop("large", None)
    if ctx.args.memory_repeats:
        plan.update(repeats=ctx.args.memory_repeats)
    if ctx.args.memory_modes:
        plan.update(modes=tuple(ctx.args.memory_modes))
    adapter = ctx.adapter()
    size, batch = plan["size"], plan["batch"]
    prompts = [f"a photo of object {i}" for i in range(batch)]
    guidance = adapter.make_guidance(plan["guidance"])
    sampler = Sampler(sde="ddim" if adapter.kind == "diffusion" else "flow-sde")  # as memory.py
    params = list(adapter.denoiser.parameters())
    for param in params:
        param.requires_grad_(True)

    # mode -> (rollout checkpoint, decode checkpoint, activations kept in host memory)
    modes = {
        "nograd": (False, False, False),
        "checkpoint": (True, True, False),
        "checkpoint_graph": (True, True, False),
        "selective": ("selective", True, False),
        "offload": (False, False, True),
        "plain": (False, False, False),
    }

    def run(mode: str, n: int, schedule) -> tuple[float, float, float | None]:
        ctx.free()
        base = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else 0
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = ctx.clock()
        checkpoint, decode_checkpoint, offload = modes[mode]
        graph = (
            patched(rollout_module, checkpointed=graph_checkpointed) if mode == "checkpoint_graph" else None
        )
        with torch.set_grad_enabled(mode != "nograd"), graph or contextlib.nullcontext():
            trajectory = rollout_prompts(
                adapter,
                prompts,
                range(batch),
                schedule,
                height=size,
                width=size,
                guidance=guidance,
                sampler=sampler,
                grad_steps=0 if mode == "nograd" else n,
                checkpoint=checkpoint,
                offload=offload,
            )
            loss = adapter.decode(trajectory.final, checkpoint=decode_checkpoint).mean()
            if mode != "nograd":
                loss.backward()
        seconds = ctx.clock() - start
        if mode == "checkpoint_graph" and len(graph_calls) < n:
            raise RuntimeError(f"checkpoint_graph ran {len(graph_calls)} non-reentrant steps of {n}")
        graph_calls.clear()
        peak = (torch.cuda.max_memory_allocated(ctx.device) - base) / 2**30 if ctx.cuda else None
        value = loss.item()
        del trajectory, loss
        for param in params:
            param.grad = None
        return seconds, value, peak

    results: dict = {"config": {**plan, "dtype": ctx.dtype_name, "sampler": "ddim SDE (as memory.py)"}}
    weights_gb = sum(p.numel() * p.element_size() for p in params) / 2**30
    results["denoiser_weights_gb"] = weights_gb
    results["note"] = (
        "peak = max_memory_allocated during one run minus memory_allocated before it (all weights); "
        f"plain/checkpoint peaks include the denoiser's full gradients ({weights_gb:.2f} GB)"
    )
    # (size, batch, steps, row name, modes): the plan's sizes, and one compute-bound size where selective
    # recompute's saved products should pay for its per-op dispatch
    configs = [(size, batch, n, f"N={n}", plan["modes"]) for n in plan["steps"]]
    if "large" in plan:
        large = plan["large"]
        name = f"N={large['steps']} {large['size']}px x{large['batch']}"
        configs.append((large["size"], large["batch"], large["steps"], name, large["modes"]))
    warm = True
    try:
        for size, batch, n, key, config_modes in configs:
            prompts = [f"a photo of object {i}" for i in range(batch)]
            schedule = adapter.schedule(n, size, size)
            row: dict = {}
            for mode in config_modes:
                first = plan["steps"][0]
                previous = results.get(f"N={first}", {}).get("plain", {}).get("peak_above_weights_gb")
                if mode == "plain" and ctx.cuda and previous is not None and key != f"N={first}":
                    predicted = previous * n / first
                    free_gb = torch.cuda.mem_get_info(ctx.device)[0] / 2**30
                    if predicted > 0.9 * free_gb:
                        row[mode] = {
                            "skipped": f"predicted peak {predicted:.1f} GB > 90% of {free_gb:.1f} GB free"
                        }
                        log(f"memory {key} {mode}: {row[mode]['skipped']}")
                        continue
                runs = plan["repeats"] + (1 if warm else 0)
                times, losses, peaks = [], [], []
                try:
                    for i in range(runs):
                        seconds, value, peak = run(mode, n, schedule)
                        if not (warm and i == 0):
                            times.append(seconds)
                        losses.append(value)
                        peaks.append(peak)
                except torch.cuda.OutOfMemoryError as error:
                    row[mode] = {"oom": str(error).splitlines()[0]}
                    log(f"memory {key} {mode}: out of memory")
                    for param in params:
                        param.grad = None
                    ctx.free()
                    continue
                row[mode] = {
                    **summary(times),
                    "peak_above_weights_gb": max(peaks) if ctx.cuda else None,
                    "loss": losses[-1],
                }
                log(
                    f"memory {key} {mode:10s}: median {row[mode]['median_s']:.3f} s"
                    + (f", peak +{max(peaks):.2f} GB" if ctx.cuda else "")
                )
            warm = False
            plain = row.get("plain", {})
            for mode in ("checkpoint", "checkpoint_graph", "selective", "offload"):
                other = row.get(mode, {})
                if "median_s" not in plain or "median_s" not in other:
                    continue
                ratios = {
                    "time": other["median_s"] / plain["median_s"],
                    "same_loss": abs(plain["loss"] - other["loss"]) <= 1e-3 * max(1.0, abs(plain["loss"])),
                }
                if ctx.cuda:
                    ratios["memory"] = other["peak_above_weights_gb"] / plain["peak_above_weights_gb"]
                    act_plain = plain["peak_above_weights_gb"] - weights_gb
                    act_other = other["peak_above_weights_gb"] - weights_gb
                    ratios["memory_without_grads"] = act_other / act_plain if act_plain > 0 else None
                row[f"{mode}_over_plain"] = ratios
            results[key] = row
    finally:
        for param in params:
            param.requires_grad_(False)
            param.grad = None
        ctx.free()
    return results


def section_compile(ctx: Context) -> dict:
    """ODE rollout (rollout_prompts, as sampling.py calls it), denoiser eager vs compiled through the
    product's path (``adapter.compile_for_inference``, what ``model.compile: true`` does). The latent
    difference is put next to two yardsticks: one denoiser call compiled vs eager, and the same eager
    rollout in float32 vs this dtype (how far rounding alone carries a chain of this length)."""
    import torch

    from vialign.sampling import rollout_prompts

    plan = ctx.plan["compile"]
    if ctx.seconds_left() < plan["min_seconds_left"]:
        return {"skipped": f"{ctx.seconds_left():.0f} s of budget left < {plan['min_seconds_left']} s needed"}
    adapter = ctx.adapter()
    adapter.cache_prompts = False
    size, batch = plan["size"], plan["batch"]
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    schedule = adapter.schedule(plan["steps"], size, size)
    guidance = adapter.make_guidance(plan["guidance"])

    def rollout_seconds() -> float:
        start = ctx.clock()
        with torch.no_grad():
            trajectory = rollout_prompts(
                adapter, prompts, range(batch), schedule, height=size, width=size, guidance=guidance
            )
        seconds = ctx.clock() - start
        rollout_seconds.final = trajectory.final
        return seconds

    def one_call() -> torch.Tensor:
        generators = [torch.Generator().manual_seed(0)]
        x = adapter.initial_latents(generators, 1, size, size, schedule)
        with torch.no_grad():
            cond, uncond = adapter.encode_prompt(prompts[:1]), adapter.encode_prompt([""])
            return adapter.predict(x, schedule.timesteps[0], cond, guidance, uncond).float()

    results: dict = {"config": {**plan, "dtype": ctx.dtype_name, "backend": ctx.args.compile_backend}}
    rollout_seconds()  # warm-up
    eager_times = [rollout_seconds() for _ in range(plan["repeats"])]
    eager_final = rollout_seconds.final
    eager_call = one_call()
    results["eager"] = summary(eager_times)
    log(f"compile: eager rollout median {results['eager']['median_s']:.3f} s")
    if adapter.dtype != torch.float32:
        dtype = adapter.dtype
        adapter.to(dtype=torch.float32)
        rollout_seconds()
        results["eager_float32_vs_this_dtype_max_latent_difference"] = (
            (rollout_seconds.final - eager_final).abs().max().item()
        )
        adapter.to(dtype=dtype)
        ctx.free()
    import torch._dynamo

    attempts = [ctx.args.compile_backend]
    if ctx.cuda and ctx.args.compile_backend != "cudagraphs":
        attempts.append("cudagraphs")  # needs no C compiler / Triton build, if inductor cannot run here
    try:
        for backend in attempts:
            torch._dynamo.reset()
            options = {"backend": backend}
            if backend == "inductor":
                options["mode"] = ctx.args.compile_mode
            adapter.compile_for_inference(**options)
            try:
                log(f"compile: first call with backend={backend} (compiles)")
                first = rollout_seconds()
                log(f"compile: first compiled rollout {first:.1f} s")
                second = rollout_seconds()  # warm-up: a recompile would show here
            except Exception as error:  # noqa: BLE001 - e.g. no C compiler for Triton: try the next backend
                traceback.print_exc()
                results[f"failed_{backend}"] = f"{type(error).__name__}: {str(error)[:500]}"
                adapter.compile_options = None
                continue
            compiled_times = [rollout_seconds() for _ in range(plan["repeats"])]
            results["backend_used"] = backend
            results["compiled"] = summary(compiled_times)
            results["first_compiled_rollout_s"] = first
            results["second_compiled_rollout_s"] = second
            results["compile_time_s"] = first - results["eager"]["median_s"]
            results["speedup_eager_over_compiled"] = (
                results["eager"]["median_s"] / results["compiled"]["median_s"]
            )
            results["max_latent_difference"] = (rollout_seconds.final - eager_final).abs().max().item()
            results["one_call_max_difference"] = (one_call() - eager_call).abs().max().item()
            results["one_call_max_abs"] = eager_call.abs().max().item()
            break
    finally:
        adapter.compile_options = None
        ctx.free()
    return results


def section_grpo(ctx: Context) -> dict:
    """benchmarks/grpo_step.py's main() on the SD 1.5-architecture pipeline saved as a diffusers folder."""
    import vialign.config

    plan = ctx.plan["grpo"]
    grpo = load_benchmark("grpo_step")
    folder = ctx.tmp / "sd15-random"
    if not folder.exists():
        start = time.perf_counter()
        ctx.pipe().save_pretrained(folder, safe_serialization=True)
        log(f"grpo: saved the pipeline to {folder} in {time.perf_counter() - start:.1f} s")
    original_load_config = vialign.config.load_config

    def load_config(schema, path=None, overrides=(), *rest, **options):  # + this run's dtype and device
        extra = [f"model.dtype={ctx.dtype_name}", f"model.device={ctx.args.device}"]
        return original_load_config(schema, path, [*overrides, *extra], *rest, **options)

    argv = [
        "grpo_step.py",
        "--model", str(folder),
        "--reward", "brightness",  # a programmatic reward: no checkpoint needed
        "--size", str(plan["size"]),
        "--steps", str(plan["steps"]),
        "--group-size", str(plan["group_size"]),
        "--prompts", str(plan["prompts"]),
        "--micro-batch", str(plan["micro_batch"]),
        "--repeats", str(plan["repeats"]),
    ]  # fmt: skip
    recorder, lines = MedianRecorder(), []
    threads = ctx.torch.get_num_threads()
    try:
        with (
            patched(vialign.config, load_config=load_config),
            patched(sys, argv=argv),
            patched(
                grpo,
                time=types.SimpleNamespace(perf_counter=ctx.clock),
                statistics=recorder,
                print=tee_print(lines),
            ),
        ):
            grpo.main()
    finally:
        ctx.torch.set_num_threads(threads)
        ctx.free()
    step, calls = recorder.calls[0], recorder.calls[1]
    return {
        "config": {**plan, "dtype": ctx.dtype_name, "reward": "brightness", "lora_rank": 8},
        "step": summary(step),
        "model_calls": summary(calls),
        "ratio_step_over_calls": statistics.median(step) / statistics.median(calls),
        "target": "ratio <= 1.25",
        "printed": lines,
    }


class ModelOnDevice:
    """A CLIPModel on the device for scoring.py's per-image loop, which passes CPU tensors."""

    def __init__(self, model, device) -> None:
        self.model, self.device = model, device

    def _move(self, inputs: dict) -> dict:
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}

    def get_image_features(self, **inputs):
        return self.model.get_image_features(**self._move(inputs))

    def get_text_features(self, **inputs):
        return self.model.get_text_features(**self._move(inputs))

    def load_state_dict(self, state, *args, **kwargs):
        return self.model.load_state_dict(state, *args, **kwargs)


def section_scoring(ctx: Context) -> dict:
    """benchmarks/scoring.py's pieces at CLIP ViT-L/14 on the device: vialign score vs per-image loop."""
    import numpy as np
    from transformers import CLIPModel, CLIPProcessor

    import rewards
    from vialign.config import ScoreConfig
    from vialign.score import READ_THREADS as read_threads
    from vialign.score import run_score

    plan = ctx.plan["scoring"]
    scoring = load_benchmark("scoring")
    scoring.ARCHITECTURES["vit-l-14"] = CLIP_VIT_L_14
    root = ctx.tmp / "scoring"
    (root / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scoring.make_model(root / "model", plan["architecture"])
    items = scoring.make_images(root / "images", plan["images"], plan["per_prompt"], plan["size"])
    log(f"scoring: model and {len(items)} PNGs written in {time.perf_counter() - start:.1f} s")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(prompt for _, prompt in items) + "\n")
    device = str(ctx.device)
    options = {"pretrained": str(root / "model"), "mode": "cosine"}
    config = ScoreConfig(
        rewards={"clipscore": {"weight": 1.0, "options": options}},
        images=[str(root / "images")],
        prompts_file=str(prompts_file),
        batch_size=plan["batch"],
        out=str(root / "scores.jsonl"),
        overwrite=True,
        device=device,
    )
    reward = rewards.combine({"clipscore": 1.0}, options={"clipscore": {**options, "device": device}})
    model = ModelOnDevice(CLIPModel.from_pretrained(root / "model").eval().to(ctx.device), ctx.device)
    processor = CLIPProcessor.from_pretrained(root / "model")
    scoring.per_image_loop(model, processor, items[:2])  # warm-up of both paths
    run_score(config, progress=False, reward=reward)
    start = ctx.clock()
    reference = scoring.per_image_loop(model, processor, items)
    loop_seconds = ctx.clock() - start
    ours_times = []
    for _ in range(plan.get("repeats", 1)):
        start = ctx.clock()
        report = run_score(config, progress=False, reward=reward)
        ours_times.append(ctx.clock() - start)
    ours_seconds = statistics.median(ours_times)
    reload_items = items[: plan["reload_images"]]
    start = ctx.clock()
    scoring.per_call_reload_loop(model, processor, root / "model" / "model.safetensors", reload_items)
    reload_seconds = ctx.clock() - start
    ours = [row["total"] for row in report.rows]
    images = len(items)
    return {
        "config": {**plan, "dtype": "float32 (both paths)"},
        "per_image_loop_images_per_s": images / loop_seconds,
        "vialign_score_images_per_s": images / ours_seconds,
        "per_call_reload_images_per_s": len(reload_items) / reload_seconds,
        "throughput_ratio_vs_loop": loop_seconds / ours_seconds,
        "throughput_ratio_vs_reload": (images / ours_seconds) / (len(reload_items) / reload_seconds),
        "max_score_difference": float(np.abs(np.array(ours) - np.array(reference)).max()),
        "loop_s": loop_seconds,
        "vialign_s": ours_seconds,
        "vialign_times_s": ours_times,
        "read_threads": read_threads,
        "target": "throughput ratio >= 3",
    }


def training_step_memory(
    ctx: Context, adapter, *, size: int, num_steps: int, world_size: int, prompt: str = "a photo of a cat"
) -> dict:
    """One full fine-tuning step (a rollout with gradients through its last step, checkpointed, the decode,
    backward, AdamW) as vialign's trainer takes it, unsharded (``world_size`` 1) or ``fully_shard``-ed by
    ``vialign.sharding.ShardedDenoiser`` over ``world_size`` ranks of torch's fake process group: one
    process plays rank 0, collectives move no data (the values are meaningless), and the memory rank 0
    holds is what each of ``world_size`` GPUs would hold."""
    import torch
    import torch.distributed as dist

    from vialign.sampling import Sampler, rollout_prompts
    from vialign.sharding import ShardedDenoiser

    denoiser = adapter.unwrapped_denoiser
    full_params = sum(p.numel() for p in denoiser.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    if world_size > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        params = (
            ShardedDenoiser(adapter, world_size).parameters()
            if world_size > 1
            else list(denoiser.parameters())
        )
        for param in params:
            param.requires_grad_(True)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        ctx.free()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        resident = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else 0
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        start = ctx.clock()
        schedule = adapter.schedule(num_steps, size, size)
        sampler = Sampler(sde="ddim" if adapter.kind == "diffusion" else "flow-sde")
        guidance = adapter.make_guidance(None)
        trajectory = rollout_prompts(
            adapter,
            [prompt],
            [0],
            schedule,
            height=size,
            width=size,
            guidance=guidance,
            sampler=sampler,
            grad_steps=1,
            checkpoint=True,
        )
        adapter.decode(trajectory.final, checkpoint=True).float().mean().backward()
        optimizer.step()
        seconds = ctx.clock() - start
        after = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else 0
        peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.cuda else 0
        optimizer.zero_grad(set_to_none=True)
        del optimizer, trajectory
        gb = 2**30
        return {
            "world_size": world_size,
            "denoiser_parameters_M": full_params / 1e6,
            "denoiser_weights_gb": full_bytes / gb,
            "local_parameters_M": sum(p.numel() for p in local) / 1e6,
            "resident_before_step_gb": resident / gb if ctx.cuda else None,
            "after_step_gb": after / gb if ctx.cuda else None,  # + gradients and AdamW moments
            "peak_gb": peak / gb if ctx.cuda else None,
            "step_s": seconds,
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def section_fsdp(ctx: Context) -> dict:
    """Memory per rank of one full fine-tuning step of the SD 1.5 UNet: unsharded vs FSDP2 over 8 ranks."""
    plan = ctx.plan["fsdp"]
    results: dict = {"config": {**plan, "dtype": ctx.dtype_name, "device_memory": "all of the process's"}}
    for world_size in (1, plan["world_size"]):
        pipe = build_sd15(ctx.device, ctx.dtype, tiny=ctx.args.smoke)  # sharding changes the model in place
        adapter = ctx.adapter(pipe)
        results[f"world_size={world_size}"] = training_step_memory(
            ctx, adapter, size=plan["size"], num_steps=plan["steps"], world_size=world_size
        )
        del pipe, adapter
        ctx.free()
    one, many = results["world_size=1"], results[f"world_size={plan['world_size']}"]
    if ctx.cuda:
        results["peak_ratio_sharded_over_unsharded"] = many["peak_gb"] / one["peak_gb"]
    return results


def build_flux(device, dtype, tiny: bool, blocks: tuple[int, int] | None = None):
    """A FluxPipeline with FLUX.1-dev's transformer and VAE architectures, random weights, built on the
    device, without text encoders (prompts are given as embeddings to both paths); ``blocks``: (double,
    single) transformer blocks in place of FLUX.1-dev's (19, 38), at its width."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    start = time.perf_counter()
    torch.manual_seed(0)
    if tiny:  # --smoke: pipelines.tiny's FLUX (the same classes at toy width)
        from pipelines import tiny as tiny_pipelines

        built = tiny_pipelines.build("flux")
        transformer, vae = built.transformer, built.vae
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # 12B parameters: initialise them in the run's dtype, on the device
        layers = {} if blocks is None else {"num_layers": blocks[0], "num_single_layers": blocks[1]}
        try:
            with torch.device(device):
                transformer = FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **layers})
                vae = AutoencoderKL(**FLUX_VAE)
        finally:
            torch.set_default_dtype(default)
    for module in (transformer, vae):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    log(
        f"built {'tiny' if tiny else 'FLUX.1-dev'}-architecture pipeline on {device} in {dtype} "
        f"({time.perf_counter() - start:.1f} s): transformer {count(transformer):.1f}M, vae {count(vae):.1f}M"
    )
    return pipe


def section_flux(ctx: Context) -> dict:
    """FLUX.1-dev's architecture: sampling vialign vs stock FluxPipeline (prompt embeddings given to both),
    then the memory per rank of a full fine-tuning step sharded over 8 ranks."""
    import torch

    from vialign.sampling import rollout_prompts

    plan = ctx.plan["flux"]
    pipe, adapter = flux_adapter(ctx)
    batch, size, steps = plan["batch"], plan["size"], plan["steps"]
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    hidden, pooled = flux_prompt_embeddings(ctx, adapter, prompts)

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(batch)]

    def run_stock():
        with torch.no_grad():
            return pipe(
                prompt_embeds=hidden,
                pooled_prompt_embeds=pooled,
                num_inference_steps=steps,
                guidance_scale=plan["guidance"],
                height=size,
                width=size,
                generator=generators(),
                output_type="pt",
            ).images

    def run_vialign():
        with torch.no_grad():
            schedule = adapter.schedule(steps, size, size)
            trajectory = rollout_prompts(
                adapter,
                prompts,
                range(batch),
                schedule,
                height=size,
                width=size,
                guidance=adapter.make_guidance(plan["guidance"]),
            )
            return adapter.decode(trajectory.final)

    reference, ours = run_stock(), run_vialign()  # warm-up, and the same computation
    max_diff = (reference.float() - ours.float()).abs().max().item()
    times: dict[str, list[float]] = {"stock": [], "vialign": []}
    for _ in range(plan["repeats"]):
        for name, fn in (("stock", run_stock), ("vialign", run_vialign)):
            start = ctx.clock()
            fn()
            times[name].append(ctx.clock() - start)
    results: dict = {
        "config": {**plan, "dtype": ctx.dtype_name, "prompt_embeddings": "random, given to both paths"},
        "stock": summary(times["stock"]),
        "vialign": summary(times["vialign"]),
        "ratio_vialign_over_stock": statistics.median(times["vialign"]) / statistics.median(times["stock"]),
        "max_pixel_difference": max_diff,
    }
    log(f"flux sampling: ratio {results['ratio_vialign_over_stock']:.3f}, max pixel diff {max_diff:.1e}")
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters()) / 2**30
    # unsharded full fine-tuning holds weights, gradients and AdamW's two moments (all in the weights'
    # dtype here) before any activation: computed, not run (it does not fit beside the rest)
    results["unsharded_weights_grads_adam_gb"] = 4 * weights
    # the closures above hold these: rebinding (not del) frees the 12B model
    reference = ours = pipe = adapter = hidden = pooled = None
    ctx.free()  # the child builds its own 12B model
    if ctx.seconds_left() > 60:
        results["fsdp"] = child_section(ctx, "flux_fsdp")
        if "error" in results["fsdp"]:
            variants = {
                "fsdp_2_2_blocks": ["--flux-blocks", "2", "2"],
                "fsdp_2_2_blocks_2_ranks": ["--flux-blocks", "2", "2", "--flux-world-size", "2"],
            }
            for key, options in variants.items():
                if ctx.seconds_left() > 60:
                    results[key] = child_section(ctx, "flux_fsdp", options)
    return results


def flux_adapter(ctx: Context):
    """The random FLUX.1-dev-architecture pipeline (``--flux-blocks``: fewer blocks) and its adapter."""
    import pipelines

    pipe = build_flux(ctx.device, ctx.dtype, tiny=ctx.args.smoke, blocks=ctx.args.flux_blocks)
    adapter = pipelines.FluxAdapter.from_pipeline(
        pipe, model_id="flux-dev-random", device=ctx.device, dtype=ctx.dtype
    )
    return pipe, adapter


def flux_prompt_embeddings(ctx: Context, adapter, prompts: list[str]):
    """Random T5 and CLIP-pooled embeddings, one per prompt, put in the adapter's prompt cache (there are
    no text encoders); returned batched for the stock pipeline."""
    import torch

    from pipelines.embeds import PromptEmbeds

    config = adapter.unwrapped_denoiser.config
    generator = torch.Generator(ctx.device).manual_seed(0)
    batch = len(prompts)
    hidden = torch.randn(batch, 512, config.joint_attention_dim, generator=generator, device=ctx.device)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator, device=ctx.device)
    hidden, pooled = hidden.to(ctx.dtype), pooled.to(ctx.dtype)
    for i, prompt in enumerate(prompts):
        adapter.prompt_cache.put(
            [prompt], PromptEmbeds({"hidden_states": hidden[i : i + 1], "pooled": pooled[i : i + 1]})
        )
    return hidden, pooled


def section_flux_fsdp(ctx: Context) -> dict:
    """One full fine-tuning step of FLUX.1-dev's architecture sharded over fake ranks (section 7 runs it in
    a child process: :func:`child_section`)."""
    plan = ctx.plan["flux"]
    pipe, adapter = flux_adapter(ctx)
    prompt = "a photo of object number 0"
    flux_prompt_embeddings(ctx, adapter, [prompt])
    world_size = ctx.args.flux_world_size or plan["world_size"]
    result = training_step_memory(
        ctx,
        adapter,
        size=plan["fsdp_size"],
        num_steps=plan["fsdp_steps"],
        world_size=world_size,
        prompt=prompt,
    )
    result["blocks"] = list(
        ctx.args.flux_blocks
        or (pipe.transformer.config.num_layers, pipe.transformer.config.num_single_layers)
    )
    return result


def child_section(ctx: Context, name: str, options: tuple[str, ...] | list[str] = ()) -> dict:
    """Section ``name`` of this script in a child process with ``CUDA_LAUNCH_BLOCKING=1``: its result, or
    {"error": the child's last lines, "returncode"} when it failed (a CUDA fault cannot spoil this
    process's context). The child gets this run's device, dtype, plan and the seconds left."""
    out = ctx.tmp / f"child-{name}-{len(list(ctx.tmp.glob('child-*')))}.json"
    left = max(ctx.seconds_left() - 10, 30)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--device",
        str(ctx.device),
        "--dtype",
        ctx.dtype_name,
        "--sections",
        name,
        "--budget",
        str(int(left)),
        "--hard-limit",
        str(int(left)),
        "--out",
        str(out),
        *(["--smoke"] if ctx.args.smoke else []),
        *options,
    ]
    log(f"child: {' '.join(command[2:])}")
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=left + 30)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {left + 30:.0f} s", "options": list(options)}
    section = {}
    if out.exists():
        section = json.loads(out.read_text()).get("sections", {}).get(name, {})
    if done.returncode == 0 and section.get("status") == "ok":
        return {**section["result"], "options": list(options)}
    lines = (done.stdout + done.stderr).strip().splitlines()
    tail = [line for line in lines if not line.startswith("[")][-25:]
    log(f"child {name} {options} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return {
        "error": section.get("error") or (tail[-1] if tail else f"exit {done.returncode}"),
        "returncode": done.returncode,
        "log_tail": tail,
        "options": list(options),
    }


RUNNERS = {
    "sampling": section_sampling,
    "memory": section_memory,
    "compile": section_compile,
    "grpo": section_grpo,
    "scoring": section_scoring,
    "fsdp": section_fsdp,
    "flux": section_flux,
    "flux_fsdp": section_flux_fsdp,
}


# ---------------------------------------------------------------------------------------------- report
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _stock_vs_vialign_rows(r: dict, setting: str, ratio_note: str) -> list[tuple[str, str, str]]:
    """The three rows of a sampling comparison: stock and vialign medians, and their ratio."""
    return [
        ("stock median s", _fmt(r["stock"]["median_s"]), setting),
        (
            "vialign median s",
            _fmt(r["vialign"]["median_s"]),
            f"{r['vialign']['runs']} runs each, alternating",
        ),
        ("ratio vialign/stock", _fmt(r["ratio_vialign_over_stock"]), ratio_note),
    ]


def _section_rows(name: str, r: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if name == "sampling":
        c = r["config"]
        diff = r["max_pixel_difference"]
        rows += _stock_vs_vialign_rows(
            r,
            f"{c['size']}px, {c['steps']} steps, batch {c['batch']}, CFG {c['guidance']}, {c['dtype']}",
            f"minima ratio {_fmt(r['ratio_of_minima'])}; target <= 1.05",
        )
        rows.append(("max pixel diff", "-" if diff is None else f"{diff:.1e}", ""))
    elif name == "memory":
        for key, row in r.items():
            if not key.startswith("N="):
                continue
            for mode in ("nograd", "checkpoint", "checkpoint_graph", "selective", "offload", "plain"):
                if mode not in row:
                    continue
                m = row[mode]
                if "median_s" in m:
                    rows.append(
                        (
                            f"{key} {mode}",
                            f"{m['median_s']:.3f} s",
                            f"peak +{_fmt(m['peak_above_weights_gb'], 2)} GB",
                        )
                    )
                else:
                    rows.append((f"{key} {mode}", "-", str(m.get("skipped") or m.get("oom") or "")[:120]))
            for mode in ("checkpoint", "checkpoint_graph", "selective", "offload"):
                ratios = row.get(f"{mode}_over_plain")
                if ratios:
                    rows.append(
                        (
                            f"{key} {mode}/plain",
                            f"time {ratios['time']:.2f}",
                            f"memory {_fmt(ratios.get('memory'))} (without grads "
                            f"{_fmt(ratios.get('memory_without_grads'))}); same loss {ratios['same_loss']}"
                            + (
                                "; target time <= 1.35"
                                if mode != "offload"
                                else "; GPU memory, host RAM grows"
                            ),
                        )
                    )
    elif name == "compile":
        c = r["config"]
        rows.append(
            (
                "eager rollout median s",
                _fmt(r["eager"]["median_s"]),
                f"{c['size']}px, {c['steps']} steps, batch {c['batch']}",
            )
        )
        if "eager_float32_vs_this_dtype_max_latent_difference" in r:
            rows.append(
                (
                    "eager float32 vs this dtype",
                    f"{r['eager_float32_vs_this_dtype_max_latent_difference']:.1e}",
                    "max final-latent difference: the rounding yardstick for the compiled one",
                )
            )
        if "compiled" in r:
            rows += [
                (
                    "compiled rollout median s",
                    _fmt(r["compiled"]["median_s"]),
                    f"backend {r['backend_used']}",
                ),
                (
                    "speedup eager/compiled",
                    _fmt(r["speedup_eager_over_compiled"]),
                    f"max latent diff {r['max_latent_difference']:.1e}",
                ),
                (
                    "compile time s",
                    _fmt(r["compile_time_s"], 1),
                    f"first compiled rollout {r['first_compiled_rollout_s']:.1f} s minus eager median",
                ),
                (
                    "one call compiled vs eager",
                    f"{r['one_call_max_difference']:.1e}",
                    f"max abs difference of one guided prediction (its max |value| {r['one_call_max_abs']:.1f})",
                ),
            ]
        for key in r:
            if key.startswith("failed_"):
                rows.append((key, "-", str(r[key])[:150].replace("|", "/").replace("\n", " ")))
    elif name == "grpo":
        c = r["config"]
        rows += [
            (
                "GRPO step median s",
                _fmt(r["step"]["median_s"]),
                f"{c['prompts']}x{c['group_size']} samples, {c['steps']} steps, {c['size']}px",
            ),
            ("model calls median s", _fmt(r["model_calls"]["median_s"]), ""),
            ("ratio step/calls", _fmt(r["ratio_step_over_calls"]), "target <= 1.25"),
        ]
    elif name == "scoring":
        c = r["config"]
        rows += [
            (
                "per-image loop img/s",
                _fmt(r["per_image_loop_images_per_s"], 1),
                f"CLIP {c['architecture']}, {c['images']} PNGs {c['size']}px",
            ),
            (
                "vialign score img/s",
                _fmt(r["vialign_score_images_per_s"], 1),
                f"batch {c['batch']}, {r.get('read_threads', '?')} read threads, median of "
                f"{len(r.get('vialign_times_s', [1]))} runs",
            ),
            (
                "ratio vs loop",
                _fmt(r["throughput_ratio_vs_loop"], 2),
                f"vs per-call reload {_fmt(r['throughput_ratio_vs_reload'], 1)}; max score diff {r['max_score_difference']:.1e}",
            ),
        ]
    elif name == "fsdp":
        c = r["config"]
        for key in ("world_size=1", f"world_size={c['world_size']}"):
            m = r.get(key, {})
            rows.append(
                (
                    f"{key} peak GB",
                    _fmt(m.get("peak_gb"), 2),
                    f"resident {_fmt(m.get('resident_before_step_gb'), 2)} GB, after the step (+grads, AdamW) "
                    f"{_fmt(m.get('after_step_gb'), 2)} GB; {m.get('local_parameters_M', 0):.0f}M of "
                    f"{m.get('denoiser_parameters_M', 0):.0f}M parameters; {c['size']}px",
                )
            )
        if "peak_ratio_sharded_over_unsharded" in r:
            rows.append(("peak sharded/unsharded", _fmt(r["peak_ratio_sharded_over_unsharded"]), "per rank"))
    elif name == "flux":
        c = r["config"]
        rows += _stock_vs_vialign_rows(
            r,
            f"{c['size']}px, {c['steps']} steps, batch {c['batch']}, guidance {c['guidance']}, {c['dtype']}",
            f"max pixel diff {r['max_pixel_difference']:.1e}; target <= 1.05",
        )
        for key in ("fsdp", "fsdp_2_2_blocks", "fsdp_2_2_blocks_2_ranks"):
            if key not in r:
                continue
            m = r[key]
            label = f"FSDP {' '.join(m.get('options', [])) or 'as planned'}"
            if "error" in m:
                rows.append((label, "failed", f"exit {m.get('returncode')}: {str(m['error'])[:300]}"))
                continue
            rows.append(
                (
                    f"{label}: x{m['world_size']} peak GB/rank",
                    _fmt(m.get("peak_gb"), 2),
                    f"full fine-tuning step, {c['fsdp_size']}px, blocks {m.get('blocks')}; resident "
                    f"{_fmt(m.get('resident_before_step_gb'), 2)} GB, after step {_fmt(m.get('after_step_gb'), 2)} "
                    f"GB; unsharded weights+grads+AdamW alone {_fmt(r.get('unsharded_weights_grads_adam_gb'), 1)} "
                    "GB (computed)",
                )
            )
    elif name == "flux_fsdp":
        rows.append(
            (f"x{r['world_size']} peak GB/rank", _fmt(r.get("peak_gb"), 2), f"blocks {r.get('blocks')}")
        )
    return rows


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [
        f"### vialign GPU benchmarks ({env.get('device_name', env.get('device'))}, torch {env.get('torch')}, "
        f"{env.get('dtype')}{', SMOKE' if env.get('smoke') else ''})",
        "",
        "| # | section | measure | value | notes | section s |",
        "|---|---|---|---|---|---|",
    ]
    number = {v: k for k, v in SECTIONS.items()}
    for name, section in report["sections"].items():
        n = number.get(name, "?")
        seconds = f"{section['seconds']:.0f}" if "seconds" in section else "-"
        if section.get("status") != "ok":
            reason = (
                str(section.get("reason") or section.get("error", ""))[:200]
                .replace("|", "/")
                .replace("\n", " ")
            )
            lines.append(f"| {n} | {name} | {section.get('status')} | - | {reason} | {seconds} |")
            continue
        try:
            rows = _section_rows(name, section["result"])
        except Exception as error:  # noqa: BLE001 - the table must not lose the run
            rows = [("(table error)", "-", f"{type(error).__name__}: {error}; see the JSON")]
        for i, (measure, value, notes) in enumerate(rows):
            first = i == 0
            lines.append(
                f"| {n if first else ''} | {name if first else ''} | {measure} | {value} | {notes} | {seconds if first else ''} |"
            )
    return "\n".join(lines)


def write(report: dict, out: Path | None) -> None:
    if out is None:
        return
    if out.suffix == ".json":
        json_file, md_file = out, out.with_suffix(".md")
    else:
        out.mkdir(parents=True, exist_ok=True)
        json_file, md_file = out / "gpu.json", out / "gpu.md"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(report, indent=2, default=str))
    md_file.write_text(markdown(report) + "\n")


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for gpu.json and gpu.md (or a .json file)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds; later sections are skipped after it"
    )
    parser.add_argument(
        "--hard-limit",
        type=float,
        default=None,
        help="seconds; stop (and write) at once (default budget + 120)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["1", "2", "4", "5", "6", "7", "3"],
        help="order to run; 1 sampling, 2 memory, 3 compile, 4 grpo, 5 scoring, 6 fsdp, 7 flux (compile "
        "last: the longest)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny configs and few steps (checks the script)")
    parser.add_argument(
        "--memory-steps",
        type=int,
        nargs="+",
        default=None,
        help="memory section: these N only (no large row)",
    )
    parser.add_argument(
        "--memory-repeats", type=int, default=None, help="memory section: timed runs per mode"
    )
    parser.add_argument(
        "--memory-modes",
        nargs="+",
        default=None,
        choices=["nograd", "checkpoint", "checkpoint_graph", "selective", "offload", "plain"],
        help="memory section: these modes only",
    )
    parser.add_argument(
        "--flux-blocks",
        type=int,
        nargs=2,
        default=None,
        metavar=("DOUBLE", "SINGLE"),
        help="FLUX sections: this many double and single blocks (FLUX.1-dev: 19 38)",
    )
    parser.add_argument(
        "--flux-world-size", type=int, default=None, help="section 8: fake ranks (default the plan's 8)"
    )
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode for inductor (default: its default)"
    )
    parser.add_argument(
        "--install-wheels", type=Path, default=None, help="install missing wheels of this folder and exit"
    )
    args = parser.parse_args()
    if args.install_wheels is not None:
        raise SystemExit(install_wheels(args.install_wheels))
    sections = [SECTIONS.get(s, s) for s in args.sections]
    unknown = [s for s in sections if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")

    hard_limit = args.hard_limit if args.hard_limit is not None else args.budget + 120

    def on_alarm(signum, frame):
        raise HardLimit(f"hard limit of {hard_limit:.0f} s reached")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, int(hard_limit)))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    notes = prepare_imports()
    for note in notes:
        log(note)
    import diffusers
    import torch
    import transformers

    for name in ("pipelines", "vialign", "rewards", "vialign.sampling", "vialign.trainer", "vialign.score"):
        try:
            __import__(name)  # import errors show here, before any section (which then fails alone)
        except Exception:  # noqa: BLE001
            log(f"importing {name} failed:")
            traceback.print_exc()
    ctx = Context(args)
    environment = {
        "device": str(ctx.device),
        "dtype": ctx.dtype_name,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "import_notes": notes,
        "budget_s": args.budget,
        "hard_limit_s": hard_limit,
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        environment.update(device_name=props.name, device_memory_gb=round(props.total_memory / 2**30, 1))
    report: dict = {"environment": environment, "sections": {}}
    log(f"environment: {json.dumps(environment)}")
    try:
        environment["parameters_M"] = architecture_check()
        log(f"real-architecture parameter counts (meta device): {environment['parameters_M']}")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    stop_reason = None
    for name in sections:
        elapsed = time.perf_counter() - START
        if stop_reason is None and elapsed > args.budget:
            stop_reason = f"time budget of {args.budget:.0f} s used up ({elapsed:.0f} s)"
        if stop_reason is not None:
            report["sections"][name] = {"status": "skipped", "reason": stop_reason}
            log(f"section {name}: skipped ({stop_reason})")
            write(report, args.out)
            continue
        log(f"section {name}: start ({ctx.seconds_left():.0f} s of budget left) {ctx.memory_gb()}")
        start = time.perf_counter()
        try:
            result = RUNNERS[name](ctx)
            status = "skipped" if "skipped" in result and len(result) == 1 else "ok"
            report["sections"][name] = {
                "status": status,
                "seconds": time.perf_counter() - start,
                "result": result,
            }
            if status == "skipped":
                report["sections"][name]["reason"] = result["skipped"]
        except HardLimit as error:
            traceback.print_exc()
            stop_reason = str(error)
            report["sections"][name] = {
                "status": "stopped",
                "seconds": time.perf_counter() - start,
                "error": stop_reason,
            }
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - one section's failure (even SystemExit) must not end the run
            traceback.print_exc()
            report["sections"][name] = {
                "status": "failed",
                "seconds": time.perf_counter() - start,
                "error": f"{type(error).__name__}: {str(error)[:1000]}",
            }
        finally:
            with contextlib.suppress(BaseException):
                ctx.free()
        log(
            f"section {name}: {report['sections'][name]['status']} in {time.perf_counter() - start:.1f} s {ctx.memory_gb()}"
        )
        if report["sections"][name]["status"] == "ok":
            print(json.dumps(report["sections"][name]["result"], default=str)[:3000], flush=True)
        write(report, args.out)
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    import shutil

    shutil.rmtree(ctx.tmp, ignore_errors=True)  # the saved pipeline and CLIP model (a few GB)
    report["total_seconds"] = time.perf_counter() - START
    write(report, args.out)
    print()
    print(markdown(report))
    log(f"done in {report['total_seconds']:.1f} s" + (f"; results in {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
