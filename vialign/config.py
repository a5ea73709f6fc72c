"""Typed configs: one pydantic schema per job, loaded from YAML with dotted command-line overrides.

    vialign sample --config configs/sample_tiny.yaml sampler.num_steps=20 model.dtype=bfloat16

Every key is declared with its type, range and a one-line description; an unknown key, a wrong type
or an out-of-range value raises :class:`ConfigError` naming the key and what it accepts. Values of
overrides are parsed as YAML scalars (``20`` is an int, ``true`` a bool, ``[0, 5]`` a list, ``null``
None). Later sources win: YAML file < command-line flags < dotted overrides. Configs stop at setup:
code below the CLI gets plain arguments, and nothing writes back into a config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vialign.algorithms import algorithm_names, get_algorithm
from vialign.errors import ConfigError, VialignInputError
from vialign.schema import SDEWindow, StrictModel

Schema = TypeVar("Schema", bound=BaseModel)


class SchedulerOverrides(StrictModel):
    """``model.scheduler``: a recipe's noise schedule in place of the checkpoint's (sampling, training and
    evaluation alike). Unset keys keep the checkpoint's values."""

    shift: float | None = Field(
        None,
        gt=0,
        le=100,
        description="flow models: a static sigma shift s (sigma <- s sigma / (1 + (s - 1) sigma)) in place of "
        "the resolution-dependent one (DanceGRPO: 3 on FLUX)",
    )
    beta_start: float | None = Field(None, gt=0, lt=1, description="diffusion models: first beta")
    beta_end: float | None = Field(None, gt=0, lt=1, description="diffusion models: last beta")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = Field(
        None, description="diffusion models: how betas go from beta_start to beta_end"
    )
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = Field(
        None, description="diffusion models: which of the training timesteps an N-step sampler visits"
    )

    @model_validator(mode="after")
    def _betas_ordered(self) -> SchedulerOverrides:
        if self.beta_start is not None and self.beta_end is not None and self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start ({self.beta_start})")
        return self


class ModelConfig(StrictModel):
    """Which generator to load, and where."""

    path: str = Field(
        "shapeworld",
        description="diffusers pipeline folder, Hugging Face hub id, or a built-in: "
        "shapeworld, shapeworld-unet (pretrained testbed), tiny-* (random)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype of denoiser and text encoders"
    )
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda or cuda:N")
    attention: Literal["auto", "sdpa", "xformers"] = Field("auto", description="attention backend")
    compile: bool = Field(
        False,
        description="torch.compile the denoiser for rollouts, sampling and evaluation (calls without a "
        "gradient; training passes stay eager): pays on GPUs after a one-off compile of ~1 min",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="model.compile: torch.compile's mode"
    )
    lora: str | None = Field(None, description="folder of diffusers-format LoRA weights to load")
    use_t5: bool = Field(True, description="SD3: load the T5 text encoder (false: zeros in its place)")
    max_sequence_length: int | None = Field(
        None, ge=1, le=4096, description="T5 tokens (SD3 default 256, FLUX 512)"
    )
    clip_skip: int | None = Field(
        None, ge=1, le=12, description="use an earlier CLIP layer, as diffusers' clip_skip"
    )
    prompt_embeds: str | None = Field(
        None,
        description="precomputed prompt embeddings (vialign precompute-embeds): a .safetensors file or a "
        "folder of them; every prompt's embedding is read from it and the text encoders are never "
        "loaded; a prompt not in it is an error",
    )
    scheduler: SchedulerOverrides = Field(default_factory=SchedulerOverrides)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        head, _, index = value.partition(":")
        if head not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, not {value!r}")
        return value


