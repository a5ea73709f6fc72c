"""Helper of tests/test_trainer.py::test_two_processes_equal_one (run directly, or by accelerate launch):
two GRPO steps on a tiny SD3 with a global batch of 8; the main process writes the trained weights and
every step's global advantages to OUT/result.safetensors."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from vialign.config import TrainConfig, load_config
from vialign.trainer import Trainer

model, prompt_file, out = sys.argv[1:4]
config = load_config(
    TrainConfig,
    None,
    [
        f"model.path={model}",
        f"output_dir={out}",
        f"data.train={prompt_file}",
        "data.eval=null",
        "rewards={brightness: {}}",
        "finetune.lora_rank=4",
        "optim.lr=1e-3",
        "sampler.num_steps=3",
        "sampler.height=32",
        "sampler.width=32",
        "grpo.group_size=4",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=2",
        "grpo.clip_range=0.2",
        "grpo.kl_beta=0.5",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
        "finetune.ema_decay=0.5",
    ],
)
trainer = Trainer(config, progress=False)
if trainer.is_main:
    initial = {
        f"weights.{n}": p.detach().clone() for n, p in zip(trainer._trainable_names(), trainer.trainable)
    }
    save_file(initial, str(Path(out) / "initial.safetensors"))
advantages = {}
for step in (1, 2):
    trainer.algorithm.step(step)
    advantages[f"advantages.{step}"] = trainer.algorithm.last_advantages.clone()
    advantages[f"scores.{step}"] = trainer.algorithm.last_scores.clone()
if trainer.is_main:
    weights = {
        f"weights.{n}": p.detach().clone() for n, p in zip(trainer._trainable_names(), trainer.trainable)
    }
    save_file({**weights, **advantages}, str(Path(out) / "result.safetensors"))
    (Path(out) / "world.json").write_text(json.dumps({"world_size": trainer.world_size}))
trainer.accelerator.wait_for_everyone()
