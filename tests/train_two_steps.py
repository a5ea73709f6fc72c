"""Helper of tests/test_trainer.py::test_two_processes_equal_one (run directly, or by accelerate launch):
two training steps of each algorithm named on the command line, on a tiny SD3 with a global batch of 8
(GRPO) or 4 (the others); the main process writes the trained weights (and GRPO's global advantages) to
OUT/<algorithm>/result.safetensors.

    python tests/train_two_steps.py MODEL_DIR PROMPTS.txt OUT grpo grpo_recipe draft refl adjoint_matching dpo online_dpo raft rwr

An argument ``key=value`` is a config override for every case (tests/test_fsdp.py: ``finetune.method=full
finetune.sharding=fsdp``). ``--save``: after the two steps, also evaluate two prompts
(OUT/<case>/evaluation.json), write checkpoint 2 and export (OUT/<case>/checkpoints, OUT/<case>/final),
then resume a new trainer from that checkpoint and write its weights, EMA and optimizer state to
OUT/<case>/resumed.safetensors. Sharded weights are gathered whole.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vialign.config import TrainConfig, load_config
from vialign.sharding import full_tensor
from vialign.trainer import Trainer

COMMON = [
    "data.eval=null",
    "rewards={brightness: {}}",
    "finetune.lora_rank=4",
    "optim.lr=1e-3",
    "sampler.num_steps=3",
    "sampler.height=32",
    "sampler.width=32",
    "train.max_steps=2",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.tensorboard=false",
    "finetune.ema_decay=0.5",
]

SETTINGS = {
    "grpo": [
        "grpo.group_size=4",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=2",
        "grpo.clip_range=0.2",
        "grpo.kl_beta=0.5",
    ],
    # the recipes' knobs: 2 updates per round (minibatches split across processes unevenly), shared group
    # noise, DanceGRPO's per-sample steps, prompt dropout
    "grpo_recipe": [
        "grpo.group_size=4",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=2",
        "grpo.clip_range=0.2",
        "grpo.updates_per_round=2",
        "grpo.same_group_noise=true",
        "grpo.train_steps=dance",
        "grpo.step_fraction=0.5",
        "data.prompt_dropout=0.5",
    ],
    # DRaFT+ (the reference model), two micro-batches on one process, one on each of two
    "draft": [
        "draft.prompts_per_step=4",
        "draft.micro_batch_size=2",
        "draft.grad_steps=2",
        "draft.kl_coeff=0.5",
    ],
    "refl": [
        "refl.prompts_per_step=4",
        "refl.micro_batch_size=2",
        "refl.steps=[1, 2]",
        "refl.regularizer_weight=0.5",
    ],
    # loss clipping at the 0.5-quantile: one threshold from the global batch on every process
    "adjoint_matching": [
        "adjoint_matching.prompts_per_step=4",
        "adjoint_matching.micro_batch_size=2",
        "adjoint_matching.trained_timesteps=3",
        "adjoint_matching.clip_quantile=0.5",
        "adjoint_matching.reward_multiplier=1000",
    ],
    # offline pairs (latents cached by the main process, read by the other), two micro-batches on one
    "dpo": ["dpo.beta=100", "dpo.pairs_per_step=4", "dpo.micro_batch_size=2"],
    # each process rolls out whole groups; best vs worst by brightness
    "online_dpo": [
        "online_dpo.beta=100",
        "online_dpo.samples_per_prompt=2",
        "online_dpo.pairs_per_step=2",
        "online_dpo.micro_batch_size=1",
    ],
    # weights from the global batch's rewards; a group split across the two processes
    "raft": ["raft.prompts_per_step=2", "raft.samples_per_prompt=2", "raft.micro_batch_size=1"],
    "rwr": [
        "rwr.prompts_per_step=2",
        "rwr.samples_per_prompt=2",
        "rwr.micro_batch_size=1",
        "rwr.temperature=0.1",
        "rwr.updates_per_step=2",
    ],
}


def regularizer_images(folder: Path) -> str:
    """Four 32x32 captioned images for ReFL's denoising regulariser."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        pixels = torch.linspace(0, 255, 32 * 32 * 3).roll(i * 500).view(32, 32, 3).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "prompt": f"image {i}"}))
    (folder / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    pairs = [
        {"prompt": f"image {i}", "chosen": f"{i}.png", "rejected": f"{(i + 1) % 4}.png"} for i in range(4)
    ]
    (folder / "preferences.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    return str(folder / "pairs.jsonl")


ALGORITHM = {"grpo_recipe": "grpo"}  # a case name -> the algorithm it runs


def whole(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained weights and the EMA, by checkpoint name (every process calls it: sharded ones are
    gathered)."""
    names = trainer._trainable_names()
    tensors = {f"weights.{n}": full_tensor(p).detach().clone() for n, p in zip(names, trainer.trainable)}
    if trainer.ema is not None:
        tensors.update({f"ema.{n}": full_tensor(e).clone() for n, e in zip(names, trainer.ema)})
    return tensors


def local_fraction(params: list[torch.Tensor]) -> float:
    """The fraction of the trainable weights this process holds (1 unsharded, 1/N sharded over N)."""
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    return local / sum(p.numel() for p in params)


def main() -> None:
    model, prompt_file, out = sys.argv[1:4]
    overrides = [arg for arg in sys.argv[4:] if "=" in arg]
    save = "--save" in sys.argv[4:]
    for case in [arg for arg in sys.argv[4:] if "=" not in arg and arg != "--save"]:
        algorithm = ALGORITHM.get(case, case)
        folder = Path(out) / case
        images = Path(out).parent / "images"
        extra = {
            "refl": [f"refl.regularizer_data={images / 'pairs.jsonl'}"],
            "dpo": [f"data.train={images / 'preferences.jsonl'}"],
        }.get(algorithm, [])
        config = load_config(
            TrainConfig,
            None,
            [
                f"algorithm={algorithm}",
                f"model.path={model}",
                f"output_dir={folder}",
                f"data.train={prompt_file}",  # dpo: replaced by its pairs in `extra`
                *COMMON,
                *SETTINGS[case],
                *extra,
                *overrides,
            ],
        )
        trainer = Trainer(config, progress=False)
        initial = {k: v for k, v in whole(trainer).items() if k.startswith("weights.")}
        if trainer.is_main:
            save_file(initial, str(folder / "initial.safetensors"))
        extra_tensors = {}
        for step in (1, 2):
            trainer.algorithm.step(step)
            if algorithm == "grpo":
                extra_tensors[f"advantages.{step}"] = trainer.algorithm.last_advantages.clone()
                extra_tensors[f"scores.{step}"] = trainer.algorithm.last_scores.clone()
        trained = whole(trainer)
        if trainer.is_main:
            save_file({**trained, **extra_tensors}, str(folder / "result.safetensors"))
            state = {
                "world_size": trainer.world_size,
                "algorithm": trainer.algorithm.state_dict(),
                "local_weight_fraction": local_fraction(trainer.trainable),
            }
            (folder / "state.json").write_text(json.dumps(state))
        trainer.accelerator.wait_for_everyone()
        if save:
            trainer.eval_prompts = trainer.train_prompts[:2]
            evaluation = trainer.evaluate(2)
            if trainer.is_main:
                (folder / "evaluation.json").write_text(json.dumps(evaluation))
            trainer.save_checkpoint(2)
            trainer.export()
            resumed = Trainer(config, resume=True, progress=False)
            tensors = whole(resumed)
            for index, param in enumerate(resumed.trainable):
                for key, value in resumed.optimizer.state[param].items():
                    if torch.is_tensor(value):
                        tensors[f"optimizer.{index}.{key}"] = full_tensor(value).detach().clone().cpu()
            if resumed.is_main:
                save_file(tensors, str(folder / "resumed.safetensors"))
            resumed.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