class SamplerConfig(StrictModel):
    """How images are sampled."""

    kind: Literal["ode", "sde"] = Field(
        "ode", description="ode: deterministic (reproduces stock diffusers); sde: stochastic"
    )
    sde_kind: Literal["ddim", "flow-sde", "dance-sde", "cps"] | None = Field(
        None,
        description="SDE for kind=sde: ddim (UNet models), flow-sde, dance-sde or cps (flow models); "
        "default ddim for UNet models, flow-sde for flow models",
    )
    noise_level: float | None = Field(
        None, ge=0, le=10, description="eta (ddim, dance-sde) or a (flow-sde, cps); default per SDE"
    )
    sde_window: SDEWindow = Field(None, description="[start, stop) of the stochastic steps; default all")
    num_steps: int | None = Field(
        None, ge=1, le=1000, description="denoising steps; default the model's (20)"
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=100,
        description="the stock pipeline's guidance_scale "
        "(CFG; FLUX: the guidance embedding); default the pipeline's",
    )
    true_cfg_scale: float = Field(1.0, ge=0, le=100, description="FLUX only: true classifier-free guidance")
    negative_prompt: str | None = Field(None, description="negative prompt for the unconditional branch")

    @model_validator(mode="after")
    def _sde_options_need_sde(self) -> SamplerConfig:
        given = [k for k in ("sde_kind", "noise_level", "sde_window") if getattr(self, k) is not None]
        if self.kind == "ode" and given:
            raise ValueError(
                f"{', '.join(given)} only apply to kind=sde, but kind is 'ode': set sampler.kind=sde "
                "(--sampler sde) or drop them"
            )
        return self


REFERENCE_KINDS = ("par", "centered", "delta")  # shaping kinds compared with reference-policy samples


