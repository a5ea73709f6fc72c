"""``vialign sample``: generate images with a rollout, write PNGs and a ``samples.jsonl`` index.

Image ``i`` is drawn from ``torch.Generator("cpu").manual_seed(seed + i)`` (its initial noise and, with
an SDE, its step noise), so it does not depend on the batch size beyond the last bits of floating point
(kernels may round differently at another batch size), and with ``--sampler ode`` it is the image the
stock diffusers pipeline gives for the same prompt, steps, guidance, size and generator. ``--resume``
makes whole batches again, so a resumed folder is byte-identical to one uninterrupted run.

Under ``accelerate launch --num_processes N`` (or ``torchrun``) each process makes every N-th batch of
the images still to make (the batches one process makes, so the same kernels round the same way), on
its own GPU (``cuda:LOCAL_RANK``), and writes those PNGs and their rows in ``samples.rankR.jsonl``; the
main process writes ``samples.jsonl`` and, at the end, merges the other processes' rows into it in
image order. The folder ends with the bytes one process writes.

Video models (Wan, CogVideoX) write sample i as ``NNNNN.mp4`` (H.264, yuv420p, :func:`vialign.media.write_video`)
and with ``save_frames`` its frames as lossless PNGs in ``NNNNN_frames/`` too; their rows add ``num_frames``
and ``fps`` (and ``frames_dir``). ``num_frames``, ``fps`` and ``save_frames`` are refused for image models,
and wrong frame counts and sizes are refused before the model loads wherever its id tells the family
(built-ins, local folders, hub ids in the local cache; otherwise right after it loads, before any sampling).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.errors import PipelineInputError
from pipelines.loading import ModelPreview, preview_model
from vialign.config import ModelConfig, SampleConfig
from vialign.data import read_prompt_file
from vialign.errors import ConfigError, VialignInputError
from vialign.files import DiskWriteError, JsonlAppender, write_atomically
from vialign.launch import Launch, launched_processes, process_device, rank_files, read_rows_and_parts
from vialign.sampling import Sampler, rollout_prompts, sde_sampler

INDEX_FILE = "samples.jsonl"
# the frame rates the stock pipelines' examples export at (diffusers' WanPipeline and CogVideoXPipeline
# docstrings: export_to_video(..., fps=16) and fps=8); a model folder's vialign.json may set "fps"
DEFAULT_FPS = {"wan": 16, "cogvideox": 8}
FALLBACK_FPS = 16
VIDEO_FLAGS = (("num_frames", "--num-frames"), ("fps", "--fps"), ("save_frames", "--save-frames"))
logger = logging.getLogger(__name__)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a JSONL file with ``prompt``."""
    path = Path(path)
    if not path.is_file():
        raise VialignInputError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in read_prompt_file(path) if line.strip()]
    if not prompts:
        raise VialignInputError(f"prompts file {path} holds no prompts")
    return prompts


def load_model(model: ModelConfig, *, device: str | None = None, with_lora: bool = True) -> GeneratorAdapter:
    """The adapter a ``model:`` config section names (``device`` overrides ``model.device``; the trainer
    loads ``model.lora`` itself, as trainable weights, with ``with_lora=False``)."""
    from pipelines import load_pipeline
    from pipelines.errors import PipelineInputError

    if model.prompt_embeds is not None and not os.path.exists(model.prompt_embeds):
        raise ConfigError(
            f"model.prompt_embeds: {model.prompt_embeds} not found; write it with `vialign precompute-embeds "
            "--config CONFIG` (a training config) or `vialign precompute-embeds --model "
            f"{model.path} --prompts FILE --out {model.prompt_embeds}`"
        )
    adapter = load_pipeline(
        model.path,
        device=device or model.device,
        dtype=model.dtype,
        attention=model.attention,
        lora=model.lora if with_lora else None,
        use_t5=model.use_t5,
        max_sequence_length=model.max_sequence_length,
        clip_skip=model.clip_skip,
        text_encoders=model.prompt_embeds is None,  # precomputed: never loaded, their memory is saved
    )
    if model.prompt_embeds is not None:
        adapter.load_prompt_embeds(model.prompt_embeds)
    try:
        adapter.override_scheduler(**model.scheduler.model_dump())
    except PipelineInputError as error:
        raise ConfigError(f"model.scheduler: {error}") from None
    if model.compile:
        adapter.compile_for_inference(mode=model.compile_mode)
    return adapter


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """B x 3 x H x W in [0, 1] -> B x H x W x 3 uint8, rounded as diffusers' ``numpy_to_pil``."""
    return (pixels.detach().permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: Path, *, kept: str = "nothing was changed") -> None:
    """Write a PNG atomically (temporary name, then rename)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue(), kept=kept)


def png_problem(path: Path) -> str | None:
    """Why the PNG at ``path`` cannot be used (missing, truncated, failing its CRCs), or None."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.load()  # decompresses every row: a cut-short or corrupted file fails here
    except (OSError, SyntaxError, ValueError) as error:
        return f"damaged ({error})"
    return None


