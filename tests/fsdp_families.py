"""Helper of tests/test_fsdp.py::test_fsdp_blocks_of_each_family (run by torchrun with 2 processes): each
family's tiny denoiser is sharded per block (``vialign.sharding.ShardedDenoiser``); every process runs
its own sample forward and backward; the main process checks that the gathered gradients are the sum of
both samples' unsharded gradients, and that an unsharded copy of the state predicts as the original.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_families.py OUT.json sd sdxl flux
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

import pipelines
from vialign.sharding import ShardedDenoiser, full_tensor


def loss_of(adapter, index: int) -> torch.Tensor:
    """A scalar of the denoiser's prediction of sample ``index`` (its own noise, prompt and timestep)."""
    generator = torch.Generator().manual_seed(100 + index)
    latents = torch.randn((1, *adapter.latent_shape(32, 32)), generator=generator)
    cond = adapter.encode_prompt([f"prompt {index}"])
    timestep = adapter.schedule(4, 32, 32).timesteps[index % 4]
    return adapter.predict(latents, timestep, cond, adapter.make_guidance(1.0)).square().mean()


@torch.no_grad()
def fixed_prediction(adapter) -> torch.Tensor:
    latents = torch.ones((1, *adapter.latent_shape(32, 32)))
    timestep = adapter.schedule(4, 32, 32).timesteps[1]
    return adapter.predict(latents, timestep, adapter.encode_prompt(["same"]), adapter.make_guidance(1.0))


def check(family: str, rank: int, world: int) -> dict:
    adapter = pipelines.load_pipeline(f"tiny-{family}", device="cpu")
    denoiser = adapter.unwrapped_denoiser.requires_grad_(True)
    names = [name for name, _ in denoiser.named_parameters()]
    # the unsharded reference: the summed gradient of every process's sample, on one module
    original = copy.deepcopy(denoiser)
    plain = copy.copy(adapter)
    plain.components = {**adapter.components, adapter.denoiser_name: original}
    plain.denoiser = original
    expected_out = fixed_prediction(plain)
    sum(loss_of(plain, i) for i in range(world)).backward()
    expected = {n: p.grad.clone() for n, p in original.named_parameters()}

    sharded = ShardedDenoiser(adapter, world)
    blocks = len(adapter.denoiser_blocks())
    loss_of(adapter, rank).backward()
    params = sharded.parameters()
    local = sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)
    grads = {n: full_tensor(p.grad) for n, p in zip(names, params)}
    state = sharded.full_state()
    result = {"blocks": blocks, "local_fraction": local}
    if rank == 0:
        result["max_grad_difference"] = max(float((grads[n] - expected[n]).abs().max()) for n in names)
        result["max_grad"] = max(float(expected[n].abs().max()) for n in names)
        copy_ = sharded.unsharded(state)
        plain.components = {**adapter.components, adapter.denoiser_name: copy_}
        plain.denoiser = copy_
        result["copy_difference"] = float((fixed_prediction(plain) - expected_out).abs().max())
    return result


def main() -> None:
    out, families = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {family: check(family, rank, world) for family in families}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