class ShapingSpec(StrictModel):
    """``rewards.<name>.shaping``: a transform of that reward's score (``rewards.shaping``; Fu et al. 2025,
    PAR, arXiv 2502.18770). r is the reward, r_ref_1..M the same reward of M images the reference policy
    (the model before training) samples for the same prompt (docs/algorithms.md "Reward shaping")."""

    kind: Literal["par", "centered", "delta", "ceiling", "clip"] = Field(
        description="par: mean_m sigmoid(k (r - r_ref_m)); centered (alias delta): r - mean_m r_ref_m; "
        "ceiling: min(r, value); clip: r clipped to its running mean -/+ running std"
    )
    k: float = Field(1.0, gt=0, le=1e6, description="par only: sigmoid sharpness k")
    value: float | None = Field(
        None, validate_default=True, description="ceiling only (required there): the ceiling c in min(r, c)"
    )
    reference_samples: int = Field(
        1,
        ge=1,
        le=64,
        description="par, centered and delta: reference-policy images per prompt (M; PAR finds 1 enough)",
    )

    # field validators (``kind`` is validated first): an error then names rewards.<name>.shaping.<key>
    @field_validator("value")
    @classmethod
    def _value_for_ceiling(cls, value: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("kind")
        if kind == "ceiling" and value is None:
            raise ValueError(
                "kind=ceiling needs the ceiling c of min(r, c), e.g. shaping: {kind: ceiling, value: 0.8}"
            )
        if kind is not None and kind != "ceiling" and value is not None:
            raise ValueError(f"only kind=ceiling takes a value; remove it for kind={kind}")
        return value

    @field_validator("k")
    @classmethod
    def _k_for_par(cls, value: float, info: ValidationInfo) -> float:
        kind = info.data.get("kind")
        if kind is not None and kind != "par":
            raise ValueError(f"only kind=par takes k; remove it for kind={kind}")
        return value

    @field_validator("reference_samples")
    @classmethod
    def _samples_for_references(cls, value: int, info: ValidationInfo) -> int:
        kind = info.data.get("kind")
        if kind is not None and kind not in REFERENCE_KINDS:
            raise ValueError(
                f"only kind=par, centered and delta sample the reference policy; remove it for kind={kind}"
            )
        return value

    @property
    def needs_references(self) -> bool:
        return self.kind in REFERENCE_KINDS


class RewardSpec(StrictModel):
    """One reward of a weighted combination."""

    weight: float = Field(1.0, description="weight in the total (scores are summed with these weights)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="options of rewards.load_reward(name, ...)"
    )
    shaping: ShapingSpec | None = Field(
        None,
        description="training only: a transform of this reward (par, centered/delta, ceiling, clip), e.g. "
        "{kind: par, k: 1}; the weight multiplies the shaped reward",
    )


def _no_shaping(rewards: Mapping[str, RewardSpec], section: str) -> None:
    """Shaping is a training feature (par and centered sample the policy being trained against)."""
    for name, spec in rewards.items():
        if spec.shaping is not None:
            raise ValueError(
                f"{section}.{name}.shaping: reward shaping applies to training rewards only (vialign train); "
                "remove it here"
            )


class SMCConfig(StrictModel):
    """``steer.smc``: Feynman-Kac steering (vialign.steering.smc)."""

    potential: Literal["diff", "max", "add", "rt"] = Field(
        "diff", description="diff: exp(lam (r - r_prev)); max, add, rt: see docs/steering.md"
    )
    lam: float = Field(10.0, ge=0, le=1e6, description="potential sharpness (0: no steering)")
    every: int = Field(5, ge=1, le=1000, description="resample every this many steps ...")
    start: int = Field(0, ge=0, le=1000, description="... from this step ...")
    end: int | None = Field(
        None, ge=0, le=1000, description="... to this step (default the last); plus the last"
    )
    adaptive: bool = Field(False, description="resample only when the effective sample size < particles / 2")
    reward_floor: float = Field(0.0, description="r_prev before the first resampling step")


class RenoConfig(StrictModel):
    """``steer.reno``: noise optimisation (vialign.steering.reno)."""

    iterations: int = Field(50, ge=1, le=10000, description="reward evaluations; the best iterate is kept")
    lr: float = Field(5.0, gt=0, description="SGD (Nesterov) learning rate on the noise")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    grad_clip: float = Field(0.1, gt=0, description="gradient-norm clip of each image's noise")
    reg_weight: float = Field(0.01, ge=0, description="weight of the chi log-density regulariser on |z|")


class GuidanceConfig(StrictModel):
    """``steer.guidance``: reward-gradient guidance (vialign.steering.guidance)."""

    scale: float = Field(1.0, ge=0, le=1e6, description="s in eps <- eps - s sigma_t grad r")
    start: int = Field(0, ge=0, le=1000, description="first guided step")
    stop: int | None = Field(
        None, ge=1, le=1000, description="guided steps end before this one (default all)"
    )


class SteerConfig(StrictModel):
    """``steer``: inference-time alignment with a reward (vialign.steering)."""

    method: Literal["best-of-n", "smc", "reno", "guidance"] | None = Field(
        None, description="best-of-n, smc, reno or guidance; none: plain sampling"
    )
    rewards: dict[str, RewardSpec] = Field(
        default_factory=dict, description="reward name -> weight and options (the steering reward)"
    )
    particles: int = Field(
        4, ge=1, le=4096, description="N: best-of-N candidates or SMC particles per prompt"
    )
    smc: SMCConfig = Field(default_factory=SMCConfig)
    reno: RenoConfig = Field(default_factory=RenoConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)

    @model_validator(mode="after")
    def _method_needs_reward(self) -> SteerConfig:
        _no_shaping(self.rewards, "steer.rewards")
        if self.method is None and self.rewards:
            raise ValueError(
                "rewards are given but no method: set steer.method (--steer best-of-n|smc|reno|guidance)"
            )
        if self.method is not None and not self.rewards:
            raise ValueError(
                f"--steer {self.method} needs a reward: pass --reward NAME[=WEIGHT] (steer.rewards)"
            )
        if self.smc.end is not None and self.smc.end < self.smc.start:
            raise ValueError(f"smc.end ({self.smc.end}) must be >= smc.start ({self.smc.start})")
        if self.guidance.stop is not None and self.guidance.stop <= self.guidance.start:
            raise ValueError(
                f"guidance.stop ({self.guidance.stop}) must be > guidance.start ({self.guidance.start})"
            )
        return self


class SampleConfig(StrictModel):
    """``vialign sample``: generate PNGs (image models) or MP4s (video models) and a samples.jsonl index."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    prompts: list[str] = Field(default_factory=list, description="prompts; image i uses seed + i")
    prompts_file: str | None = Field(
        None, description="text file with one prompt per line (or JSONL with a 'prompt' field)"
    )
    height: int | None = Field(None, ge=8, le=8192, description="image height in pixels; default the model's")
    width: int | None = Field(None, ge=8, le=8192, description="image width in pixels; default the model's")
    num_frames: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="video models only: frames per video (Wan 4k+1, CogVideoX 8k+1); default the model's "
        "(Wan 81, CogVideoX 49, or num_frames in its vialign.json)",
    )
    fps: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="video models only: frame rate of the MP4s; default 16 (Wan), 8 (CogVideoX) or fps in the "
        "model's vialign.json",
    )
    save_frames: bool = Field(
        False,
        description="video models only: also write each video's frames as lossless PNGs in NNNNN_frames/",
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the first image")
    batch_size: int = Field(4, ge=1, le=4096, description="images per denoiser batch")
    out: str = Field("samples", description="output folder")
    overwrite: bool = Field(False, description="replace an earlier run's samples.jsonl in the output folder")
    resume: bool = Field(
        False, description="continue an interrupted run in the output folder: make only the images it lacks"
    )
    steer: SteerConfig = Field(default_factory=SteerConfig)

    @model_validator(mode="after")
    def _steering_fits_the_sampler(self) -> SampleConfig:
        method = self.steer.method
        if method == "smc" and self.sampler.kind != "sde":
            raise ValueError(
                "--steer smc resamples stochastic particles: set --sampler sde (sampler.kind=sde; SDEs: "
                "ddim for UNet models, flow-sde, dance-sde or cps for flow models)"
            )
        # windows against the number of steps: vialign.sample.check_steering (it also knows the model's default)
        return self


class ScoreConfig(StrictModel):
    """``vialign score``: score image/video files with one or more rewards."""

    rewards: dict[str, RewardSpec] = Field(
        default_factory=dict, description="reward name -> weight and options"
    )
    images: list[str] = Field(default_factory=list, description="folders, glob patterns or files to score")
    prompts_file: str | None = Field(
        None, description="one prompt per line, in the sorted order of the files"
    )
    prompts_from: str | None = Field(
        None, description="samples.jsonl, JSONL or CSV with 'file' and 'prompt' columns"
    )
    batch_size: int = Field(16, ge=1, le=4096, description="files per reward batch")
    out: str = Field("scores.jsonl", description="output file: .jsonl or .csv")
    frames: Literal["uniform", "first-middle-last", "random", "all"] = Field(
        "uniform", description="frames an image reward scores in a video"
    )
    num_frames: int = Field(8, ge=1, le=1024, description="frames for frames=uniform")
    max_frames: int = Field(64, ge=1, le=4096, description="frames decoded per video at most (evenly spaced)")
    device: str = Field(
        "auto", description="device of the reward models: auto (CUDA when torch sees it), cpu, cuda, cuda:N"
    )
    overwrite: bool = Field(False, description="replace an existing output file")
    resume: bool = Field(
        False, description="continue an interrupted run: score only the files it has not scored"
    )

    @field_validator("out")
    @classmethod
    def _out(cls, value: str) -> str:
        if not value.endswith((".jsonl", ".csv")):
            raise ValueError(f"must end in .jsonl or .csv, not {value!r}")
        return value

    @model_validator(mode="after")
    def _rewards_unshaped(self) -> ScoreConfig:
        _no_shaping(self.rewards, "rewards")
        return self


class EvalConfig(StrictModel):
    """``vialign eval``: sample the ShapeWorld prompts and judge the samples with the oracle."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    prompts: str = Field(
        "shapeworld:eval",
        description="shapeworld:eval (the alignment protocol's split), :align, :train, :held_out, :all, or a "
        "file of ShapeWorld prompts",
    )
    samples_per_prompt: int = Field(
        8, ge=1, le=1024, description="images per prompt (seeds seed .. seed+N-1)"
    )
    seed: int = Field(
        0, ge=0, le=2**40, description="first evaluation sample of every prompt (noise seed 2**62 + index)"
    )
    rewards: list[str] = Field(default_factory=list, description="rewards whose mean is reported too")
    batch_size: int = Field(256, ge=1, le=4096, description="images per sampling batch")
    out: str = Field("eval", description="output folder: eval.json and grid.png")
    overwrite: bool = Field(False, description="replace an existing eval.json")