# ------------------------------------------------------------------------------------------- videos
def video_flags_given(config: SampleConfig) -> list[str]:
    """The video-only settings a config sets, as ``key (--flag)``."""
    return [f"{key} ({flag})" for key, flag in VIDEO_FLAGS if getattr(config, key) not in (None, False)]


def check_media(config: SampleConfig, family: str, is_video: bool) -> None:
    """What must fit the kind of model (images or videos): the video-only settings and the steering
    rewards' modality."""
    model = config.model.path
    if not is_video:
        given = video_flags_given(config)
        if given:
            raise VialignInputError(
                f"{', '.join(given)} apply to video models only, but {model} ({family}) generates images: "
                "drop them, or pass a video model (e.g. --model tiny-wan)"
            )
    steer = config.steer
    if steer.method is None:
        return
    import rewards
    from rewards.video import FRAME_MODES

    known = {info.name: info for info in rewards.list_rewards()}
    for name, spec in steer.rewards.items():
        info, frames = known.get(name), spec.options.get("frames")
        if info is None:
            continue  # check_steering names the unknown reward
        if frames is not None and frames not in FRAME_MODES:
            raise VialignInputError(
                f"steering reward {name!r}: frames={frames!r} is not a frame strategy; choose one of "
                f"{', '.join(FRAME_MODES)}"
            )
        if is_video and info.modality == "image" and frames is None:
            raise VialignInputError(
                f"steering reward {name!r} scores images, but {model} ({family}) generates videos: give it a "
                f"frame strategy, --reward-option {name}.frames=uniform (steer.rewards.{name}.options.frames: "
                f"{'|'.join(FRAME_MODES)}; num_frames sets how many for uniform, default 8)"
            )
        if not is_video and info.modality == "video":
            raise VialignInputError(
                f"steering reward {name!r} scores videos, but {model} ({family}) generates images: steer it "
                "with an image reward (see vialign score --list-rewards)"
            )


def check_video_request(config: SampleConfig, preview: ModelPreview | None) -> None:
    """Before the model loads, where its id tells the family (``pipelines.loading.preview_model``): video
    settings for an image model, frame counts and sizes a video model cannot make (the adapter's own
    checks, on its config files), steering it cannot run."""
    if preview is None:
        return
    check_media(config, preview.family, preview.is_video)
    if not preview.is_video or preview.checks is None:
        return
    num_frames = config.num_frames if config.num_frames is not None else preview.default_num_frames
    try:
        preview.checks.check_frames(num_frames)
        if config.height is not None or config.width is not None:
            default_height, default_width = preview.checks.default_size
            preview.checks.check_size(config.height or default_height, config.width or default_width)
    except PipelineInputError as error:
        raise VialignInputError(str(error)) from None


