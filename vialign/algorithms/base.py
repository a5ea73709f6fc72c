"""The boundary between the shared trainer and the training algorithms (docs/architecture.md).

An algorithm is one class, registered by name::

    @register
    class MyMethod(Algorithm):
        name = "my_method"                 # algorithm: my_method in a config
        Settings = MyMethodSettings        # its section, my_method: {...}, validated by the config
        reward = "differentiable"          # "none", "any" or "differentiable": the trainer checks it
        data = "prompts"                   # what it trains on: "prompts" or "preference_pairs"

        def __init__(self, settings, context): ...
        def step(self, step: int) -> dict[str, float]: ...   # one optimizer update (or a few), metrics

The trainer never names an algorithm: it looks the class up in the registry, asks it what it needs
(a reward of some kind, a reference model, which data), builds a :class:`TrainingContext` and calls
``step`` once per training step. The context is all an algorithm sees of the trainer: the model adapter,
the reward, the prompts, seeding, the processes (batch shares, gather, reduce), the reference policy, a
``backward`` and the ``optimizer_step``. Algorithms never import the trainer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.schedules import Schedule
from vialign.data import prompts_for_step
from vialign.distributed import Processes
from vialign.errors import VialignInputError
from vialign.media import reward_layout
from vialign.sampling import Sampler, Trajectory, rollout_prompts
from vialign.schema import StrictModel
from vialign.seeds import mix_seed

RewardNeed = Literal["none", "any", "differentiable"]
DataKind = Literal["prompts", "preference_pairs"]


def sample_seed(seed: int, step: int, index: int) -> int:
    """The noise seed of global sample ``index`` at training ``step``: the same on every process, so N
    processes draw exactly the samples one process draws for the same global batch, and a resumed run
    needs no RNG state. Indices >= 2**40 name per-step draws that are not samples (step choices).
    Always below ``EVALUATION_SEEDS``: evaluation never meets a noise that training drew."""
    return ((seed * 1_000_003 + step) * 1_048_576 + index) % EVALUATION_SEEDS


# Evaluation draws its noise from seeds >= 2**62 (torch seeds go to 2**64 - 1), training from seeds below.
EVALUATION_SEEDS = 2**62


def evaluation_seed(index: int) -> int:
    """The noise seed of the ``index``-th evaluation sample of a prompt (trainer and ``vialign eval``)."""
    if not 0 <= index < 2**62:
        raise ValueError(f"evaluation sample index {index} is outside [0, 2**62)")
    return EVALUATION_SEEDS + index


PROMPT_DROPOUT_STREAM = 1  # mix_seed(seed, step, stream): per-step draws that are not samples' noise


def drop_prompts(prompts: Sequence[str], probability: float, seed: int) -> list[str]:
    """Each prompt replaced by the empty prompt with ``probability``, independently, from ``seed`` (the
    same on every process). Training on some empty prompts keeps the unconditional branch that CFG needs
    in tune with the fine-tuned conditional one (soc-fine-tuning-sd drops 20%)."""
    dropped = torch.rand(len(prompts), generator=torch.Generator().manual_seed(seed)) < probability
    return ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist())]


@dataclass
class TrainingContext:
    """What an algorithm may use of the trainer (built by ``vialign.trainer.Trainer``)."""

    adapter: GeneratorAdapter  # the policy: its denoiser holds the trainable weights
    reward: Any  # rewards.CombinedReward (weighted sum; components in .dims), or None for reward="none"
    reward_weights: dict[str, float]  # reward name -> weight in the sum
    prompts: list[str]  # training prompts
    seed: int
    num_steps: int  # denoising steps of training rollouts
    height: int
    width: int
    guidance: Guidance  # CFG / guidance embedding of training rollouts
    sampling: Any  # the config's `sampler` section (sde_kind, noise_level, sde_window, ...)
    preferences: Any = None  # vialign.preferences.PreferenceLatents, for data="preference_pairs"
    prompt_dropout: float = 0.0  # probability that a sample's prompt is replaced by "" (data.prompt_dropout)
    processes: Processes = field(default_factory=Processes)
    reference: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    optimizer_step: Callable[[int], float] = lambda step: 0.0  # clip, step, zero grads, EMA; -> grad norm
    refresh_reference: Callable[[], None] = lambda: None  # the reference becomes the current policy
    num_frames: int | None = None  # video models: frames per video of every rollout (None: images)

    @property
    def world_size(self) -> int:
        return self.processes.world_size

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The denoising schedule of training rollouts."""
        return self.adapter.schedule(self.num_steps, self.height, self.width)

    def step_prompts(self, step: int, count: int, repeat: int = 1) -> tuple[list[str], int, int]:
        """The ``count`` prompts of training ``step`` (the same on every process), each repeated ``repeat``
        times (a GRPO group), and this process's share [lo, hi) of that global batch. The prompts are
        encoded here in one batch on every process: text encoders' outputs move in the last bits with the
        batch, and a sample's embedding must not depend on its process."""
        prompts = prompts_for_step(self.prompts, step, count, self.seed)
        batch = [p for p in prompts for _ in range(repeat)]
        if self.prompt_dropout:
            batch = drop_prompts(batch, self.prompt_dropout, mix_seed(self.seed, step, PROMPT_DROPOUT_STREAM))
            prompts = [*prompts, ""]
        with torch.no_grad():
            self.adapter.encode_prompt(prompts)
        lo, hi = self.local_range(len(batch))
        return batch, lo, hi

    def rollout(
        self,
        prompts: Sequence[str],
        step: int,
        start: int,
        sampler: Sampler,
        *,
        shared_noise_group: int = 1,
        **options: Any,
    ) -> Trajectory:
        """Sample global indices ``start .. start + len(prompts) - 1`` of training ``step`` (each from its
        own seed, :func:`sample_seed`) along the training schedule; ``options`` are ``rollout``'s.

        ``shared_noise_group=G`` > 1: the global samples ``G j .. G j + G - 1`` all start from sample
        ``G j``'s x_0 (a GRPO group sharing its initial noise); their step noise stays their own."""
        indices = range(start, start + len(prompts))
        seeds = [self.sample_seed(step, g) for g in indices]
        if shared_noise_group > 1:
            leaders = [self.sample_seed(step, g - g % shared_noise_group) for g in indices]
            options["initial_seeds"] = leaders
        return rollout_prompts(
            self.adapter,
            list(prompts),
            seeds,
            self.schedule,
            height=self.height,
            width=self.width,
            guidance=self.guidance,
            sampler=sampler,
            num_frames=self.num_frames,
            **options,
        )

    def sample_seed(self, step: int, index: int) -> int:
        return sample_seed(self.seed, step, index)

    def local_range(self, global_size: int) -> tuple[int, int]:
        """This process's share [lo, hi) of a global batch."""
        return self.processes.local_range(global_size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated in global batch order."""
        return self.processes.gather(tensor)

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.processes.reduce(tensor, op)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss``: this process's share of the global objective, i.e. its
        samples' terms divided by the *global* sample count. ``optimizer_step`` adds the shares of all
        processes, so one process and N processes take the same step."""
        loss.backward()

    @contextlib.contextmanager
    def train_mode(self) -> Iterator[None]:
        """The denoiser in train mode inside (dropout, if it has any), eval mode after."""
        denoiser = self.adapter.unwrapped_denoiser
        denoiser.train()
        try:
            yield
        finally:
            denoiser.eval()


class VideoPixelsReward:
    """A reward as algorithms call it on a video model: ``reward(pixels, prompts)`` with the adapter's
    decoded ``B x F x 3 x H x W`` videos, handed on as ``B x 3 x F x H x W`` (:func:`reward_layout`). The
    one place where the two layouts meet, so no algorithm converts; ``info``, ``components`` and the
    rest are the wrapped reward's."""

    def __init__(self, reward: Any):
        self.reward = reward

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str] | None = None) -> Any:
        return self.reward(reward_layout(pixels), prompts)

    def __getattr__(self, name: str) -> Any:  # only called for names the wrapper lacks
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)