class DataConfig(StrictModel):
    """Prompt data: train and held-out eval prompts."""

    train: str = Field(
        "shapeworld:align",
        description="text file (one prompt per line), JSONL with a prompt column, hf:NAME[:SPLIT] "
        "(a Hugging Face dataset) or a saved dataset folder; built-ins shapeworld:align, shapeworld:eval, "
        "shapeworld:train, shapeworld:held_out, shapeworld:all; shapeworld-video:align, :eval, :train, "
        ":held_out, :all (video models). Preference algorithms (dpo): a .jsonl/.csv of "
        "prompt, chosen, rejected, hf:NAME[:SPLIT] in the Pick-a-Pic v2 schema, or shapeworld:preferences",
    )
    eval: str | None = Field(
        "shapeworld:eval", description="held-out prompts in the same forms; null: split off eval_fraction"
    )
    prompt_column: str = Field("prompt", description="column of JSONL / dataset rows holding the prompt")
    latent_cache: str | None = Field(
        None,
        description="preference pairs (DPO): folder of the VAE latent cache, keyed by image content and "
        "model, reused across runs; default OUTPUT_DIR/latent_cache",
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="with eval=null: this fraction of the train prompts is held out (seeded)"
    )
    prompt_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="probability that a training sample's prompt is replaced by the empty one",
    )


