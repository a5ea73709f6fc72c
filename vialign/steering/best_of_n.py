"""Best-of-N: sample N candidates of each prompt, keep the one the reward scores highest.

Candidate 0 of image i uses image i's own seed, so N = 1 is plain sampling (bitwise); candidate j uses
``mix_seed(seed_i, j)`` (``common.candidate_seed``). Cost: N times plain sampling, plus N reward calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.adapter import GeneratorAdapter
from vialign.errors import VialignInputError
from vialign.steering.common import (
    SamplingSetup,
    SteeringResult,
    candidate_seed,
    check_prompts,
    count_model_calls,
    decode_and_score,
    sample_setup,
)


def best_of_n(
    adapter: GeneratorAdapter,
    reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setup: SamplingSetup,
    *,
    n: int = 8,
    batch_size: int = 8,
) -> SteeringResult:
    """For each prompt, ``n`` candidates (plain sampling); keep the highest ``reward``."""
    check_prompts(prompts, seeds)
    if n < 1:
        raise VialignInputError(f"best-of-N needs N >= 1 candidates, got {n}")
    # candidate-major within a prompt: rows [i * n, (i + 1) * n) are prompt i's candidates
    rows_prompts = [p for p in prompts for _ in range(n)]
    rows_seeds = [candidate_seed(s, j) for s in seeds for j in range(n)]
    with count_model_calls(adapter) as calls:
        latents = torch.cat(
            [
                sample_setup(adapter, rows_prompts[i : i + batch_size], rows_seeds[i : i + batch_size], setup)
                for i in range(0, len(rows_prompts), batch_size)
            ]
        )
    pixels, scores = decode_and_score(adapter, reward, latents, rows_prompts, batch_size)
    grouped = scores.view(len(prompts), n)
    best = grouped.argmax(dim=1)
    keep = torch.arange(len(prompts)) * n + best.cpu()
    return SteeringResult(
        latents=latents[keep],
        pixels=pixels[keep],
        reward=scores[keep],
        model_calls=calls[0] / len(prompts),
        details=[
            {
                "chosen": int(best[i]),
                "seed": rows_seeds[int(keep[i])],
                "candidate_rewards": grouped[i].tolist(),
            }
            for i in range(len(prompts))
        ],
    )