def png_frames_problem(folder: Path, count: int) -> str | None:
    """Why ``folder`` does not hold ``count`` readable frames as :func:`vialign.media.write_frames` names
    them, or None."""
    if not folder.is_dir():
        return f"missing its frames folder {folder.name}"
    digits = max(3, len(str(count - 1)))
    for k in range(count):
        name = f"frame_{k:0{digits}d}.png"
        problem = png_problem(folder / name)
        if problem is not None:
            return f"missing a frame ({folder.name}/{name} is {problem})"
    return None


@dataclass(frozen=True)
class VideoOutput:
    """How a video model's samples are written: ``NNNNN.mp4`` at ``fps``, and with ``save_frames`` their
    frames as lossless PNGs in ``NNNNN_frames/``."""

    num_frames: int
    fps: float
    save_frames: bool = False

    def settings(self) -> dict:
        return {"num_frames": self.num_frames, "fps": self.fps}

    def write(self, video: torch.Tensor, out: Path, i: int, *, kept: str) -> dict:
        """Write sample ``i`` (``F x 3 x H x W`` in [0, 1]): the frames first, then the MP4 (the index
        names it last, so it never names a missing file); returns the row's file fields."""
        from vialign.media import write_frames, write_video

        path = out / f"{i:05d}.mp4"
        fields = {"file": path.name}
        try:
            if self.save_frames:
                folder = out / f"{i:05d}_frames"
                written = set(write_frames(video, folder))
                for stale in folder.glob("frame_*.png"):  # of an earlier run with more frames
                    if stale not in written:
                        stale.unlink()
                fields["frames_dir"] = folder.name
            write_video(video, path, self.fps)
        except DiskWriteError as error:
            raise DiskWriteError(f"{error}; {kept}") from error
        return fields

    def problem(self, out: Path, row: dict) -> str | None:
        """Why the files of an earlier run's ``row`` cannot be kept (missing, not decoding to the
        row's frames and size), or None."""
        from vialign.media import MediaError, read_video

        path = out / row.get("file", "")
        if not path.is_file():
            return "missing"
        try:
            video = read_video(path, max_frames=self.num_frames + 1, uint8=True)  # 3 x T x H x W
        except MediaError as error:
            return f"damaged ({error})"
        found = tuple(int(n) for n in video.shape[1:])
        expected = (self.num_frames, row.get("height"), row.get("width"))
        if found != expected:
            return f"damaged (frames x height x width {found}, expected {expected})"
        if self.save_frames:
            return png_frames_problem(out / str(row.get("frames_dir", "")), self.num_frames)
        return None


def video_output(
    config: SampleConfig, adapter: GeneratorAdapter, preview: ModelPreview | None
) -> VideoOutput | None:
    """The loaded model's checks of the video settings (all of them again: :func:`check_video_request`
    could not run for a model its id does not tell), and how its samples are written; None for images."""
    check_media(config, adapter.family, adapter.is_video)
    if not adapter.is_video:
        return None
    num_frames = config.num_frames if config.num_frames is not None else adapter.default_num_frames
    adapter.check_frames(num_frames)
    # every rollout of this job draws num_frames frames: rollout_prompts and the steering methods draw x_0
    # with the adapter's default (as load_pipeline sets a vialign.json's num_frames)
    adapter.default_num_frames = num_frames
    fps = config.fps
    if fps is None:
        fps = (preview.defaults if preview is not None else {}).get("fps")
        if fps is not None and (
            isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < 1e4
        ):
            raise VialignInputError(
                f"fps={fps!r} in {config.model.path}'s vialign.json is not a positive number; fix it or pass --fps"
            )
    fps = float(fps if fps is not None else DEFAULT_FPS.get(adapter.family, FALLBACK_FPS))
    return VideoOutput(num_frames, int(fps) if fps.is_integer() else fps, config.save_frames)