class FinetuneConfig(StrictModel):
    """What is trained."""

    method: Literal["lora", "full"] = Field("lora", description="lora (peft adapters) or full fine-tuning")
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; default = rank")
    lora_targets: list[str] | None = Field(
        None, description="module names to adapt; default the family's attention projections"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the denoiser's activations in the backward pass (less memory)"
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="EMA of the trainable weights (0: off); evaluation and export use it"
    )
    ema_every: int = Field(1, ge=1, description="update the EMA every this many optimizer updates")
    ema_warmup: bool = Field(
        False, description="ramp the EMA decay as min(decay, (1 + n) / (10 + n)) (diffusers' EMAModel)"
    )
    reference_on_cpu: bool = Field(
        False, description="full fine-tuning with KL: keep the frozen reference copy on the CPU"
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="full fine-tuning over several processes: none (every process holds the whole model) or "
        "fsdp (weights, gradients, optimizer state and EMA sharded over the processes; vialign.sharding)",
    )
    fsdp_mixed_precision: Literal["none", "bf16"] = Field(
        "none",
        description="sharding=fsdp: bf16 gathers and runs the blocks in bfloat16, reduces gradients in fp32",
    )


class OptimConfig(StrictModel):
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = Field(
        "adamw",
        description="adamw, adamw8bit (needs bitsandbytes and a GPU), or adafactor (transformers' Adafactor "
        "at a fixed lr, no relative step, update clip 1: Diffusion-DPO's SDXL run; betas and eps unused)",
    )
    lr: float = Field(3e-4, gt=0, le=1, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)"
    )
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (null: off)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="decay after warm-up, to 0 at max_steps"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")


class TrainSamplerConfig(StrictModel):
    """How training rollouts are sampled."""

    num_steps: int | None = Field(None, ge=1, le=1000, description="denoising steps; default the model's")
    sde_kind: Literal["ddim", "flow-sde", "dance-sde", "cps"] | None = Field(
        None, description="ddim (UNet), flow-sde, dance-sde or cps (flow); default ddim / flow-sde"
    )
    noise_level: float | None = Field(None, ge=0, le=10, description="eta or a of the SDE; default per SDE")
    sde_window: SDEWindow = Field(
        None, description="[start, stop): only these steps are stochastic and trained; default all"
    )
    window_shift_every: int = Field(
        0, ge=0, description="move the SDE window one step later every this many training steps (0: fixed)"
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=100,
        description="CFG (FLUX: guidance embedding) in rollouts and training; "
        "1 turns CFG off; default the model's",
    )
    height: int | None = Field(None, ge=8, le=8192, description="image height; default the model's")
    width: int | None = Field(None, ge=8, le=8192, description="image width; default the model's")


