"""Overhead of a DPO training step over the model calls it cannot avoid.

    python benchmarks/dpo_step.py                        # the ShapeWorld testbed and its shipped pairs, CPU
    python benchmarks/dpo_step.py --pairs 64 --micro-batch 32

One run measures, on the same model and batch shapes:
  step   : wall time of full offline DPO steps (pair selection, shared noise and t, prompt embeddings,
           reference forward, policy forward + backward, loss, optimizer step);
  calls  : the denoiser calls those steps need, timed bare: a forward without grad (the reference) and a
           forward + backward (the policy) on the winners and losers of every micro-batch;
and prints step / calls (target <= 1.3). Medians over ``--repeats`` steps after a warm-up. The pairs'
latents are encoded before the first step (``vialign.preferences``): a step never runs the VAE.
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
    parser.add_argument("--data", default="shapeworld:preferences")
    parser.add_argument("--pairs", type=int, default=32, help="pairs per step")
    parser.add_argument("--micro-batch", type=int, default=16, help="pairs per denoiser call")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from vialign.cli import _quiet_libraries
    from vialign.config import TrainConfig, load_config
    from vialign.trainer import Trainer

    _quiet_libraries()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            TrainConfig,
            None,
            [
                "algorithm=dpo",
                f"model.path={args.model}",
                f"output_dir={out}",
                f"data.train={args.data}",
                "data.eval=null",
                "rewards={}",
                "dpo.beta=100",
                f"dpo.pairs_per_step={args.pairs}",
                f"dpo.micro_batch_size={args.micro_batch}",
                "train.eval_every=0",
                "train.checkpoint_every=0",
                "train.tensorboard=false",
                "finetune.lora_rank=8",
            ],
        )
        trainer = Trainer(config, progress=False)
        algorithm, adapter = trainer.algorithm, trainer.adapter
        latents = trainer.preferences

        def full_step(step: int) -> float:
            start = time.perf_counter()
            algorithm.step(step)
            return time.perf_counter() - start

        # the same denoiser calls, bare: winners and losers of a micro-batch in one call, no loss bookkeeping
        x = torch.cat([latents.chosen[: args.micro_batch], latents.rejected[: args.micro_batch]])
        cond = adapter.encode_prompt(latents.prompts[: args.micro_batch] * 2)
        t = torch.full((len(x),), 500.0)
        chunks = -(-args.pairs // args.micro_batch)

        def bare_calls() -> float:
            start = time.perf_counter()
            for _ in range(chunks):
                with torch.no_grad(), adapter.lora_disabled():
                    adapter.predict(x, t, cond)
                adapter.predict(x, t, cond).float().square().mean().backward()
            trainer.optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        full_step(1), bare_calls()  # warm-up
        steps, calls = [], []
        for repeat in range(args.repeats):  # alternate, so drifts of the machine hit both alike
            steps.append(full_step(repeat + 2))
            calls.append(bare_calls())
    step_time, call_time = statistics.median(steps), statistics.median(calls)
    print(
        f"model {args.model}, {args.pairs} pairs/step, micro-batch {args.micro_batch} pairs, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"DPO step      {step_time * 1000:8.1f} ms  ({1000 * step_time / args.pairs:6.2f} ms per pair)")
    print(f"model calls   {call_time * 1000:8.1f} ms  ({1000 * call_time / args.pairs:6.2f} ms per pair)")
    print(f"ratio step / model calls = {step_time / call_time:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
