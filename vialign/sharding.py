"""Sharded full fine-tuning (``finetune.sharding: fsdp``): torch FSDP2 (``fully_shard``) over the processes.

Without sharding every process holds the whole denoiser, its gradients, the optimizer moments and the EMA.
With ``fsdp`` each process holds 1/N of each: every denoiser block the model family names
(``GeneratorAdapter.denoiser_blocks``: a UNet's down, mid and up blocks, a transformer's blocks) is
``fully_shard``-ed, then the denoiser itself (its remaining parameters: embeddings, norms, the output
layer). A block's parameters are all-gathered just before it runs and freed after it, in the forward
pass and again in the backward pass; the gradients are reduce-scattered after each backward pass.

What stays as in ``vialign.distributed`` (the unsharded path):

* Gradients are *summed* over processes, not averaged (``set_gradient_divide_factor(1.0)``): an
  algorithm's loss is already its share of the global objective (``TrainingContext.backward``), so N
  processes take the step one process takes. ``Processes.sum_gradients`` skips sharded parameters (FSDP has
  reduced them) and still gives a parameter without a gradient a zero one, as before.
* The optimizer (AdamW), gradient clipping (``clip_grad_norm_`` of sharded gradients is the global norm)
  and the EMA work on the local shards; nothing else changes.
* Checkpoints and the exported pipeline hold the full (unsharded) weights, gathered on the main process
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), in the same safetensors format as an
  unsharded run; a resume reads them and keeps each process's shard. A run can resume sharded from an
  unsharded checkpoint and the other way round.
* Frozen copies (the reference model of KL terms, reward shaping's initial model) are whole,
  unsharded modules on every process, as before: they run outside the lock-step FSDP needs.

FSDP needs every process to call the denoiser the same number of times, in the same order, in each
step: settings where a process's share of the work depends on its samples (GRPO minibatches split
unevenly over processes, DanceGRPO's per-sample steps, RAFT's and RWR's weight-0 samples) are refused
(:func:`sharding_problem`), and evaluation samples on every process (the main one logs). With one
process there is nothing to shard: the run trains unsharded (a note says so).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vialign.errors import VialignInputError

logger = logging.getLogger(__name__)

MIXED_PRECISION = {"bf16": torch.bfloat16}


def sharding_problem(config: Any) -> str | None:
    """Why ``config`` (a ``TrainConfig``) cannot train with ``finetune.sharding=fsdp``, or None."""
    finetune = config.finetune
    if getattr(finetune, "sharding", "none") == "none":
        return None
    if finetune.method != "full":
        return (
            "finetune.sharding=fsdp shards full fine-tuning: set finetune.method=full, or "
            "finetune.sharding=none for LoRA (LoRA weights are small; every process keeps them whole)"
        )
    if config.optim.optimizer != "adamw":
        return (
            f"finetune.sharding=fsdp trains with optim.optimizer=adamw (not {config.optim.optimizer}: it "
            "does not step sharded parameters)"
        )
    settings = config.settings
    if config.algorithm == "grpo":
        if settings.updates_per_round > 1:
            return (
                "finetune.sharding=fsdp needs every process to call the denoiser equally often, but "
                "grpo.updates_per_round > 1 splits each minibatch unevenly over the processes: set "
                "grpo.updates_per_round=1, or finetune.sharding=none"
            )
        if settings.train_steps == "dance":
            return (
                "finetune.sharding=fsdp needs every process to call the denoiser equally often, but "
                "grpo.train_steps=dance draws the trained steps per sample: use another train_steps "
                "(e.g. random), or finetune.sharding=none"
            )
    if config.algorithm in ("raft", "rwr"):
        return (
            f"finetune.sharding=fsdp needs every process to call the denoiser equally often, but "
            f"{config.algorithm} trains only its samples of weight > 0, which differ in number between "
            "processes: use finetune.sharding=none"
        )
    return None


def check_launcher(distributed_type: Any) -> None:
    """Refuse a launch with accelerate's FSDP plugin (``distributed_type: FSDP``): vialign never hands its
    model to accelerate, so that plugin would shard nothing while looking as if it did."""
    if str(getattr(distributed_type, "value", distributed_type)) == "FSDP":
        raise VialignInputError(
            "accelerate was launched with its FSDP plugin (distributed_type: FSDP), which vialign does not "
            "use: launch as a plain multi-GPU run (configs/accelerate/fsdp_8gpu.yaml) and set "
            "finetune.method=full finetune.sharding=fsdp, with which vialign shards the model itself"
        )


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter, gradient or optimizer state of a sharded module)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from every process when sharded (a collective: every process calls
    it, in the same order), else ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """``target.copy_(full)`` for a whole tensor ``full``: a sharded ``target`` takes its own shard of it
    (no communication: every process holds ``full``)."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=target.to_local().device, dtype=target.dtype)
        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(full)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of whole tensors (a checkpoint): each sharded parameter's state
    tensors of its full shape become shards like the parameter (scalars such as AdamW's step stay)."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param) or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            for key, value in state.items():
                if torch.is_tensor(value) and not is_sharded(value) and value.shape == param.shape:
                    value = value.to(device=param.to_local().device)
                    state[key] = distribute_tensor(
                        value, param.device_mesh, param.placements, src_data_rank=None
                    )


def scalar(value: torch.Tensor) -> float:
    """A one-element tensor (a DTensor too, e.g. the norm ``clip_grad_norm_`` returns) as a float."""
    return float(full_tensor(value))


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory) and whose buffers are real
    copies: :meth:`ShardedDenoiser.unsharded` fills its parameters from a full state dict."""
    memo: dict[int, Any] = {}
    for param in module.parameters():
        if id(param) not in memo:
            memo[id(param)] = nn.Parameter(
                torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
            )
    return copy.deepcopy(module, memo)


class ShardedDenoiser:
    """The adapter's denoiser, ``fully_shard``-ed in place over all processes (module docstring).

    ``mixed_precision="bf16"``: blocks are gathered and run in bfloat16, gradients reduced in float32
    (``MixedPrecisionPolicy``); the sharded weights keep the model's dtype."""

    def __init__(self, adapter: Any, world_size: int, *, mixed_precision: str = "none"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if mixed_precision not in ("none", *MIXED_PRECISION):
            raise VialignInputError(f"finetune.fsdp_mixed_precision: {mixed_precision!r}; use none or bf16")
        self.adapter = adapter
        denoiser = adapter.unwrapped_denoiser
        device = next(denoiser.parameters()).device
        self.skeleton = meta_skeleton(denoiser)
        self.mesh = init_device_mesh(device.type, (world_size,))
        # the root too frees its gathered parameters after each forward (FSDP2 would keep them for the
        # backward): after a forward without gradient (sampling) nothing gathered outlives the call, so
        # weights written into the shards (EMA swapped in, a resume) are what the next call gathers
        options: dict[str, Any] = {"mesh": self.mesh, "reshard_after_forward": True}
        if mixed_precision != "none":
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=MIXED_PRECISION[mixed_precision], reduce_dtype=torch.float32
            )
        blocks = adapter.denoiser_blocks()
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(denoiser, **options)
        for module in denoiser.modules():
            if isinstance(module, FSDPModule):
                # summed, as Processes.sum_gradients does; with a plain SUM reduce-scatter (gloo has no
                # PREMUL_SUM, which a divide factor would use otherwise)
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        # a parameter no process used reduces as zeros (sum_gradients' zero), and processes that used
        # different parameters still make the same reduce-scatter calls
        if hasattr(denoiser, "set_reduce_scatter_unused_params"):
            denoiser.set_reduce_scatter_unused_params(True)
        else:
            logger.warning(
                "torch %s's FSDP2 has no set_reduce_scatter_unused_params: a parameter no process used in a "
                "step gets no gradient (AdamW skips it; unsharded, it would decay), and processes must use "
                "the same parameters (vialign's algorithms do under fsdp); a newer torch (2.14) has it",
                torch.__version__,
            )
        self.denoiser = denoiser
        logger.info(
            "finetune.sharding=fsdp: the %s is sharded over %d processes (%d blocks and the rest)",
            adapter.denoiser_name,
            world_size,
            len(blocks),
        )

    def parameters(self) -> list[nn.Parameter]:
        """The sharded parameters (``fully_shard`` replaced the module's parameters by these)."""
        return list(self.denoiser.parameters())

    def full_state(self, *, main_only: bool = True) -> dict[str, torch.Tensor]:
        """The denoiser's full state dict (parameters and buffers): on the CPU of the main process only, an
        empty dict elsewhere (``main_only``), or on every process, on the device. A collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        for module in self.denoiser.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # the state dict is read from the shards
        options = StateDictOptions(full_state_dict=True, cpu_offload=main_only)
        return get_model_state_dict(self.denoiser, options=options)

    def unsharded(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A plain (unsharded) module of the denoiser holding ``state`` (a full state dict)."""
        module = copy.deepcopy(self.skeleton)
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def frozen_copy(self) -> nn.Module:
        """A whole, frozen, unsharded copy of the current weights on every process (a collective), on the
        denoiser's device: the reference model of KL terms, or reward shaping's initial model."""
        copy_ = self.unsharded(self.full_state(main_only=False))
        return copy_.to(self.adapter.device).requires_grad_(False).eval()

    def full_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The full tensors of the parameters ``names`` on the main process's CPU ({} elsewhere)."""
        state = self.full_state()
        return {name: state[name] for name in names} if state else {}

    @contextlib.contextmanager
    def unsharded_denoiser(self, is_main: bool) -> Iterator[None]:
        """Inside the block, the adapter's denoiser component is an unsharded CPU copy of the current
        weights on the main process (to export it); every process must enter (the weights are gathered)."""
        state = self.full_state()
        if not is_main:
            yield
            return
        components, name = self.adapter.components, self.adapter.denoiser_name
        sharded = components[name]
        components[name] = self.unsharded(state)
        try:
            yield
        finally:
            components[name] = sharded


def gather_to_main(tensor: torch.Tensor, is_main: bool) -> torch.Tensor | None:
    """The whole ``tensor`` on the main process's CPU, None elsewhere (a collective when sharded)."""
    full = full_tensor(tensor).detach()
    return full.cpu() if is_main else None


def checkpoint_tensors(
    sharded: ShardedDenoiser,
    names: Sequence[str],
    ema: Sequence[torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    is_main: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a checkpoint, gathered whole on the main process, as an unsharded run writes them:
    ``weights.<name>``, ``optimizer.<index>.<key>``, ``ema.<name>``; and the optimizer's JSON part. Every
    process calls it; the others get ({}, their optimizer's JSON part)."""
    from vialign.checkpoint import optimizer_to_flat

    tensors = {f"weights.{name}": value for name, value in sharded.full_weights(names).items()}
    optimizer_tensors, meta = optimizer_to_flat(optimizer, gather=lambda t: gather_to_main(t, is_main))
    tensors.update(optimizer_tensors)
    if ema is not None:
        for name, average in zip(names, ema):
            full = gather_to_main(average, is_main)
            if full is not None:
                tensors[f"ema.{name}"] = full
    return (tensors if is_main else {}), meta