class TrainLoopConfig(StrictModel):
    max_steps: int = Field(100, ge=1, description="training steps (one rollout batch + update each)")
    checkpoint_every: int = Field(50, ge=0, description="save a resumable checkpoint every N steps (0: off)")
    checkpoints_kept: int = Field(2, ge=1, description="keep the newest N checkpoints")
    eval_every: int = Field(50, ge=0, description="evaluate on the held-out prompts every N steps (0: off)")
    eval_at_start: bool = Field(True, description="evaluate before the first step too")
    log_every: int = Field(1, ge=1, description="write metrics every N steps")
    tensorboard: bool = Field(True, description="also log to TensorBoard (output_dir/tensorboard)")


class TrainEvalConfig(StrictModel):
    """Periodic evaluation on held-out prompts (ODE sampling at fixed seeds)."""

    rewards: list[str] = Field(
        default_factory=list,
        description="rewards reported as eval/<name>: may differ from the training rewards (reward-hacking "
        "check); shapeworld-oracle also logs eval/oracle_accuracy. Default: the training rewards",
    )
    max_prompts: int | None = Field(None, ge=1, description="evaluate at most this many prompts")
    samples_per_prompt: int = Field(
        8, ge=1, le=1024, description="images per prompt, at evaluation seeds that training never draws"
    )
    regression_prompts: str | None = Field(
        None,
        description="prompts the model already renders well (same forms as data.train, e.g. "
        "shapeworld:train): logged as eval/regression/<metric>, a drop there is forgetting",
    )
    regression_samples_per_prompt: int = Field(2, ge=1, le=1024, description="images per regression prompt")
    num_steps: int | None = Field(None, ge=1, le=1000, description="ODE steps; default the model's")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="default the model's")
    batch_size: int = Field(64, ge=1, le=4096, description="images per sampling batch")


class TrainModelConfig(ModelConfig):
    """``model`` of a training config: the generator, and a video model's frames per video."""

    num_frames: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="video models only: frames per training and evaluation video (Wan 4k+1, CogVideoX "
        "8k+1); default the model's (Wan 81, CogVideoX 49, or num_frames in its vialign.json); an error for "
        "image models",
    )


