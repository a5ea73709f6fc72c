"""The configurations whose first two training steps are pinned by ``tests/test_golden.py``.

Each case is one shipped preset family on the ShapeWorld testbed, written out key by key (so later
changes to the presets in ``configs/`` do not move the pins). The values were recorded by
``python tests/golden/record.py`` on the commit before the algorithm-boundary refactor (issue 11):
the metrics of steps 1 and 2 and the trained LoRA weights after step 2. ``OLD_KEYS`` maps each
setting to the section it had then (``gradient.*`` / ``adjoint.*``), so the recorder runs on both.
"""

from __future__ import annotations

COMMON = [
    "model.path=shapeworld",
    "seed=0",
    "data.train=shapeworld:train",
    "data.eval=null",
    "rewards={shapeworld-clip: {weight: 1.0}}",
    "finetune.method=lora",
    "finetune.lora_rank=8",
    "sampler.num_steps=10",
    "train.max_steps=2",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.tensorboard=false",
]

GRPO = [
    "algorithm=grpo",
    "optim.lr=1.5e-3",
    "optim.max_grad_norm=1.0",
    "sampler.sde_kind=flow-sde",
    "sampler.noise_level=0.7",
    "grpo.group_size=8",
    "grpo.prompts_per_step=16",
    "grpo.clip_range=1.0e-4",
    "grpo.log_prob_reduction=mean",
    "grpo.kl_beta=0.0",
    "grpo.train_steps=all_but_last",
    "grpo.micro_batch_size=32",
]

# (section, key=value) pairs for the reward-gradient families: section is the new name
DRAFT = [
    "algorithm=draft",
    "optim.lr=3.0e-4",
    "draft.prompts_per_step=32",
    "draft.micro_batch_size=32",
    "draft.grad_steps=2",
]

CASES: dict[str, list[str]] = {
    "grpo": COMMON + GRPO,
    "grpo_kl": COMMON + GRPO + ["grpo.kl_beta=0.5", "grpo.prompts_per_step=4"],
    "draft": COMMON + DRAFT,
    "draft_lv": COMMON + DRAFT + ["draft.lv_samples=2"],
    "draft_plus": COMMON + DRAFT + ["draft.kl_coeff=0.1", "draft.eta=0.5"],
    "alignprop": COMMON
    + [
        "algorithm=alignprop",
        "optim.lr=3.0e-4",
        "alignprop.prompts_per_step=32",
        "alignprop.micro_batch_size=32",
        "alignprop.k_mean=2",
        "alignprop.k_std=1",
    ],
    "refl": COMMON
    + [
        "algorithm=refl",
        "optim.lr=3.0e-4",
        "refl.prompts_per_step=32",
        "refl.micro_batch_size=32",
        "refl.steps=[6, 9]",
    ],
    "adjoint_matching": COMMON
    + [
        "algorithm=adjoint_matching",
        "optim.lr=1.0e-3",
        "adjoint_matching.prompts_per_step=32",
        "adjoint_matching.micro_batch_size=32",
        "adjoint_matching.reward_multiplier=10",
        "adjoint_matching.trained_timesteps=5",
    ],
}

# new key -> the key before the refactor
OLD_KEYS = {
    "draft.": "gradient.",
    "alignprop.k_mean": "gradient.alignprop_k_mean",
    "alignprop.k_std": "gradient.alignprop_k_std",
    "alignprop.": "gradient.",
    "refl.steps": "gradient.refl_steps",
    "refl.": "gradient.",
    "adjoint_matching.": "adjoint.",
}


def old_style(overrides: list[str]) -> list[str]:
    out = []
    for text in overrides:
        for new, old in OLD_KEYS.items():
            if text.startswith(new):
                text = old + text[len(new) :]
                break
        out.append(text)
    return out
