"""Sharded full fine-tuning (``finetune.sharding=fsdp``, ``vialign.sharding``): two CPU processes (gloo)
with the denoiser sharded by FSDP2 train as one unsharded process, and write the same checkpoints."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import accelerate_launch
from safetensors.torch import load_file

from vialign.config import TrainConfig, load_config
from vialign.errors import ConfigError

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a white star"]
# optim.eps=1e-6 (not 1e-8): Adam's first steps move a weight by ~lr * g / (|g| + eps), so a gradient near 0
# would turn float rounding (batch sums, reduction order: also between one and two unsharded processes)
# into updates of up to lr; with 1e-8 the two runs differ by up to ~8e-6, unsharded or not
FULL = ["finetune.method=full", "optim.eps=1e-6", "eval.samples_per_prompt=2", "eval.num_steps=3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def fully_shard_runs_on_cpu() -> str | None:
    """None when FSDP2 and gloo are there; else why the two-process tests cannot run here."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"torch.distributed.fsdp.fully_shard is missing: {error}"
    return None


needs_fsdp = pytest.mark.skipif(fully_shard_runs_on_cpu() is not None, reason=str(fully_shard_runs_on_cpu()))


def max_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefixes: tuple[str, ...]
) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(prefixes))


@pytest.mark.slow
@needs_fsdp
def test_fsdp_two_processes_equal_one(tmp_path, tiny_dir):
    """accelerate launch with 2 processes and the tiny SD3 transformer sharded over them (FSDP2 per
    transformer block, then the rest) == one unsharded process, same global batch, after 2 steps of GRPO
    (with KL: a whole reference copy gathered from the shards; EMA; clipping), of ReFL and of DRaFT+ (K = 2:
    the checkpointed chain, whose recompute gathers the shards again in the backward pass): the trained
    weights and EMA within 1e-5. Each process holds half of the weights. Then evaluation (sampled on
    both processes) gives one process's metrics, the checkpoint has the unsharded run's keys, shapes and
    optimizer layout (whole tensors, values within 1e-5), a resume from it restores exactly what was
    saved (weights, EMA, Adam moments), and the exported pipeline holds the EMA weights."""
    algorithms = ["grpo", "refl", "draft"]
    script = Path(__file__).with_name("train_two_steps.py")
    sys.path.insert(0, str(script.parent))
    from train_two_steps import regularizer_images

    regularizer_images(tmp_path / "images")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    model = tiny_dir("sd3")
    out_one, out_two = tmp_path / "one", tmp_path / "two"
    args = [model, str(prompts)]
    result = subprocess.run(
        [sys.executable, str(script), *args, str(out_one), *algorithms, *FULL, "--save"],
        env=ENV,
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    launch = accelerate_launch()
    sharded = [*FULL, "finetune.sharding=fsdp"]
    result = subprocess.run(
        [*launch, str(script), *args, str(out_two), *algorithms, *sharded, "--save"],
        env=ENV,
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for algorithm in algorithms:
        one_dir, two_dir = out_one / algorithm, out_two / algorithm
        state_one, state_two = (json.loads((d / "state.json").read_text()) for d in (one_dir, two_dir))
        assert state_one["world_size"] == 1 and state_one["local_weight_fraction"] == 1.0
        assert state_two["world_size"] == 2 and state_two["local_weight_fraction"] == pytest.approx(
            0.5, abs=0.02
        )
        one, two = load_file(one_dir / "result.safetensors"), load_file(two_dir / "result.safetensors")
        assert one.keys() == two.keys() and any(k.startswith("ema.") for k in one)
        initial = load_file(one_dir / "initial.safetensors")
        assert max_difference(one, initial, ("weights.",)) > 1e-4, algorithm  # full fine-tuning trained
        differences = {prefix: max_difference(two, one, (prefix,)) for prefix in ("weights.", "ema.")}
        print(f"{algorithm}: max |sharded - unsharded| {differences}")  # shown with pytest -s
        assert max(differences.values()) < 1e-5, (algorithm, differences)

        # evaluation: both processes sample, the main one reports what one process does
        eval_one, eval_two = (json.loads((d / "evaluation.json").read_text()) for d in (one_dir, two_dir))
        assert eval_one.keys() == eval_two.keys() and "eval/brightness" in eval_one
        for key, value in eval_one.items():
            assert eval_two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key

        # the checkpoint: whole tensors, the unsharded layout
        ckpt_one, ckpt_two = (
            load_file(d / "checkpoints" / "checkpoint-2" / "tensors.safetensors") for d in (one_dir, two_dir)
        )
        assert ckpt_one.keys() == ckpt_two.keys()
        assert all(ckpt_one[k].shape == ckpt_two[k].shape for k in ckpt_one)
        assert any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in ckpt_two)
        assert max_difference(ckpt_two, ckpt_one, ("weights.", "ema.")) < 1e-5
        meta_one, meta_two = (
            json.loads((d / "checkpoints" / "checkpoint-2" / "state.json").read_text())["optimizer"]
            for d in (one_dir, two_dir)
        )
        assert meta_one == meta_two
        for key in ckpt_two:
            if key.startswith(("weights.", "ema.")):
                assert torch.equal(ckpt_two[key], two[key]), key

        # a resume (sharded) restores what was saved, Adam moments included
        resumed = load_file(two_dir / "resumed.safetensors")
        for key, value in resumed.items():
            assert torch.equal(value, ckpt_two[key].to(value.dtype)), key

        # the export: a diffusers pipeline folder with the (whole) EMA weights
        exported = {}
        for path in glob.glob(str(two_dir / "final" / "transformer" / "*.safetensors")):
            exported.update(load_file(path))
        names = [k[len("ema.") :] for k in two if k.startswith("ema.")]
        assert names and all(torch.equal(exported[n], two[f"ema.{n}"]) for n in names)


@pytest.mark.slow
@needs_fsdp
def test_fsdp_blocks_of_each_family(tmp_path):
    """The SD and SDXL UNets (down, mid and up blocks) and FLUX (double and single transformer blocks)
    sharded per block over 2 processes: each holds half the weights, the gradients of each process's
    own sample are summed over processes (not averaged), and an unsharded copy of the gathered state
    predicts exactly as the original."""
    out = tmp_path / "families.json"
    script = Path(__file__).with_name("fsdp_families.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29538",
    ]
    result = subprocess.run(
        [*command, str(script), str(out), "sd", "sdxl", "flux"],
        env=ENV,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {family: r["blocks"] for family, r in results.items()} == {"sd": 5, "sdxl": 5, "flux": 2}
    for family, r in results.items():
        assert r["local_fraction"] == pytest.approx(0.5, abs=0.02), family
        assert r["max_grad"] > 1e-3 and r["max_grad_difference"] < 1e-6, family
        assert r["copy_difference"] == 0.0, family


def fsdp_config(*overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        ["rewards={brightness: {}}", "finetune.method=full", "finetune.sharding=fsdp", *overrides],
    )


def test_fsdp_config_refuses_what_it_cannot_shard():
    assert fsdp_config().finetune.sharding == "fsdp"
    assert load_config(TrainConfig).finetune.sharding == "none"  # the default
    with pytest.raises(ConfigError, match="finetune.sharding=fsdp shards full fine-tuning"):
        fsdp_config("finetune.method=lora")
    with pytest.raises(ConfigError, match="optim.optimizer=adamw"):
        fsdp_config("optim.optimizer=adafactor")
    with pytest.raises(ConfigError, match="grpo.updates_per_round > 1"):
        fsdp_config("grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.updates_per_round=2")
    with pytest.raises(ConfigError, match="grpo.train_steps=dance"):
        fsdp_config("grpo.train_steps=dance")
    with pytest.raises(ConfigError, match="raft trains only its samples of weight > 0"):
        fsdp_config("algorithm=raft")
    with pytest.raises(ConfigError, match="fsdp_mixed_precision"):
        fsdp_config("finetune.fsdp_mixed_precision=fp8")


def test_fsdp_on_one_process_trains_unsharded(tmp_path, tiny_dir, quiet_libraries):
    """One process: nothing to shard; the run is the unsharded one (plain parameters, no FSDP)."""
    from vialign.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config = fsdp_config(
        f"model.path={tiny_dir('sd3')}",
        f"output_dir={tmp_path / 'run'}",
        f"data.train={prompts}",
        "data.eval=null",
        "train.tensorboard=false",
    )
    trainer = Trainer(config, progress=False)
    assert trainer.sharded is None
    assert not any(type(p).__name__ == "DTensor" for p in trainer.trainable)
    assert len(trainer.trainable) == len(list(trainer.adapter.unwrapped_denoiser.parameters()))


def test_accelerate_fsdp_plugin_is_refused():
    from accelerate.utils import DistributedType

    from vialign.errors import VialignInputError
    from vialign.sharding import check_launcher

    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        check_launcher(kind)
    with pytest.raises(VialignInputError, match="finetune.sharding=fsdp, with which vialign shards"):
        check_launcher(DistributedType.FSDP)


def test_accelerate_configs_and_slurm_script():
    """configs/accelerate: accelerate reads each file (a header comment explains it), FSDP is a plain
    multi-GPU launch; the Slurm script is valid bash launching 2 nodes x 8 GPUs with accelerate."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).parents[1] / "configs" / "accelerate"
    expected = {
        "single_gpu": ("NO", 1, 1),
        "ddp_8gpu": ("MULTI_GPU", 8, 1),
        "fsdp_8gpu": ("MULTI_GPU", 8, 1),
        "multinode_2x8": ("MULTI_GPU", 16, 2),
    }
    for name, (kind, processes, machines) in expected.items():
        path = folder / f"{name}.yaml"
        assert path.read_text().startswith("# accelerate config:"), name
        config = load_config_from_file(str(path))
        assert (config.distributed_type, config.num_processes, config.num_machines) == (
            kind,
            processes,
            machines,
        )
        assert config.mixed_precision == "no" and not config.fsdp_config, name
    assert "finetune.sharding=fsdp" in (folder / "fsdp_8gpu.yaml").read_text()
    slurm = folder / "slurm_2x8.sh"
    subprocess.run(["bash", "-n", str(slurm)], check=True)
    text = slurm.read_text()
    for needed in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "accelerate launch",
        "multinode_2x8.yaml",
    ):
        assert needed in text, needed
    assert os.access(slurm, os.X_OK)