class TrainConfig(StrictModel):
    """``vialign train``: align a generator with rewards.

    The algorithm's own settings are the section named after it (``grpo: {...}``, ``draft: {...}``),
    validated by the algorithm's ``Settings`` class (``vialign.algorithms``); ``config.settings`` is that
    section. A section of another algorithm is an error, not silently ignored.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    algorithm: str = Field(
        "grpo", description="a registered algorithm: grpo, draft, alignprop, refl, adjoint_matching, ..."
    )
    model: TrainModelConfig = Field(default_factory=TrainModelConfig)
    output_dir: str = Field("runs/train", description="metrics, TensorBoard logs, checkpoints, final weights")
    overwrite: bool = Field(False, description="start over in an output_dir that holds an earlier run")
    seed: int = Field(0, ge=0, le=2**62, description="seeds prompts, noise and step choice")
    data: DataConfig = Field(default_factory=DataConfig)
    rewards: dict[str, RewardSpec] = Field(
        default_factory=lambda: {"shapeworld-clip": RewardSpec()}, description="training rewards and weights"
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sampler: TrainSamplerConfig = Field(default_factory=TrainSamplerConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    eval: TrainEvalConfig = Field(default_factory=TrainEvalConfig)

    @model_validator(mode="after")
    def _algorithm_section(self) -> TrainConfig:
        sections = dict(self.__pydantic_extra__ or {})
        names = algorithm_names()
        unknown = sorted(key for key in sections if key not in names)
        if unknown:
            allowed = sorted([*type(self).model_fields, *names])
            raise ValueError(f"{unknown[0]}: unknown key; allowed keys here: {', '.join(allowed)}")
        try:
            algorithm = get_algorithm(self.algorithm)
        except VialignInputError as error:
            raise ValueError(f"algorithm: {error}") from None
        others = sorted(key for key in sections if key != self.algorithm)
        if others:
            raise ValueError(
                f"{others[0]}: settings of the {others[0]} algorithm, but algorithm is {self.algorithm!r}; "
                f"set algorithm={others[0]} or remove the section"
            )
        raw = sections.get(self.algorithm)
        if raw is None:  # absent, or `grpo:` with nothing under it; [], "" or false are refused below
            raw = {}
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        try:
            settings = algorithm.Settings.model_validate(raw)
        except ValidationError as error:
            raise ValueError(
                "\n  ".join(problem_lines(error, algorithm.Settings, prefix=self.algorithm))
            ) from None
        algorithm.check_settings(settings, self.sampler.num_steps)
        self.__pydantic_extra__[self.algorithm] = settings
        if algorithm.reward != "none" and not self.rewards:
            raise ValueError("rewards: at least one training reward is needed, e.g. rewards: {pickscore: {}}")
        return self

    @model_validator(mode="after")
    def _sharding(self) -> TrainConfig:
        from vialign.sharding import sharding_problem

        problem = sharding_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def settings(self) -> StrictModel:
        """The algorithm's settings (its section, validated)."""
        return self.__pydantic_extra__[self.algorithm]


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing file or malformed YAML is a ConfigError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys to values at the top level, not a {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed value)``; the value is read as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. sampler.num_steps=20)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.strip().startswith(
        "{"
    ):  # "a: b" reads as a mapping; a string was meant
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key = "a.b"``, creating intermediate mappings."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section: cannot set {key}")
        node = child
    node[parts[-1]] = value


def _allowed_keys(schema: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    model: Any = schema
    for part in loc[:-1]:
        if get_origin(model) in (dict, list, tuple):  # a key of a mapping (rewards) or a list index
            model = get_args(model)[-1]
            continue
        field = (
            model.model_fields.get(str(part))
            if isinstance(model, type) and issubclass(model, BaseModel)
            else None
        )
        model = _section_model(field.annotation) if field is not None else None
    model = _section_model(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def _section_model(annotation: Any) -> Any:
    """The section of an optional one (``ShapingSpec | None`` -> ``ShapingSpec``), else ``annotation``."""
    if get_origin(annotation) in (Union, UnionType):
        sections = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(sections) == 1:
            return sections[0]
    return annotation


def problem_lines(
    error: ValidationError, schema: type[BaseModel], flags: Mapping[str, str] | None = None, prefix: str = ""
) -> list[str]:
    """One line per problem: ``key (--flag): what is wrong (got value)``; ``prefix`` names the section."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(p) for p in (prefix, *problem["loc"]) if p != "")
        flag = (flags or {}).get(key)
        name = f"{key} ({flag})" if flag else key
        if problem["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, problem["loc"])
            lines.append(f"{name}: unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "missing":
            lines.append(f"{name}: required key is missing")
        elif not key:  # a check of the whole config: its message names the key
            lines.append(message)
        else:
            lines.append(f"{name}: {message} (got {problem.get('input')!r})")
    return lines


def format_validation_error(
    error: ValidationError, schema: type[BaseModel], source: str, flags: Mapping[str, str] | None = None
) -> str:
    """The message of a :class:`ConfigError`: the source, then one line per problem."""
    return f"invalid config ({source}):\n  " + "\n  ".join(problem_lines(error, schema, flags))


def load_config(
    schema: type[Schema],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Schema:
    """Validate ``schema`` from a YAML file, then ``values`` (dotted key -> value, e.g. from CLI flags),
    then ``overrides`` (``"key=value"`` strings), later ones winning."""
    data = read_yaml(path) if path is not None else {}
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
    for text in overrides:
        set_dotted(data, *parse_override(text))
    sources = [os.fspath(path)] if path is not None else []
    if values or overrides:
        sources.append("command line")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise ConfigError(
            format_validation_error(error, schema, " + ".join(sources) or "defaults", flags)
        ) from None