class Algorithm:
    """Base of the training algorithms: class attributes say what it is and needs (module docstring)."""

    name: ClassVar[str]
    Settings: ClassVar[type[StrictModel]]
    reward: ClassVar[RewardNeed] = "any"
    data: ClassVar[DataKind] = "prompts"

    @classmethod
    def needs_reference(cls, settings: Any) -> bool:
        """Whether a step uses ``context.reference()`` (full fine-tuning then keeps a frozen copy)."""
        return False

    @classmethod
    def check_settings(cls, settings: Any, num_steps: int | None) -> None:
        """Raise :class:`VialignInputError` for settings that do not fit ``num_steps`` sampling steps
        (None: not known yet). Called by the config and again once the model's default is known."""

    def __init__(self, settings: Any, context: TrainingContext):
        self.settings, self.context = settings, context

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-serialisable state saved in checkpoints (buffers, running statistics)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Make ``cls`` available as ``algorithm: cls.name`` (a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier (it is a config key), got {name!r}")
    settings = getattr(cls, "Settings", None)
    if not (isinstance(settings, type) and issubclass(settings, StrictModel)):
        raise ValueError(f"{cls.__name__}.Settings must be a vialign.schema.StrictModel subclass")
    if cls.reward not in ("none", "any", "differentiable") or cls.data not in ("prompts", "preference_pairs"):
        raise ValueError(
            f"{cls.__name__}: reward must be none/any/differentiable, data prompts/preference_pairs"
        )
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(
            f"an algorithm named {name!r} is already registered ({_REGISTRY[name].__qualname__})"
        )
    _REGISTRY[name] = cls
    return cls


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise VialignInputError(f"unknown algorithm {name!r}; choose one of {', '.join(algorithm_names())}")
    return _REGISTRY[name]
