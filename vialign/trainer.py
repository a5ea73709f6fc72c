"""The shared trainer: everything a training algorithm needs that is not the algorithm itself.

    vialign train configs/quickstart.yaml                   # one process
    accelerate launch --multi_gpu --num_processes 2 -m vialign train configs/quickstart.yaml

It owns prompt data (train and held-out), the generator adapter (image or video: ``model.num_frames``,
checked against the model before it loads where its family is known) with LoRA or full fine-tuning, the
training rewards, AdamW with warm-up and decay, gradient clipping, an EMA of the trainable weights,
processes (accelerate starts them; gradients are summed over them once per optimizer step,
``vialign.distributed``), periodic evaluation with its own rewards and a pixel-diversity measure,
logging (``metrics.jsonl`` + TensorBoard), atomic checkpoints with resume, and the final export
(diffusers LoRA weights, or a full pipeline folder).

The algorithm is looked up by name in the registry (``vialign.algorithms``); the trainer asks it what
it needs (a differentiable reward, a reference model) and hands it a :class:`TrainingContext`, never
itself (docs/architecture.md). Every source of randomness is keyed by (seed, step, global sample index)
(``vialign.algorithms.sample_seed``), so a run needs no RNG state to resume, and N processes draw
exactly the samples one process would draw for the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from vialign.algorithms import TrainingContext, get_algorithm
from vialign.algorithms.base import VideoPixelsReward
from vialign.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from vialign.config import TrainConfig
from vialign.data import load_prompts, split_prompts
from vialign.distributed import Processes
from vialign.errors import ConfigError, VialignInputError
from vialign.files import JsonlAppender, disk_error, read_jsonl_rows, write_atomically
from vialign.media import reward_layout
from vialign.seeds import mix_seed
from vialign.sharding import check_launcher, copy_full_, full_tensor, scalar, shard_optimizer_state

logger = logging.getLogger(__name__)

SHAPEWORLD_ORACLE = "shapeworld-oracle"
ORACLES = (SHAPEWORLD_ORACLE, "shapeworld-video-oracle")  # logged as eval/oracle_accuracy too

# mix_seed(seed, REFERENCE_SEED_STREAM, prompt_key(prompt), m): the noise of reward shaping's reference samples
REFERENCE_SEED_STREAM = 0x50415200  # "PAR\0"


def prompt_key(prompt: str) -> int:
    """A stable 64-bit integer of a prompt: the first 8 bytes (big-endian) of the SHA-256 of its UTF-8."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")


def reference_seed(seed: int, prompt: str, index: int) -> int:
    """The noise seed of the ``index``-th (0-based) reference-policy sample of ``prompt`` for reward shaping
    (``rewards.<name>.shaping`` par / centered): ``mix_seed(seed, REFERENCE_SEED_STREAM, prompt_key(prompt),
    index)``. It depends on no step, process or batch, so a prompt's reference images are the same whenever
    and wherever they are first needed (and after a resume)."""
    return mix_seed(seed, REFERENCE_SEED_STREAM, prompt_key(prompt), index)