def resumable_rows(
    index_path: Path,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: dict,
    video: VideoOutput | None = None,
) -> dict[int, dict]:
    """The rows of an interrupted run's index (and of its other processes' rows, not merged yet) that this
    call would make again identically, by image index. A row whose PNG (video: MP4, or a saved frame) is
    missing or damaged is dropped (made again, with a warning); a row made with other settings, another
    prompt or seed is an error: resuming would mix two runs."""
    done: dict[int, dict] = {}
    for row in read_rows_and_parts(index_path):
        i = row.get("index")
        if not isinstance(i, int) or not 0 <= i < len(prompts):
            raise VialignInputError(
                f"--resume: {index_path} names image index {i!r}, but this call makes {len(prompts)} images; "
                "resume with the same prompts, or pass --overwrite"
            )
        expected = {"prompt": prompts[i], "seed": seeds[i], **settings}
        for key, value in expected.items():
            if row.get(key) != value:
                raise VialignInputError(
                    f"--resume: {index_path} row {i} was made with {key}={row.get(key)!r}, this call has "
                    f"{key}={value!r}; resume with the settings of the interrupted run, or pass --overwrite"
                )
        if video is not None and ("frames_dir" in row) != video.save_frames:
            raise VialignInputError(
                f"--resume: {index_path} row {i} was made with save_frames={'frames_dir' in row}, this call "
                f"has save_frames={video.save_frames} (--save-frames); resume with the settings of the "
                "interrupted run, or pass --overwrite"
            )
        if video is None:
            problem = png_problem(index_path.parent / row.get("file", ""))
        else:
            problem = video.problem(index_path.parent, row)
        if problem is not None:
            logger.warning("--resume: %s is %s; it is made again", row.get("file"), problem)
            continue
        done[i] = row
    return done


def generate_images(
    adapter: GeneratorAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int,
    height: int,
    width: int,
    guidance: Guidance,
    sampler: Sampler = Sampler(),
    negative_prompt: str | None = None,
    batch_size: int = 4,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, pixels)`` batch by batch; ``pixels`` are B x 3 x H x W floats in [0, 1] (video
    models: ``B x F x 3 x H x W``, ``adapter.default_num_frames`` frames)."""
    if len(prompts) != len(seeds):
        raise VialignInputError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    schedule = adapter.schedule(num_steps, height, width)
    sampler.check(schedule)
    for start in range(0, len(prompts), batch_size):
        indices = list(range(start, min(start + batch_size, len(prompts))))
        with torch.no_grad():
            trajectory = rollout_prompts(
                adapter,
                [prompts[i] for i in indices],
                [seeds[i] for i in indices],
                schedule,
                height=height,
                width=width,
                guidance=guidance,
                negative_prompt=negative_prompt,
                sampler=sampler,
            )
            yield indices, adapter.decode(trajectory.final)


def batches_to_remake(done: dict[int, dict] | set[int], count: int, batch_size: int) -> list[int]:
    """The image indices of every batch (``batch_size`` consecutive images from 0) that lacks an image
    in ``done``, in order: batch by batch, so they are made in the batches an uninterrupted run used."""
    todo: list[int] = []
    for start in range(0, count, batch_size):
        batch = range(start, min(start + batch_size, count))
        if any(i not in done for i in batch):
            todo.extend(batch)
    return todo


@dataclass
class SampleReport:
    out: Path
    files: list[Path]  # every image of the run; under a launcher, those this process made (but main: all)
    height: int
    width: int
    main_process: bool = True  # under a launcher, only the main process reports
    num_frames: int | None = None  # video models: frames per video
    fps: float | None = None  # video models: frame rate of the MP4s


def check_steering(config: SampleConfig) -> None:
    """Everything about ``steer`` that can be wrong, checked before any model loads: reward names, their
    gradients (ReNO, guidance), the resampling / guidance window against the model's default steps."""
    from pipelines.loading import model_defaults
    from vialign.steering import DIFFERENTIABLE_METHODS, GuidanceSettings, SMCSettings

    steer = config.steer
    if steer.method is None:
        return
    import rewards

    known = {info.name: info for info in rewards.list_rewards()}
    for name in steer.rewards:
        if name not in known:
            rewards.load_reward(name)  # raises the helpful unknown-name error
    if steer.method in DIFFERENTIABLE_METHODS:
        for name in steer.rewards:
            if not known[name].differentiable:
                usable = [i.name for i in known.values() if i.differentiable and not i.judge]
                raise VialignInputError(
                    f"--steer {steer.method} follows the reward's gradient, but {name!r} is not differentiable; "
                    f"use one of: {', '.join(usable)} (or --steer best-of-n / smc, which need no gradient)"
                )
    num_steps = config.sampler.num_steps
    if num_steps is None:
        try:
            num_steps = int(model_defaults(config.model.path).get("num_steps", 20))
        except Exception:  # a hub id without a local folder: checked again once the model is loaded
            return
    if steer.method == "smc":
        problem = SMCSettings(**steer.smc.model_dump()).problem(num_steps)
    elif steer.method == "guidance":
        problem = GuidanceSettings(**steer.guidance.model_dump()).problem(num_steps)
    else:
        problem = None
    if problem:
        raise VialignInputError(f"{problem} (sampler.num_steps={num_steps})")


