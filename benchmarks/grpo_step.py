"""Overhead of a GRPO training step over the model calls it cannot avoid.

    python benchmarks/grpo_step.py                       # the ShapeWorld testbed model, CPU
    python benchmarks/grpo_step.py --model tiny-sd3 --size 64

One run measures, on the same model and batch shapes:
  step   : wall time of full GRPO training steps (rollout, decode, reward, advantages, update);
  calls  : the denoiser calls those steps need, timed bare: the rollout's forwards (no grad, every step,
           every micro-batch, CFG batch) plus the forward and backward of every trained step;
and prints step / calls per training sample (target <= 1.25). Decoding and the reward are counted in
``step`` only, so they are part of the overhead. Medians over ``--repeats`` steps after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapeworld")
    parser.add_argument("--reward", default="shapeworld-clip")
    parser.add_argument("--size", type=int, default=None, help="image size (default the model's)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from vialign.cli import _quiet_libraries
    from vialign.config import TrainConfig, load_config
    from vialign.trainer import Trainer

    _quiet_libraries()
    size = [f"sampler.height={args.size}", f"sampler.width={args.size}"] if args.size else []
    data = [] if args.model.startswith("shapeworld") else ["data.train=shapeworld:train", "data.eval=null"]
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            TrainConfig,
            None,
            [
                f"model.path={args.model}",
                f"output_dir={out}",
                f"rewards={{{args.reward}: {{}}}}",
                f"sampler.num_steps={args.steps}",
                f"grpo.group_size={args.group_size}",
                f"grpo.prompts_per_step={args.prompts}",
                f"grpo.micro_batch_size={args.micro_batch}",
                "grpo.train_steps=all_but_last",
                "train.eval_every=0",
                "train.checkpoint_every=0",
                "train.tensorboard=false",
                "finetune.lora_rank=8",
                *size,
                *data,
            ],
        )
        trainer = Trainer(config, progress=False)
        algorithm, adapter = trainer.algorithm, trainer.adapter
        batch = args.group_size * args.prompts
        trained = args.steps - 1

        def full_step(step: int) -> float:
            start = time.perf_counter()
            algorithm.step(step)
            return time.perf_counter() - start

        # the same denoiser calls, bare: inputs of the right shapes, no sampler, no reward, no bookkeeping
        context = algorithm.context
        height, width = context.height, context.width
        x = torch.randn(args.micro_batch, *adapter.latent_shape(height, width))
        cond = adapter.encode_prompt(["a red circle"] * args.micro_batch)
        uncond = adapter.uncond_embeds(args.micro_batch)
        guidance, t = context.guidance, algorithm.schedule.timesteps[0]
        chunks = -(-batch // args.micro_batch)

        def bare_calls() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(args.steps * chunks):
                    adapter.predict(x, t, cond, guidance, uncond)
            for _ in range(trained * chunks):
                adapter.predict(x, t, cond, guidance, uncond).float().square().mean().backward()
            trainer.optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        full_step(1), bare_calls()  # warm-up
        steps, calls = [], []
        for repeat in range(args.repeats):  # alternate, so drifts of the machine hit both alike
            steps.append(full_step(repeat + 2))
            calls.append(bare_calls())
    step_time, call_time = statistics.median(steps), statistics.median(calls)
    print(
        f"model {args.model}, {batch} samples/step ({args.prompts} prompts x {args.group_size}), "
        f"{args.steps} steps ({trained} trained), micro-batch {args.micro_batch}, {torch.get_num_threads()} threads"
    )
    print(f"GRPO step      {step_time:7.2f} s  ({1000 * step_time / batch:6.1f} ms per training sample)")
    print(f"model calls    {call_time:7.2f} s  ({1000 * call_time / batch:6.1f} ms per training sample)")
    print(f"ratio step / model calls = {step_time / call_time:.3f}  (target <= 1.25)")


if __name__ == "__main__":
    main()