def grid_frames(num_frames: int) -> list[int]:
    """The frames of a video that evaluation grids show: first, middle and last."""
    return [0, (num_frames - 1) // 2, num_frames - 1]


def check_rewards_fit_the_model(config: TrainConfig, family: str, is_video: bool) -> None:
    """An image-only reward on a video model needs a frame strategy; a video-only reward cannot score
    images. Read from the reward registry, so nothing is loaded."""
    from rewards.registry import REGISTRY

    path = config.model.path
    for name, spec in config.rewards.items():
        entry = REGISTRY.get(name)
        if entry is None:  # an unknown name: loading the rewards names the choices
            continue
        modality = entry.info.modality
        if is_video and modality == "image" and spec.options.get("frames") is None:
            raise ConfigError(
                f"rewards.{name}: {name} scores images, and {path} is a {family} video model: give it a "
                f"frame strategy, e.g. rewards: {{{name}: {{options: {{frames: uniform, num_frames: 8}}}}}} "
                "(frames: uniform, first-middle-last, random or all; the frames' scores are averaged)"
            )
        if not is_video and modality == "video":
            raise ConfigError(
                f"rewards.{name}: {name} scores videos, and {path} is a {family} image model: choose an "
                "image reward"
            )
    for name in config.eval.rewards:
        entry = REGISTRY.get(name)
        if name in config.rewards or entry is None:
            continue
        if is_video and entry.info.modality == "image":
            raise ConfigError(
                f"eval.rewards: {name} scores images, and {path} is a {family} video model: evaluate with a "
                f"video reward (e.g. shapeworld-video-oracle, temporal-consistency), or list {name} under "
                "rewards with a frame strategy (options: {frames: uniform, num_frames: 8})"
            )
        if not is_video and entry.info.modality == "video":
            raise ConfigError(f"eval.rewards: {name} scores videos, and {path} is a {family} image model")


def check_model_sizes(config: TrainConfig, checker: Any, num_frames: int | None) -> None:
    """``sampler.height`` / ``sampler.width`` (when set) and ``num_frames`` (video models) against the
    model's size multiples and its VAE's frame rule; ``checker`` is the adapter or a stand-in."""
    from pipelines.errors import PipelineInputError

    height, width = config.sampler.height, config.sampler.width
    try:
        if height is not None or width is not None:
            default_h, default_w = checker.default_size
            checker.check_size(height or default_h, width or default_w)
    except PipelineInputError as error:
        raise ConfigError(f"sampler.height / sampler.width: {error}") from None
    try:
        if num_frames is not None:
            checker.check_frames(num_frames)
    except PipelineInputError as error:
        raise ConfigError(f"model.num_frames: {error}") from None


def check_model_before_load(config: TrainConfig) -> None:
    """What can be checked of the model before loading it, where its family is known (a built-in name, or
    ``model_index.json``): ``model.num_frames`` for video models only, rewards that fit images or
    videos, no preference pairs on video, and (from the VAE's and denoiser's config files) the size and
    frame count. The loaded model is checked again (:meth:`Trainer._check_model`)."""
    from pipelines.loading import preview_model

    preview = preview_model(config.model.path)
    if preview is None:
        return
    check_model_kind(config, preview.family, preview.is_video)
    checker = preview.checks
    if checker is None:
        return
    try:
        check_model_sizes(config, checker, config.model.num_frames if preview.is_video else None)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - the stand-in lacks something: the loaded model is checked instead
        logger.debug("size check before loading skipped for %s", config.model.path, exc_info=True)


def check_model_kind(config: TrainConfig, family: str, is_video: bool) -> None:
    if not is_video and config.model.num_frames is not None:
        raise ConfigError(
            f"model.num_frames is for video models; {config.model.path} is a {family} image model: remove "
            "model.num_frames"
        )
    if is_video and get_algorithm(config.algorithm).data == "preference_pairs":
        raise ConfigError(
            f"algorithm={config.algorithm} trains on preference pairs of images; {config.model.path} is a "
            f"{family} video model: use an algorithm that samples its own videos (grpo, draft, online_dpo, "
            "...)"
        )
    check_rewards_fit_the_model(config, family, is_video)


class ReferenceRewards:
    """``references(prompts) -> [B, M]`` of one shaped reward (par, centered): for each prompt, the reward of
    M images the reference policy (the model before training) samples with the ODE along the training
    schedule and guidance, from :func:`reference_seed`; computed once per prompt and cached (checkpointed
    as ``state.json["reward_shaping"][name]["references"]``)."""

    def __init__(self, trainer: Trainer, reward: Any, samples: int):
        self.trainer, self.reward, self.samples = trainer, reward, samples
        self.cache: dict[str, list[float]] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for prompt in dict.fromkeys(prompts):
            if prompt not in self.cache:
                self.cache[prompt] = self.trainer.sample_reference_rewards(self.reward, prompt, self.samples)
        return torch.tensor([self.cache[prompt] for prompt in prompts], dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"references": {prompt: list(values) for prompt, values in self.cache.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache = {
            prompt: [float(v) for v in values] for prompt, values in state.get("references", {}).items()
        }


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (1-based): linear warm-up, then the schedule."""
    if warmup and step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def ema_decay(update: int, decay: float, warmup: bool) -> float:
    """The EMA decay after the ``update``-th optimizer update (1-based): ``decay``, or with ``warmup`` the
    ramp of diffusers' ``EMAModel`` (ImageReward's ReFL) and Flow-GRPO's ``EMAModuleWrapper``: 0 at the
    first update (the average starts at the trained weights), then ``min(decay, (1 + n) / (10 + n))``,
    n = update - 1."""
    if not warmup:
        return decay
    n = update - 1
    return 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))


class MetricsLogger:
    """``metrics.jsonl`` (one object per logged step: ``step`` and metric names) and TensorBoard."""

    def __init__(self, output_dir: Path, tensorboard: bool, resume_step: int | None):
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # rows written after the checkpoint are re-made (identically) by the resumed run
            kept = [row for row in read_jsonl_rows(self.path) if row.get("step", 0) <= resume_step]
            write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self.rows = JsonlAppender(
            self.path,
            fresh=resume_step is None,
            kept="the checkpoints written so far are intact: free some disk space and continue with --resume",
        )
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise VialignInputError(
                    "train.tensorboard=true needs the tensorboard package (pip install tensorboard); "
                    "or set train.tensorboard=false"
                ) from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if v is not None else None) for k, v in metrics.items()}}
        self.rows.write([row])
        if self.writer is not None:
            for name, value in metrics.items():
                if value is not None and math.isfinite(float(value)):
                    self.writer.add_scalar(name, float(value), step)
            self.writer.flush()

    def close(self) -> None:
        self.rows.close()
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """Set up from a :class:`TrainConfig`; :meth:`train` runs it. See the module docstring."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool = True):
        from accelerate import Accelerator

        self.config, self.progress = config, progress
        # without CUDA (or when asked for the CPU), processes started by `accelerate launch` / torchrun
        # form a gloo group on the CPU; Accelerator() alone would leave each one on its own
        on_cpu = config.model.device == "cpu" or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=on_cpu)
        self.processes = Processes(
            self.accelerator.process_index, self.accelerator.num_processes, self.accelerator.device
        )
        self.algorithm_class = get_algorithm(config.algorithm)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        # the data first: a missing prompt set stops the run before output_dir is touched
        self.train_prompts, self.eval_prompts = self._prompts()
        self.regression_prompts = self._regression_prompts()
        check_model_before_load(config)  # before output_dir is touched and before the model loads
        self._check_output_dir(resume)
        self.adapter = self._load_model()
        self.num_frames = self._check_model()
        self.trainable = self._setup_finetuning()
        self.preferences = self._encode_preferences()
        self.reward = self._load_rewards()
        self.optimizer = self._optimizer()
        self.ema = [p.detach().clone().float() for p in self.trainable] if config.finetune.ema_decay else None
        self.optimizer_updates = 0  # optimizer steps taken (an algorithm may take several per training step)
        self.reference_denoiser = self._reference()
        self.reference_snapshot: list[torch.Tensor] | None = (
            None  # LoRA: the reference's weights, once refreshed
        )
        self.reference_refreshed = False
        self.algorithm = self.algorithm_class(config.settings, self.context())
        self.start_step = 1
        resume_step = self._resume() if resume else None
        self.metrics = (
            MetricsLogger(self.output_dir, config.train.tensorboard, resume_step) if self.is_main else None
        )
        if self.is_main and resume_step is None:
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
            )

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.processes.world_size

    def context(self) -> TrainingContext:
        """What the algorithm sees of this trainer."""
        adapter, sampling = self.adapter, self.config.sampler
        height, width = self.image_size()
        reward = self.reward
        if reward is not None and self.num_frames is not None:
            reward = VideoPixelsReward(reward)  # decoded B x F x 3 x H x W -> the rewards' B x 3 x F x H x W
        return TrainingContext(
            adapter=adapter,
            reward=reward,
            reward_weights={name: spec.weight for name, spec in self.config.rewards.items()},
            prompts=self.train_prompts,
            seed=self.config.seed,
            num_steps=sampling.num_steps or adapter.default_num_steps,
            height=height,
            width=width,
            guidance=adapter.make_guidance(sampling.guidance_scale),
            sampling=sampling,
            preferences=self.preferences,
            prompt_dropout=self.config.data.prompt_dropout,
            processes=self.processes,
            reference=self.reference,
            optimizer_step=self.optimizer_step,
            refresh_reference=self.refresh_reference,
            num_frames=self.num_frames,
        )

    def _check_output_dir(self, resume: bool) -> None:
        earlier = (self.output_dir / "metrics.jsonl").exists() or list_checkpoints(self.checkpoint_dir)
        if resume:
            self.resume_from, skipped = latest_checkpoint(self.checkpoint_dir)
            for path, problem in skipped:
                if self.is_main:
                    logger.warning("--resume: skipped %s: %s (left on disk)", path, problem)
            if self.resume_from is None:
                raise VialignInputError(
                    f"--resume: no complete checkpoint in {self.checkpoint_dir}"
                    + (f" ({len(skipped)} damaged, named above)" if skipped else "")
                    + "; start without --resume"
                )
            return
        if earlier and not self.config.overwrite:
            raise VialignInputError(
                f"{self.output_dir} holds an earlier run; pass --resume to continue it, overwrite=true to "
                "start over (its checkpoints and metrics are deleted), or choose another output_dir=..."
            )
        if earlier and self.is_main:
            for name in ("checkpoints", "tensorboard", "final", "eval"):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
            (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _prompts(self) -> tuple[list[str], list[str]]:
        data = self.config.data
        if self.algorithm_class.data == "preference_pairs":
            from vialign.preferences import read_preference_pairs

            self.preference_data = read_preference_pairs(data.train)
            logger.info("data.train: %s", self.preference_data.summary())
            train = [pair.prompt for pair in self.preference_data.pairs]
        else:
            train = load_prompts(data.train, data.prompt_column)
        if data.eval is not None:
            held_out = list(dict.fromkeys(load_prompts(data.eval, data.prompt_column)))
            overlap = set(train) & set(held_out)
            if overlap:  # allowed (a smoke run may want it), but its gains are not held out
                logger.warning(
                    "%d of the %d evaluation prompts are training prompts too (e.g. %r): gains measured on "
                    "them are not held out; choose disjoint data.train and data.eval (shapeworld:align and "
                    "shapeworld:eval)",
                    len(overlap),
                    len(held_out),
                    sorted(overlap)[0],
                )
            return train, held_out
        if data.eval_fraction > 0:
            return split_prompts(train, data.eval_fraction, self.config.seed)
        return train, []

    def _encode_preferences(self):
        """The preference pairs' latents (``vialign.preferences.encode_pairs``), for data="preference_pairs"."""
        if self.algorithm_class.data != "preference_pairs":
            return None
        from vialign.preferences import encode_pairs

        height, width = self.image_size()
        cache = self.config.data.latent_cache or self.output_dir / "latent_cache"
        # the main process fills the cache; the others then read it (no two writers in one folder)
        if self.is_main:
            latents = encode_pairs(self.preference_data.pairs, self.adapter, height, width, cache_dir=cache)
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            latents = encode_pairs(self.preference_data.pairs, self.adapter, height, width, cache_dir=cache)
        return latents

    def _regression_prompts(self) -> list[str]:
        """``eval.regression_prompts``: prompts the model already renders, where a drop is forgetting."""
        spec = self.config.eval.regression_prompts
        if spec is None:
            return []
        return list(dict.fromkeys(load_prompts(spec, self.config.data.prompt_column)))

    def _load_model(self):
        from vialign.sample import load_model

        model = self.config.model
        device = self.accelerator.device if model.device == "auto" else model.device
        if torch.device(device).type == "cpu":
            # accelerate names the CPU of a multi-process run "cpu:0"; some CPU kernels take another path for
            # an indexed device, in the last bits, and N processes must compute what one does
            device = "cpu"
        if model.prompt_embeds is not None:  # no text encoders: every prompt the run encodes is in the file
            from vialign.precompute import check_precomputed, needed_prompts

            data = self.train_prompts, self.eval_prompts, self.regression_prompts
            check_precomputed(self.config, needed_prompts(self.config, *data))
        return load_model(model, device=str(device), with_lora=False)

    def _check_model(self) -> int | None:
        """The loaded model against the config (whatever could not be checked before loading it); returns
        the frames per video (``model.num_frames`` or the model's default) for video models, else None."""
        adapter, config = self.adapter, self.config
        check_model_kind(config, adapter.family, adapter.is_video)
        num_frames = (config.model.num_frames or adapter.default_num_frames) if adapter.is_video else None
        check_model_sizes(config, adapter, num_frames)
        if num_frames is not None:
            # the model's default from now on too: calls that take it (evaluation through
            # vialign.sample.generate_images) make videos of model.num_frames frames as well
            adapter.default_num_frames = num_frames
        return num_frames

    def _setup_finetuning(self) -> list[torch.nn.Parameter]:
        finetune, adapter = self.config.finetune, self.adapter
        denoiser = adapter.unwrapped_denoiser
        self.sharded = None  # finetune.sharding=fsdp over 2+ processes: a vialign.sharding.ShardedDenoiser
        check_launcher(self.accelerator.distributed_type)  # not accelerate's FSDP plugin: vialign shards
        if finetune.method == "lora":
            if self.config.model.lora:
                adapter.load_lora(self.config.model.lora)  # continue training these LoRA weights
                for param in adapter.lora_parameters():
                    param.data = param.data.float()
                    param.requires_grad_(True)
            else:
                with torch.random.fork_rng(devices=[]):  # LoRA A is drawn at random: same seed, same start
                    torch.manual_seed(self.config.seed)
                    adapter.add_lora(finetune.lora_rank, finetune.lora_alpha, finetune.lora_targets)
            params = adapter.lora_parameters()
        else:
            if self.config.model.lora:
                raise VialignInputError(
                    "model.lora is for finetune.method=lora; fuse it first for full fine-tuning"
                )
            denoiser.requires_grad_(True)
            params = [p for p in denoiser.parameters()]
        if finetune.gradient_checkpointing:
            if not hasattr(denoiser, "enable_gradient_checkpointing"):
                raise VialignInputError(
                    f"the {adapter.denoiser_name} does not support gradient checkpointing"
                )
            denoiser.enable_gradient_checkpointing()
        if finetune.sharding == "fsdp":
            params = self._shard()
        denoiser.eval()  # algorithms switch to train mode for their gradient passes (context.train_mode)
        return params

    def _shard(self) -> list[torch.nn.Parameter]:
        """finetune.sharding=fsdp: shard the denoiser over the processes (``vialign.sharding``); its
        sharded parameters are the trainable ones."""
        if self.world_size == 1:
            logger.info("finetune.sharding=fsdp on one process: nothing to shard, the run trains unsharded")
            return list(self.adapter.unwrapped_denoiser.parameters())
        from vialign.sharding import ShardedDenoiser

        mixed_precision = self.config.finetune.fsdp_mixed_precision
        self.sharded = ShardedDenoiser(self.adapter, self.world_size, mixed_precision=mixed_precision)
        return self.sharded.parameters()

    def _load_rewards(self):
        import rewards
        from rewards.shaping import ShapedReward

        specs = self.config.rewards
        self.reference_rewards: dict[str, ReferenceRewards] = {}
        self.initial_denoiser: torch.nn.Module | None = None  # full fine-tuning: the reference of shaping
        self.initial_is_reference = False  # ... shared with the algorithm's frozen copy until that changes
        if not specs:  # an algorithm that needs no reward (the config checked the others have one)
            return None
        shaped = {}
        for name, spec in specs.items():
            if spec.shaping is None:
                continue
            shaping, inner = spec.shaping, rewards.load_reward(name, **spec.options)
            references = None
            if shaping.needs_references:
                references = ReferenceRewards(self, inner, shaping.reference_samples)
                self.reference_rewards[name] = references
            shaped[name] = ShapedReward(
                inner,
                shaping.kind,
                k=shaping.k,
                value=shaping.value,
                references=references,
                gather=self.processes.gather,  # clip: running statistics of the global batch
            )
        if self.reference_rewards and self.config.finetune.method == "full":
            if self.algorithm_class.needs_reference(self.config.settings):
                self.initial_is_reference = True  # _reference() makes the frozen copy; shared until refreshed
            else:
                self.initial_denoiser = self._frozen_copy()
        reward = rewards.combine(
            {name: spec.weight for name, spec in specs.items()},
            {name: spec.options for name, spec in specs.items() if name not in shaped},
            rewards=shaped,
        )
        if self.algorithm_class.reward == "differentiable":
            for component in reward.components.values():
                rewards.require_differentiable(component, f"algorithm={self.config.algorithm}")
        judges = [name for name, r in reward.components.items() if r.info.judge]
        if judges:
            logger.warning(
                "training on %s, an evaluation judge: improvements it measures are no longer held out", judges
            )
        return reward.to(self.adapter.device).eval()

    def _optimizer(self) -> torch.optim.Optimizer:
        optim = self.config.optim
        if optim.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise VialignInputError(
                    "optim.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                    "or use optim.optimizer=adamw"
                ) from None
            cls = bnb.optim.AdamW8bit
        elif optim.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(
                self.trainable,
                lr=optim.lr,
                weight_decay=optim.weight_decay,
                clip_threshold=1.0,
                scale_parameter=False,
                relative_step=False,
                warmup_init=False,
            )
        else:
            cls = torch.optim.AdamW
        return cls(
            self.trainable, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        )

    def _reference(self) -> torch.nn.Module | None:
        """Full fine-tuning keeps a frozen copy of the initial denoiser when the algorithm uses a reference
        (LoRA disables its adapter instead)."""
        config = self.config
        if config.finetune.method != "full" or not self.algorithm_class.needs_reference(config.settings):
            return None
        return self._frozen_copy()

    def _frozen_copy(self) -> torch.nn.Module:
        if self.sharded is not None:  # whole on every process, gathered from the shards
            reference = self.sharded.frozen_copy()
        else:
            reference = copy.deepcopy(self.adapter.unwrapped_denoiser).requires_grad_(False).eval()
        return reference.to("cpu") if self.config.finetune.reference_on_cpu else reference

    # ------------------------------------------------------------------ reward shaping's reference policy
    def _keep_initial_denoiser(self) -> None:
        """Before the algorithm's frozen copy changes (a refresh, or a resume restoring a refreshed one),
        reward shaping takes its own copy of the initial weights."""
        if self.initial_is_reference and self.reference_denoiser is not None:
            self.initial_denoiser = copy.deepcopy(self.reference_denoiser)
        self.initial_is_reference = False

    @contextlib.contextmanager
    def initial_policy(self) -> Iterator[None]:
        """The model before training inside the block, whatever the caller's context (also inside
        ``reference()`` of a refreshed reference): LoRA disabled, or the frozen initial copy (full
        fine-tuning); the denoiser in eval mode. Weights are never written, so a live autograd graph (a
        differentiable reward inside a gradient step) is untouched."""
        adapter = self.adapter
        if self.config.finetune.method == "lora":
            from peft.tuners.tuners_utils import BaseTunerLayer

            denoiser = adapter.unwrapped_denoiser
            active = any(not m.disable_adapters for m in denoiser.modules() if isinstance(m, BaseTunerLayer))
            training = denoiser.training
            denoiser.eval()
            try:
                with adapter.lora_disabled() if active else contextlib.nullcontext():
                    yield
            finally:
                denoiser.train(training)
            return
        initial = self.reference_denoiser if self.initial_is_reference else self.initial_denoiser
        moved = (  # finetune.reference_on_cpu: on the device while sampling (unless a caller already moved it)
            self.config.finetune.reference_on_cpu
            and next(initial.parameters()).device.type == "cpu"
            and torch.device(adapter.device).type != "cpu"
        )
        if moved:
            initial.to(adapter.device)
        previous, adapter.denoiser = adapter.denoiser, initial
        try:
            yield
        finally:
            adapter.denoiser = previous
            if moved:
                initial.to("cpu")

    def sample_reference_rewards(self, reward: Any, prompt: str, count: int) -> list[float]:
        """``reward`` of ``count`` images of ``prompt`` from the reference policy (:meth:`initial_policy`):
        ODE along the training schedule and guidance, one batch of ``count``, noise from
        :func:`reference_seed` (explicit generators; the global RNG is forked, so training draws are
        untouched)."""
        from vialign.sampling import Sampler, rollout_prompts

        adapter, sampling = self.adapter, self.config.sampler
        height, width = self.image_size()
        schedule = adapter.schedule(sampling.num_steps or adapter.default_num_steps, height, width)
        seeds = [reference_seed(self.config.seed, prompt, m) for m in range(count)]
        devices = [adapter.device] if torch.device(adapter.device).type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            with self.initial_policy():
                trajectory = rollout_prompts(
                    adapter,
                    [prompt] * count,
                    seeds,
                    schedule,
                    height=height,
                    width=width,
                    guidance=adapter.make_guidance(sampling.guidance_scale),
                    sampler=Sampler(),
                    num_frames=self.num_frames,
                )
            pixels = reward_layout(adapter.decode(trajectory.final))
            scores = reward(pixels, [prompt] * count).score.float().cpu()
        if not torch.isfinite(scores).all():
            logger.warning(
                "reward shaping: the reference reward of %r is not finite (%s): its shaped rewards will be NaN",
                prompt,
                scores.tolist(),
            )
        return scores.tolist()

    def shaping_state(self) -> dict[str, Any]:
        """JSON-serialisable state of the shaped rewards: reference caches and running clip statistics."""
        state: dict[str, Any] = {}
        components = self.reward.components if self.reward is not None else {}
        for name, component in components.items():
            if hasattr(component, "shaping_state"):
                state[name] = dict(component.shaping_state())
                if name in self.reference_rewards:
                    state[name].update(self.reference_rewards[name].state_dict())
        return state

    def load_shaping_state(self, state: dict[str, Any]) -> None:
        for name, saved in state.items():
            if self.reward is None or name not in self.reward.components:
                continue
            component = self.reward.components[name]
            if hasattr(component, "load_shaping_state"):
                component.load_shaping_state(saved)
            if name in self.reference_rewards:
                self.reference_rewards[name].load_state_dict(saved)

    # ------------------------------------------------------------------ services for algorithms
    def _refreshed_reference(self) -> list[torch.Tensor] | None:
        """The reference's weights (in the order of the trainable ones) once refreshed, else None."""
        if not self.reference_refreshed:
            return None
        if self.reference_denoiser is not None:
            return [p.detach() for p in self.reference_denoiser.parameters()]
        return self.reference_snapshot

    def refresh_reference(self) -> None:
        """Make the reference the current policy (online DPO's reference updates): the frozen copy takes the
        trained weights (full fine-tuning), or a snapshot of the LoRA weights replaces "LoRA disabled"."""
        self._keep_initial_denoiser()
        with torch.no_grad():
            if self.reference_denoiser is not None:
                for target, param in zip(self.reference_denoiser.parameters(), self.trainable):
                    target.copy_(full_tensor(param))  # sharded: gathered whole
            else:
                self.reference_snapshot = [p.detach().clone() for p in self.trainable]
        self.reference_refreshed = True

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy of KL terms: LoRA disabled (or its refreshed snapshot), or the frozen copy
        for full fine-tuning."""
        if self.reference_denoiser is None and self.reference_snapshot is not None:
            with self.trainable_replaced_by(self.reference_snapshot):
                yield
            return
        if self.reference_denoiser is None:
            with self.adapter.lora_disabled():
                yield
            return
        reference = self.reference_denoiser
        offloaded = self.config.finetune.reference_on_cpu
        if offloaded:
            reference.to(self.adapter.device)
        self.adapter.denoiser = reference
        try:
            yield
        finally:
            self.adapter.denoiser = self.adapter.unwrapped_denoiser
            if offloaded:
                reference.to("cpu")

    def optimizer_step(self, step: int) -> float:
        """Sum the gradients over processes, clip, step, zero them, update the EMA; returns the gradient
        norm before clipping."""
        self.processes.sum_gradients(self.trainable)
        optim = self.config.optim
        factor = lr_factor(step, optim.warmup_steps, self.config.train.max_steps, optim.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = optim.lr * factor
        max_norm = optim.max_grad_norm if optim.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)  # sharded: the global norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_updates += 1
        finetune = self.config.finetune
        if self.ema is not None and self.optimizer_updates % finetune.ema_every == 0:
            decay = ema_decay(self.optimizer_updates, finetune.ema_decay, finetune.ema_warmup)
            with torch.no_grad():
                for average, param in zip(self.ema, self.trainable):
                    average.mul_(decay).add_(param.detach().float(), alpha=1 - decay)
        return scalar(norm)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones inside the block (when EMA is on)."""
        if self.ema is None:
            yield
            return
        with self.trainable_replaced_by(self.ema):
            yield

    @contextlib.contextmanager
    def trainable_replaced_by(self, values: list[torch.Tensor]) -> Iterator[None]:
        """``values`` in place of the trainable weights inside the block, the trained ones restored after."""
        saved = [p.detach().clone() for p in self.trainable]
        with torch.no_grad():
            for param, value in zip(self.trainable, values):
                param.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.trainable, saved):
                    param.copy_(value)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        config = self.config.train
        last: dict[str, float] = {}
        if self.start_step == 1 and config.eval_every and config.eval_at_start:
            self.evaluate(0)
        steps = range(self.start_step, config.max_steps + 1)
        bar = tqdm(steps, desc="training", disable=not (self.progress and self.is_main), dynamic_ncols=True)
        for step in bar:
            start = time.perf_counter()
            metrics = self.algorithm.step(step)
            metrics["time/step_s"] = time.perf_counter() - start
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            last = metrics
            shown = {"reward": metrics["reward/mean"]} if "reward/mean" in metrics else {}
            bar.set_postfix(
                {name: f"{value:.3f}" for name, value in shown.items()},
                s_per_step=f"{metrics['time/step_s']:.1f}",
            )
            if self.is_main and (step % config.log_every == 0 or step == config.max_steps):
                self.metrics.log(step, metrics)
            if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
                last.update(self.evaluate(step))
            if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.max_steps):
                self.save_checkpoint(step)
        self.export()
        if self.is_main:
            self.metrics.close()
        return last

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        """Sample the held-out prompts (ODE, EMA weights, ``eval.samples_per_prompt`` evaluation seeds
        per prompt, which training never draws) on the main process and log ``eval/<reward>`` means with
        their standard errors (``_se``), ``eval/oracle_accuracy`` and ``eval/oracle/<attribute>`` (with the
        ShapeWorld judge, image or video), ``eval/pixel_diversity``, the same under ``eval/regression/`` for
        ``eval.regression_prompts``, and an image grid ``eval/step-<step>.png`` (videos: first, middle and
        last frames)."""
        results: dict[str, float] = {}
        # a sharded denoiser runs only with every process: each samples the same images, the main one logs
        if (self.is_main or self.sharded is not None) and self.eval_prompts:
            with torch.no_grad(), self.ema_weights():
                config = self.config.eval
                results, pixels = self._evaluate_prompts(
                    self.eval_prompts[: config.max_prompts], config.samples_per_prompt, "eval/"
                )
                if self.regression_prompts:
                    regression, _ = self._evaluate_prompts(
                        self.regression_prompts, config.regression_samples_per_prompt, "eval/regression/"
                    )
                    results.update(regression)
            if self.is_main:
                self._save_eval_grid(step, pixels, config.samples_per_prompt)
                self.metrics.log(step, results)
        self.accelerator.wait_for_everyone()
        return results

    def _eval_rewards(self) -> dict[str, Any]:
        if not hasattr(self, "_eval_reward_models"):
            import rewards

            names = self.config.eval.rewards or list(self.config.rewards)
            models = {}
            for name in names:
                if self.reward is not None and name in self.reward.components:
                    # a shaped reward is evaluated unshaped: eval/<name> is the raw reward
                    models[name] = getattr(
                        self.reward.components[name], "inner", self.reward.components[name]
                    )
                else:
                    models[name] = rewards.load_reward(name).to(self.adapter.device).eval()
            self._eval_reward_models = models
        return self._eval_reward_models

    def _evaluate_prompts(
        self, prompts: list[str], per_prompt: int, prefix: str
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Every prompt at evaluation seeds 0..per_prompt-1 (prompt-major); reward means with the
        standard error over seeds (``vialign.testbed.evaluate.mean_and_se``) and pixel diversity. Returns
        the pixels too (for the grid): images, or a video model's first, middle and last frames
        (``N x 3 x 3 x H x W``; videos are scored batch by batch as they are made and not kept whole, and
        their pixel diversity is measured on those three frames)."""
        from vialign.algorithms.base import evaluation_seed
        from vialign.testbed.evaluate import mean_and_se, pixel_diversity

        adapter = self.adapter
        all_prompts = [p for p in prompts for _ in range(per_prompt)]
        seeds = [evaluation_seed(s) for _ in prompts for s in range(per_prompt)]
        rewards = self._eval_rewards()
        outputs: dict[str, list[Any]] = {name: [] for name in rewards}

        def score(pixels: torch.Tensor, batch_prompts: list[str]) -> None:
            for name, reward in rewards.items():
                outputs[name].append(reward(reward_layout(pixels.to(adapter.device)), batch_prompts))

        kept, done = [], 0
        for batch in self._generate(all_prompts, seeds):
            batch = batch.float().cpu()
            if self.num_frames is not None:
                score(batch, all_prompts[done : done + len(batch)])
                batch = batch[:, grid_frames(batch.shape[1])]
            kept.append(batch)
            done += len(batch)
        pixels = torch.cat(kept)
        if self.num_frames is None:  # images: scored in one batch, as always
            score(pixels, all_prompts)
        results = {}

        def log_mean(name: str, values: torch.Tensor) -> None:
            results[prefix + name], results[prefix + name + "_se"] = mean_and_se(values.cpu(), per_prompt)

        for name, outs in outputs.items():
            scores = torch.cat([out.score.float().cpu() for out in outs])
            log_mean(name, scores)
            if name in ORACLES:
                log_mean("oracle_accuracy", scores)
                for attribute in outs[0].dims:
                    log_mean(f"oracle/{attribute}", torch.cat([out.dims[attribute].cpu() for out in outs]))
        if per_prompt > 1:
            results[prefix + "pixel_diversity"] = pixel_diversity(pixels, per_prompt)
        return results, pixels

    def _generate(self, prompts: list[str], seeds: list[int]) -> Iterator[torch.Tensor]:
        """Evaluation samples batch by batch (``eval.batch_size``; ``vialign.sample.generate_images``): the
        ODE at the evaluation steps and guidance, sample i from seed i; images ``B x 3 x H x W`` or videos
        ``B x F x 3 x H x W`` of ``model.num_frames`` frames (the adapter's default, set in
        :meth:`_check_model`)."""
        from vialign.sample import generate_images

        config, adapter = self.config.eval, self.adapter
        height, width = self.image_size()
        batches = generate_images(
            adapter,
            prompts,
            seeds,
            num_steps=config.num_steps or adapter.default_num_steps,
            height=height,
            width=width,
            guidance=adapter.make_guidance(config.guidance_scale),
            batch_size=config.batch_size,
        )
        for _, pixels in batches:
            yield pixels

    def _save_eval_grid(self, step: int, pixels: torch.Tensor, per_prompt: int) -> None:
        """``eval/step-<step>.png``: up to 8 prompts (rows) x 8 seeds; a video sample is its first, middle
        and last frames side by side."""
        from vialign.media import save_grid

        if pixels.ndim == 5:
            pixels = torch.cat(list(pixels.unbind(1)), dim=-1)
        rows, columns = min(8, len(pixels) // per_prompt), min(8, per_prompt)
        pick = [p * per_prompt + s for p in range(rows) for s in range(columns)]
        (self.output_dir / "eval").mkdir(exist_ok=True)
        save_grid(pixels[pick], self.output_dir / "eval" / f"step-{step:06d}.png", columns=columns)

    def image_size(self) -> tuple[int, int]:
        """(height, width) of training and evaluation samples: the config's, else the model's default."""
        default_h, default_w = self.adapter.default_size
        return self.config.sampler.height or default_h, self.config.sampler.width or default_w

    # ------------------------------------------------------------------ checkpoints and export
    def _trainable_names(self) -> list[str]:
        ids = {id(p) for p in self.trainable}
        return [n for n, p in self.adapter.unwrapped_denoiser.named_parameters() if id(p) in ids]

    def save_checkpoint(self, step: int) -> None:
        if self.sharded is not None:  # every process gathers; the main one gets the whole tensors
            from vialign.sharding import checkpoint_tensors

            gathered = checkpoint_tensors(
                self.sharded, self._trainable_names(), self.ema, self.optimizer, self.is_main
            )
        if self.is_main:
            names = self._trainable_names()
            if self.sharded is not None:
                tensors, optimizer_meta = gathered
            else:
                tensors = {f"weights.{n}": p for n, p in zip(names, self.trainable)}
                optimizer_tensors, optimizer_meta = optimizer_to_flat(self.optimizer)
                tensors.update(optimizer_tensors)
                if self.ema is not None:
                    tensors.update({f"ema.{n}": e for n, e in zip(names, self.ema)})
            reference = self._refreshed_reference()
            if reference is not None:
                tensors.update({f"reference.{n}": r for n, r in zip(names, reference)})
            state = {
                "optimizer": optimizer_meta,
                "algorithm": self.algorithm.state_dict(),
                "world_size": self.world_size,
                "optimizer_updates": self.optimizer_updates,
            }
            shaping = self.shaping_state()
            if shaping:
                state["reward_shaping"] = shaping
            save_checkpoint(
                self.checkpoint_dir, step, tensors, state, keep=self.config.train.checkpoints_kept
            )
        self.accelerator.wait_for_everyone()

    def _resume(self) -> int:
        path = self.resume_from
        tensors, state = load_checkpoint(path)
        names = self._trainable_names()
        missing = [n for n in names if f"weights.{n}" not in tensors]
        if missing:
            raise VialignInputError(
                f"checkpoint {path} does not match this config's trainable weights (e.g. {missing[0]} is "
                "missing): resume with the config the run started with"
            )
        with torch.no_grad():
            for name, param in zip(names, self.trainable):
                copy_full_(param, tensors[f"weights.{name}"])  # sharded: this process's shard
            if self.ema is not None:
                for name, average in zip(names, self.ema):
                    copy_full_(average, tensors[f"ema.{name}"])
        if f"reference.{names[0]}" in tensors:  # online DPO refreshed its reference before this checkpoint
            reference = [
                tensors[f"reference.{n}"].to(p.device, p.dtype) for n, p in zip(names, self.trainable)
            ]
            if self.reference_denoiser is not None:
                self._keep_initial_denoiser()
                with torch.no_grad():
                    for target, value in zip(self.reference_denoiser.parameters(), reference):
                        target.copy_(value)
            else:
                self.reference_snapshot = reference
            self.reference_refreshed = True
        optimizer_from_flat(self.optimizer, tensors, state["optimizer"])
        shard_optimizer_state(self.optimizer)  # sharded parameters: their moments sharded alike
        self.algorithm.load_state_dict(state["algorithm"])
        self.load_shaping_state(state.get("reward_shaping", {}))
        self.optimizer_updates = state.get("optimizer_updates", state["step"])
        self.start_step = state["step"] + 1
        if self.is_main:
            logger.info("resumed from %s (step %d)", path, state["step"])
        return state["step"]

    def export(self) -> Path:
        """``output_dir/final``: diffusers LoRA weights (stock ``load_lora_weights`` loads them), or a full
        diffusers pipeline folder; the EMA weights when EMA is on."""
        final = self.output_dir / "final"
        if self.is_main or self.sharded is not None:  # sharded: every process gathers the weights
            sharded = self.sharded
            gathered = sharded.unsharded_denoiser(self.is_main) if sharded else contextlib.nullcontext()
            try:
                with self.ema_weights(), gathered:
                    if self.is_main and self.config.finetune.method == "lora":
                        self.adapter.save_lora(final)
                    elif self.is_main:
                        shutil.rmtree(final, ignore_errors=True)
                        self.adapter.save_pipeline(final)
            except OSError as error:
                raise disk_error(
                    final,
                    error,
                    "the checkpoints are intact: free some disk space and run again with --resume, which "
                    "exports from the last checkpoint",
                ) from error
        self.accelerator.wait_for_everyone()
        return final


def run_train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, float]:
    return Trainer(config, resume=resume, progress=progress).train()