def load_steering_reward(config: SampleConfig, device: torch.device):
    """The weighted steering reward of ``steer.rewards``, frozen, on ``device``."""
    import rewards

    specs = config.steer.rewards
    reward = rewards.combine(
        {n: s.weight for n, s in specs.items()}, {n: s.options for n, s in specs.items()}
    )
    reward = reward.to(device).eval()
    for p in reward.parameters():
        p.requires_grad_(False)
    return reward


def images_per_batch(config: SampleConfig) -> int:
    """Images made per batch: ``batch_size``, or with best-of-N / SMC as many prompts as fit their
    particles in a batch."""
    if config.steer.method in ("best-of-n", "smc"):
        return max(1, config.batch_size // config.steer.particles)
    return config.batch_size


def steer_batches(
    adapter: GeneratorAdapter,
    reward,
    config: SampleConfig,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setup,
) -> Iterator[tuple[list[int], object, float]]:
    """Yield ``(indices, SteeringResult, seconds)`` for consecutive chunks of prompts."""
    import time

    from vialign import steering

    steer = config.steer
    per_chunk = images_per_batch(config)
    for start in range(0, len(prompts), per_chunk):
        indices = list(range(start, min(start + per_chunk, len(prompts))))
        chunk_prompts, chunk_seeds = [prompts[i] for i in indices], [seeds[i] for i in indices]
        began = time.perf_counter()
        common = dict(batch_size=config.batch_size)
        if steer.method == "best-of-n":
            result = steering.best_of_n(
                adapter, reward, chunk_prompts, chunk_seeds, setup, n=steer.particles, **common
            )
        elif steer.method == "smc":
            result = steering.smc(
                adapter,
                reward,
                chunk_prompts,
                chunk_seeds,
                setup,
                particles=steer.particles,
                settings=steering.SMCSettings(**steer.smc.model_dump()),
                **common,
            )
        elif steer.method == "reno":
            result = steering.reno(
                adapter,
                reward,
                chunk_prompts,
                chunk_seeds,
                setup,
                settings=steering.RenoSettings(**steer.reno.model_dump()),
                **common,
            )
        else:
            result = steering.reward_guidance(
                adapter,
                reward,
                chunk_prompts,
                chunk_seeds,
                setup,
                settings=steering.GuidanceSettings(**steer.guidance.model_dump()),
                **common,
            )
        yield indices, result, time.perf_counter() - began


def steer_settings(config: SampleConfig) -> dict:
    """What ``samples.jsonl`` records of the steering method and its options."""
    steer = config.steer
    options: dict = {"rewards": {n: spec.weight for n, spec in steer.rewards.items()}}
    if steer.method in ("best-of-n", "smc"):
        options["particles"] = steer.particles
    if steer.method in ("smc", "reno", "guidance"):
        options.update(getattr(steer, steer.method).model_dump())
    return {"steer": steer.method, "steer_options": options}


def run_sample(config: SampleConfig, *, progress: bool = True, launch: Launch | None = None) -> SampleReport:
    """The ``vialign sample`` job: validate everything, load the model, sample, write files. ``launch``:
    this process's share of the work (default: the processes a launcher started, else one)."""
    if launch is None:
        with launched_processes() as launch:
            return run_sample(config, progress=progress, launch=launch)
    check_steering(config)
    preview = preview_model(config.model.path)
    check_video_request(config, preview)  # before the model loads, where its id tells the family
    prompts = list(config.prompts) + (read_prompts(config.prompts_file) if config.prompts_file else [])
    if not prompts:
        raise VialignInputError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    out = Path(config.out)
    index_path = out / INDEX_FILE
    if out.exists() and not out.is_dir():
        raise VialignInputError(f"--out {out} exists and is not a folder")
    if config.resume and config.overwrite:
        raise VialignInputError(
            "pass --resume (finish the run in --out) or --overwrite (replace it), not both"
        )
    earlier = index_path if index_path.exists() else next(iter(rank_files(index_path)), None)
    if earlier is not None and not (config.overwrite or config.resume):
        raise VialignInputError(
            f"{earlier} already exists (an earlier run); pass --resume to finish it, --overwrite to "
            "replace it, or choose another --out"
        )
    sampler_config = config.sampler
    model = config.model
    adapter = load_model(model, device=process_device(model.device, launch))
    video = video_output(config, adapter, preview)  # None for image models
    default_height, default_width = adapter.default_size
    height, width = config.height or default_height, config.width or default_width
    adapter.check_size(height, width)
    sampler = Sampler()
    if sampler_config.kind == "sde":
        sampler = sde_sampler(
            adapter.kind, sampler_config.sde_kind, sampler_config.noise_level, sampler_config.sde_window
        )
    num_steps = sampler_config.num_steps or adapter.default_num_steps
    sampler.check(adapter.schedule(num_steps, height, width))
    guidance = adapter.make_guidance(sampler_config.guidance_scale, sampler_config.true_cfg_scale)
    if sampler_config.negative_prompt is not None and not guidance.uses_uncond:
        logger.warning("the negative prompt has no effect: classifier-free guidance is off (scale <= 1)")
    seeds = [config.seed + i for i in range(len(prompts))]
    settings = {
        "model": model.path,
        "lora": model.lora,
        "family": adapter.family,
        "sampler": sampler_config.kind,
        "sde_kind": sampler.sde,
        "noise_level": sampler.level if sampler.sde else None,
        "sde_window": list(sampler.sde_window) if sampler.sde_window else None,
        "num_steps": num_steps,
        "guidance_scale": guidance.embedded if guidance.embedded is not None else guidance.cfg_scale,
        "true_cfg_scale": sampler_config.true_cfg_scale if adapter.family == "flux" else None,
        "negative_prompt": sampler_config.negative_prompt,
        "height": height,
        "width": width,
        **(video.settings() if video is not None else {}),
        "dtype": model.dtype,
    }
    if config.steer.method is not None:
        settings.update(steer_settings(config))
    noun = "images" if video is None else "videos"
    done: dict[int, dict] = {}
    if launch.is_main and config.resume and earlier is not None:
        done = resumable_rows(index_path, prompts, seeds, settings, video)
        logger.info("--resume: %d of %d %s are complete in %s", len(done), len(prompts), noun, out)
    elif launch.is_main and config.resume:
        logger.info("--resume: %s has no %s yet; making all %d %s", out, INDEX_FILE, len(prompts), noun)
    done = launch.from_main(done)  # every process has passed the checks above before anything is written
    per_batch = images_per_batch(config)
    # Whole batches of the interrupted run are made again, not just their missing images: CPU and GPU
    # kernels may round differently at another batch size, and a resumed folder should be the bytes
    # one uninterrupted run writes on the same machine. Under a launcher each process makes whole
    # batches of that list, for the same reason.
    todo = batches_to_remake(done, len(prompts), per_batch)
    todo = launch.share([todo[start : start + per_batch] for start in range(0, len(todo), per_batch)])
    if config.steer.method is not None:
        from vialign.steering import SamplingSetup

        setup = SamplingSetup(
            adapter.schedule(num_steps, height, width),
            height,
            width,
            guidance,
            sampler,
            sampler_config.negative_prompt,
        )
        reward = load_steering_reward(config, adapter.device)  # before any file is opened
        batches = (
            (indices, result.pixels, result, seconds)
            for indices, result, seconds in steer_batches(
                adapter, reward, config, [prompts[i] for i in todo], [seeds[i] for i in todo], setup
            )
        )
    else:
        batches = (
            (indices, pixels, None, None)
            for indices, pixels in generate_images(
                adapter,
                [prompts[i] for i in todo],
                [seeds[i] for i in todo],
                num_steps=num_steps,
                height=height,
                width=width,
                guidance=guidance,
                sampler=sampler,
                negative_prompt=sampler_config.negative_prompt,
                batch_size=config.batch_size,
            )
        )
    out.mkdir(parents=True, exist_ok=True)
    if launch.is_main:
        if done:  # the index again without rows whose image is made again, before anything is appended
            rows = [done[i] for i in sorted(done)]
            write_atomically(index_path, "".join(json.dumps(row) + "\n" for row in rows))
        for part in rank_files(index_path):  # its rows are in `done` and the index now, or are redone
            part.unlink()
    launch.barrier()  # the index is settled before the other processes append their rows
    own_index = launch.own_file(index_path)
    files: list[Path] = [out / done[i]["file"] for i in sorted(done)]

    def kept() -> str:
        return (
            f"the {len(files)} {noun} before it are in {out} and indexed in {own_index.name}: free some space "
            "and finish with --resume"
        )

    total, initial = (
        (len(prompts), len(done)) if launch.world_size == 1 else (sum(i not in done for i in todo), 0)
    )
    with (
        JsonlAppender(own_index, fresh=not done or not launch.is_main, kept=kept()) as index,
        tqdm(
            total=total,
            initial=initial,
            unit="img" if video is None else "video",
            desc=f"vialign sample{launch.name}",
            disable=not progress or not launch.is_main,
        ) as bar,
    ):
        for batch, pixels, steered, seconds in batches:
            indices = [todo[j] for j in batch]
            samples = to_uint8(pixels) if video is None else pixels  # video: F x 3 x H x W floats each
            for row, (i, sample) in enumerate(zip(indices, samples)):
                if i in done:  # remade only because its batch had a missing image; the file is kept
                    continue
                index.kept = kept()
                if video is None:
                    path = out / f"{i:05d}.png"
                    save_png(sample, path, kept=kept())  # the PNG first: the index never names a missing file
                    written = {"file": path.name}
                else:
                    written = video.write(sample, out, i, kept=kept())
                    path = out / written["file"]
                record = {**written, "prompt": prompts[i], "seed": seeds[i], "index": i, **settings}
                if steered is not None:
                    record.update(
                        steer_reward=float(steered.reward[row]),
                        nfe=round(steered.model_calls, 2),  # denoiser evaluations per image
                        wall_s=round(seconds / len(indices), 3),  # the chunk's time, per image
                        steer_details=steered.details[row],
                    )
                index.write([record])
                files.append(path)
            bar.update(sum(i not in done for i in indices))
    launch.barrier()  # every process's rows are on disk
    if launch.is_main and (done or launch.world_size > 1):
        # rows in image order, as one uninterrupted process writes them; the other processes' rows
        # are merged in (written first, then their files removed: a crash between leaves a duplicate)
        rows = {row["index"]: row for row in read_rows_and_parts(index_path)}
        write_atomically(index_path, "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows)))
        for part in rank_files(index_path):
            part.unlink()
        files = [out / rows[i]["file"] for i in sorted(rows)]
    return SampleReport(
        out=out,
        files=files,
        height=height,
        width=width,
        main_process=launch.is_main,
        num_frames=video.num_frames if video is not None else None,
        fps=video.fps if video is not None else None,
    )
