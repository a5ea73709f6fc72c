"""Is there room for alignment on the ShapeWorld testbed? A reward-filtered fine-tuning probe (RAFT,
Dong et al. arXiv:2304.06767) within a CPU time budget, trained on ``shapeworld-clip`` only, judged
by the oracle on the held-out prompts.

    python benchmarks/testbed_headroom.py [--minutes 10] [--rank 16]

Each round: sample every prompt (train and held-out, as an alignment run would) at 8 fresh seeds,
keep each prompt's best sample by the learned reward (best-of-8), and fit a LoRA to the kept samples
with the ordinary rectified-flow loss (10% empty prompts, as in pretraining); the kept samples of
earlier rounds stay in the buffer. Printed: held-out oracle accuracy (36 prompts x 8 seeds, fixed)
before, and after each round, with the elapsed time. The testbed's yardstick for the alignment issues
is +10 points within 10 CPU minutes.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pipelines  # noqa: E402
import rewards  # noqa: E402
from rewards import shapeworld as sw  # noqa: E402
from vialign.testbed import evaluate  # noqa: E402


def held_out_accuracy(adapter) -> float:
    return evaluate.oracle_report(evaluate.generate(adapter, sw.held_out_prompts(), range(8))).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--fit-steps", type=int, default=15, help="LoRA steps per round")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    adapter = pipelines.load_pipeline("shapeworld", device="cpu")
    reward = rewards.load_reward("shapeworld-clip")
    before = held_out_accuracy(adapter)
    print(f"held-out oracle accuracy before: {before:.3f}")
    adapter.add_lora(rank=args.rank, alpha=args.rank)
    optimizer = torch.optim.AdamW(adapter.lora_parameters(), lr=args.lr)
    prompts = [s.prompt for s in sw.all_scenes()]
    start, round_index = time.time(), 0
    kept_latents, kept_prompts, empty = [], [], adapter.encode_prompt([""])
    while time.time() - start < args.minutes * 60:
        seeds = range(1000 + 8 * round_index, 1000 + 8 * (round_index + 1))
        samples = evaluate.generate(adapter, prompts, seeds)
        with torch.no_grad():
            scores = reward(samples.pixels, samples.prompts).score.view(len(prompts), 8)
        best = scores.argmax(1) + torch.arange(len(prompts)) * 8
        with torch.no_grad():
            kept_latents.append(adapter.encode(samples.pixels[best], sample=False))
        kept_prompts += [samples.prompts[i] for i in best]
        x0 = torch.cat(kept_latents)  # the buffer of every round's winners
        cond = adapter.encode_prompt(kept_prompts)
        adapter.denoiser.train()
        for _ in range(args.fit_steps):
            index = torch.randint(len(kept_prompts), (64,))
            sigma = torch.sigmoid(torch.randn(64)).view(-1, 1, 1, 1)
            noise = torch.randn_like(x0[index])
            noisy = (1 - sigma) * x0[index] + sigma * noise
            batch_cond = cond[index]
            drop = (
                torch.rand(64) < 0.1
            )  # keep the unconditional branch alive, as in pretraining: CFG needs it
            batch_cond = type(batch_cond)(
                {
                    k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), empty.tensors[k].expand_as(v), v)
                    for k, v in batch_cond.items()
                }
            )
            loss = F.mse_loss(adapter.predict(noisy, sigma.flatten() * 1000, batch_cond), noise - x0[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        adapter.denoiser.eval()
        round_index += 1
        accuracy = held_out_accuracy(adapter)
        print(
            f"round {round_index}: {time.time() - start:5.0f} s, mean reward of kept {scores.max(1).values.mean():.2f}, "
            f"held-out oracle accuracy {accuracy:.3f} ({accuracy - before:+.3f})"
        )


if __name__ == "__main__":
    main()
