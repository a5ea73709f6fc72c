"""The published recipes: every training preset equals its anchor's values (tests/recipe_anchors.py, which
docs/recipes.md lists), resolves its prompt data, and trains one step on a tiny model of its family; and
the knobs the recipes need (updates per round, shared group noise, a static shift, schedule overrides,
prompt dropout, warm-up, DanceGRPO's steps, EMA every N with warm-up, soc's loss-step split)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from vialign.config import TrainConfig, load_config
from vialign.errors import VialignInputError

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from recipe_anchors import ANCHORS, DERIVED  # noqa: E402

TRAIN_PRESETS = sorted(
    p.stem
    for p in (ROOT / "configs").glob("*.yaml")
    if "algorithm:" in p.read_text()
    and not p.stem.startswith(("quickstart", "hacking", "eval_", "sample_", "shapeworld_"))
)
FAMILY = {"sd15": "sd", "sdxl": "sdxl", "sd35": "sd3", "flux": "flux", "wan21": "wan"}


def preset(name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml", list(overrides))


def resolved(config: TrainConfig, key: str):
    if key == "rewards":
        return {name: spec.weight for name, spec in config.rewards.items()}
    node = config
    head, *rest = key.split(".")
    node = config.settings if head == config.algorithm else getattr(config, head)
    for part in rest:
        node = getattr(node, part)
    return node


def normal(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(ANCHORS))
def test_presets_equal_their_anchors(name):
    anchor, rows = ANCHORS[name]
    config = preset(name)
    header = (ROOT / "configs" / f"{name}.yaml").read_text().split("\nalgorithm:")[0]
    repo, commit = anchor.split("@")
    assert repo in header and commit in header, f"{name}.yaml must cite {anchor} in its header"
    wrong = {
        key: (resolved(config, key), value)
        for key, value, _ in rows
        if normal(resolved(config, key)) != normal(value)
    }
    assert not wrong, f"{name}: preset value vs the anchor's: {wrong}"


def test_recipes_doc_lists_every_anchor_value():
    """docs/recipes.md's tables are the anchors' values: a row per key, value and file:line."""
    from recipe_anchors import cell

    doc = (ROOT / "docs" / "recipes.md").read_text()
    for name, (anchor, rows) in ANCHORS.items():
        assert f"## `{name}`" in doc and anchor in doc, name
        for key, value, where in rows:
            assert f"| `{key}` | {cell(value)} | {where} |" in doc, (name, key)


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_presets_without_code_say_what_they_are_derived_from(name):
    header = (ROOT / "configs" / f"{name}.yaml").read_text().split("\nalgorithm:")[0]
    assert DERIVED[name] in header and "derived" in header.lower()


def test_every_training_preset_is_anchored_or_derived():
    assert set(TRAIN_PRESETS) == set(ANCHORS) | set(DERIVED) and not set(ANCHORS) & set(DERIVED)


# ----------------------------------------------------------------------------------------------- one step
STAND_INS = {  # prompt sets fetched by `vialign prompts get`: a tiny file of the same schema
    "pickscore_train": ("pickscore_train.txt", "a cat on a sofa\na red car\nan old castle\n"),
    "hpdv2": ("hpdv2.txt", "a cat on a sofa\n\u4e00\u4e2a\u732b\na red car\nan old castle\n"),
    "refl": ("refl.json", json.dumps([{"text": t, "image": "x"} for t in ("a cat", "a dog", "a house")])),
    "dancegrpo_video": ("dancegrpo_video.txt", "a cat running\na red car driving\nwaves on a beach\n"),
}
SMALL = {
    "grpo": lambda s: [
        f"grpo.group_size={1 if s.group_size == 1 else 3}",
        f"grpo.prompts_per_step={2 * s.updates_per_round if s.group_size == 1 else 2}",
        "grpo.micro_batch_size=2",
    ],
    "refl": lambda s: ["refl.prompts_per_step=2", "refl.micro_batch_size=1", "refl.steps=[3, 5]"],
    "draft": lambda s: ["draft.prompts_per_step=2", "draft.micro_batch_size=1"],
    "alignprop": lambda s: [
        "alignprop.prompts_per_step=2",
        "alignprop.micro_batch_size=1",
        "sampler.num_steps=12",
    ],
    "adjoint_matching": lambda s: [
        "adjoint_matching.prompts_per_step=2",
        "adjoint_matching.micro_batch_size=1",
    ],
    "dpo": lambda s: ["dpo.pairs_per_step=2", "dpo.micro_batch_size=1"],
    "online_dpo": lambda s: [
        "online_dpo.samples_per_prompt=2",
        "online_dpo.pairs_per_step=2",
        "online_dpo.micro_batch_size=1",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_every_preset_trains_one_step_on_a_tiny_model_of_its_family(
    name, tmp_path, tiny_dir, monkeypatch, quiet_libraries
):
    """Its data resolves (shipped, or a stand-in of the same schema where `vialign prompts get` fetches
    it; a missing set names that command), and the trainer takes a step with the preset's knobs on a
    tiny model of the same family (sizes, batch and steps shrunk; rewards by a stand-in)."""
    from train_two_steps import regularizer_images

    from vialign.prompt_data import PROMPT_SETS
    from vialign.trainer import Trainer

    monkeypatch.setenv("VIALIGN_CACHE", str(tmp_path / "cache"))
    config = preset(name)
    data = [config.data.train, config.data.eval or ""]
    for spec in data:
        set_name = spec.removeprefix("prompts:")
        if spec.startswith("prompts:") and PROMPT_SETS[set_name].shipped is None:
            with pytest.raises(VialignInputError, match=f"vialign prompts get {set_name}"):
                # the config is fine; loading its data says which command fetches it
                Trainer(preset(name, f"output_dir={tmp_path / 'missing'}"), progress=False)
            file_name, text = STAND_INS[set_name]
            (tmp_path / "cache" / "prompts").mkdir(parents=True, exist_ok=True)
            (tmp_path / "cache" / "prompts" / file_name).write_text(text, encoding="utf-8")
    family = FAMILY[name.rsplit("_", 1)[-1]]
    overrides = [
        f"model.path={tiny_dir(family)}",
        "model.dtype=float32",
        f"output_dir={tmp_path / 'run'}",
        "rewards={brightness: {}}",
        "eval.rewards=[brightness]",
        "sampler.height=32",
        "sampler.width=32",
        "sampler.num_steps=6",
        "train.max_steps=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
        *SMALL[config.algorithm](config.settings),
    ]
    if config.model.max_sequence_length:
        overrides.append("model.max_sequence_length=16")
    if config.model.num_frames:
        overrides.append("model.num_frames=9")
    if config.algorithm == "dpo":
        regularizer_images(tmp_path / "images")
        overrides.append(f"data.train={tmp_path / 'images' / 'preferences.jsonl'}")
    small = preset(name, *overrides)
    trainer = Trainer(small, progress=False)
    metrics = trainer.algorithm.step(1)
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    assert trainer.optimizer_updates == (small.settings.updates_per_round if small.algorithm == "grpo" else 1)


# ----------------------------------------------------------------------------------------------- knobs
def tiny_run(tmp_path, model, prompt_file, *extra: str) -> TrainConfig:
    """A tiny-model run on ``prompt_file`` (brightness reward, 32 px, LoRA rank 4); ``extra`` win."""
    return load_config(
        TrainConfig,
        None,
        [
            f"model.path={model}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompt_file}",
            "data.eval=null",
            "rewards={brightness: {}}",
            "finetune.lora_rank=4",
            "optim.lr=1e-2",
            "sampler.height=32",
            "sampler.width=32",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
            *extra,
        ],
    )


def small_grpo(tmp_path, model, prompt_file, *extra: str) -> TrainConfig:
    settings = [
        "grpo.group_size=4",
        "grpo.prompts_per_step=2",
        "grpo.micro_batch_size=2",
        "grpo.clip_range=0.2",
    ]
    return tiny_run(
        tmp_path, model, prompt_file, "sampler.num_steps=4", "train.max_steps=1", *settings, *extra
    )


def test_updates_per_round_first_update_on_policy_later_ones_not(
    tmp_path, tiny_dir, prompt_file, quiet_libraries
):
    """Two optimizer updates per round on disjoint halves of the 8 samples: the first update's ratios are
    exactly 1 (its weights sampled the round), the second's are not (one update has moved them)."""
    from vialign.algorithms.grpo import update_minibatches
    from vialign.trainer import Trainer

    config = small_grpo(
        tmp_path, tiny_dir("sd3"), prompt_file, "grpo.updates_per_round=2", "grpo.kl_beta=0.1"
    )
    trainer = Trainer(config, progress=False)
    metrics = trainer.algorithm.step(1)
    first, second = trainer.algorithm.last_update_ratios
    assert metrics["optimizer_updates"] == 2 and trainer.optimizer_updates == 2
    assert first.numel() == second.numel() == 4 * 4  # 4 samples x 4 trained steps each
    assert torch.equal(first, torch.ones_like(first))
    assert metrics["ratio/first_update_max_deviation"] == 0.0
    assert (second - 1).abs().max() > 1e-4
    # the halves: one seeded shuffle, the same wherever it is computed; disjoint, covering every sample
    halves = update_minibatches(8, 2, seed=5)
    assert [len(h) for h in halves] == [4, 4] and sorted(torch.cat(halves).tolist()) == list(range(8))
    assert all(torch.equal(a, b) for a, b in zip(halves, update_minibatches(8, 2, seed=5)))
    assert update_minibatches(8, 1, seed=5)[0].tolist() == list(range(8))
    with pytest.raises(Exception, match="does not divide"):
        small_grpo(tmp_path, "x", prompt_file, "grpo.updates_per_round=3")


def test_shared_group_noise_starts_every_member_from_the_leaders_noise(
    tmp_path, tiny_dir, prompt_file, quiet_libraries
):
    from vialign.algorithms.grpo import sde_sampler
    from vialign.trainer import Trainer

    config = small_grpo(tmp_path, tiny_dir("sd3"), prompt_file, "grpo.same_group_noise=true")
    trainer = Trainer(config, progress=False)
    context = trainer.algorithm.context
    sampler = sde_sampler("flow")
    prompts = ["a cat"] * 8
    shared = context.rollout(prompts, 1, 0, sampler, shared_noise_group=4)
    own = context.rollout(prompts, 1, 0, sampler)
    x0 = shared.latents[:, 0]
    for g in range(8):
        assert torch.equal(x0[g], x0[g - g % 4])  # every member starts from its group leader's x_0
    assert not torch.equal(x0[0], x0[4])  # groups differ
    assert torch.equal(shared.latents[[0, 4]], own.latents[[0, 4]])  # leaders: the plain trajectory
    assert not torch.equal(shared.latents[1, 1:], shared.latents[0, 1:])  # members' SDE noise is their own
    # on the second process of two, global samples 4..7 get the same start as on one process
    second = context.rollout(prompts[4:], 1, 4, sampler, shared_noise_group=4)
    assert torch.equal(second.latents[:, 0], shared.latents[4:, 0])  # the same starting noise, exactly
    # the steps after it: batches of 4 and 8 may use different CPU kernels (AVX-512 hosts), so last bits differ
    torch.testing.assert_close(second.latents, shared.latents[4:], rtol=0, atol=1e-5)


def sd3_time_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """DanceGRPO's schedule (fastvideo/train_grpo_flux.py:127-128 at 15cc71d)."""
    return (shift * t) / (1 + (shift - 1) * t)


def test_static_shift_reproduces_dancegrpos_sigma_schedule(tiny_dir, quiet_libraries):
    """FLUX at a static shift 3 (its own shift depends on the resolution) samples DanceGRPO's sigmas."""
    from vialign.config import ModelConfig
    from vialign.sample import load_model

    adapter = load_model(ModelConfig(path=tiny_dir("flux"), scheduler={"shift": 3.0}), device="cpu")
    expected = sd3_time_shift(3.0, torch.linspace(1, 0, 17))
    for size in (32, 64):  # a static shift: the same whatever the resolution
        schedule = adapter.schedule(16, size, size)
        torch.testing.assert_close(schedule.sigmas, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(schedule.timesteps, expected[:-1] * 1000, rtol=0, atol=1e-3)
    plain = load_model(ModelConfig(path=tiny_dir("flux")), device="cpu")
    assert not torch.allclose(plain.schedule(16, 64, 64).sigmas, expected, atol=1e-3)  # FLUX's own shift


def test_static_shift_on_sd3_equals_diffusers(tiny_dir, quiet_libraries):
    """SD3 keeps its stock spacing (linspace of training timesteps); the shift is the scheduler's own."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vialign.config import ModelConfig
    from vialign.sample import load_model

    adapter = load_model(ModelConfig(path=tiny_dir("sd3"), scheduler={"shift": 5.0}), device="cpu")
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(
        tiny_dir("sd3"), subfolder="scheduler", shift=5.0
    )
    reference.set_timesteps(10)
    torch.testing.assert_close(
        adapter.schedule(10, 32, 32).sigmas, reference.sigmas.float(), rtol=0, atol=1e-7
    )


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red square\na photo of a cat on a sofa\ntwo dogs\nan astronaut riding a horse\n")
    return str(path)


def test_diffusion_schedule_overrides_equal_diffusers(tiny_dir, quiet_libraries):
    """soc-fine-tuning-sd's schedule: betas 0.002-0.009 (scaled_linear) and trailing spacing, against a
    DDIMScheduler built by diffusers with the same changes."""
    from diffusers import DDIMScheduler

    from vialign.config import ModelConfig
    from vialign.errors import ConfigError
    from vialign.sample import load_model

    changes = {"beta_start": 0.002, "beta_end": 0.009, "timestep_spacing": "trailing"}
    adapter = load_model(ModelConfig(path=tiny_dir("sd"), scheduler=changes), device="cpu")
    reference = DDIMScheduler.from_pretrained(tiny_dir("sd"), subfolder="scheduler", **changes)
    reference.set_timesteps(50)
    schedule = adapter.schedule(50, 32, 32)
    assert schedule.timesteps.tolist() == reference.timesteps.float().tolist()
    assert schedule.timesteps[:3].tolist() == [999.0, 979.0, 959.0]
    bars = reference.alphas_cumprod[reference.timesteps]
    torch.testing.assert_close(schedule.alphas[:-1] ** 2, bars, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="shift does not apply"):
        load_model(ModelConfig(path=tiny_dir("sd"), scheduler={"shift": 3.0}), device="cpu")
    with pytest.raises(ConfigError, match="beta_start does not apply"):
        load_model(ModelConfig(path=tiny_dir("sd3"), scheduler={"beta_start": 0.001}), device="cpu")
    with pytest.raises(Exception, match="beta_end"):
        ModelConfig(scheduler={"beta_start": 0.01, "beta_end": 0.002})


def test_prompt_dropout_rate_and_processes(tmp_path, prompt_file):
    from vialign.algorithms.base import drop_prompts

    prompts = [f"p{i}" for i in range(20_000)]
    dropped = drop_prompts(prompts, 0.2, seed=3)
    rate = sum(p == "" for p in dropped) / len(prompts)
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(prompts))  # binomial, 4 standard errors
    assert dropped == drop_prompts(prompts, 0.2, seed=3) != drop_prompts(prompts, 0.2, seed=4)
    assert all(d in ("", p) for d, p in zip(dropped, prompts))


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    ["grpo", "draft", "alignprop", "refl", "adjoint_matching", "dpo", "online_dpo", "raft", "rwr"],
)
def test_warmup_applies_to_every_algorithm(algorithm, tmp_path, tiny_dir, prompt_file, quiet_libraries):
    """optim.warmup_steps: the learning rate of training step s is lr * s / warmup, for every algorithm
    (Adjoint Matching's 20 warm-up updates in soc-fine-tuning-sd)."""
    from train_two_steps import SETTINGS, regularizer_images

    from vialign.trainer import Trainer

    regularizer_images(tmp_path / "images")
    settings = SETTINGS.get(algorithm, ["alignprop.prompts_per_step=2", "alignprop.micro_batch_size=2"])
    extra = {"dpo": [f"data.train={tmp_path / 'images' / 'preferences.jsonl'}", "rewards={}"]}.get(
        algorithm, []
    )
    extra += {"refl": [f"refl.regularizer_data={tmp_path / 'images' / 'pairs.jsonl'}"]}.get(algorithm, [])
    config = load_config(
        TrainConfig,
        None,
        [
            f"algorithm={algorithm}",
            f"model.path={tiny_dir('sd3')}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompt_file}",
            "data.eval=null",
            "rewards={brightness: {}}",
            "finetune.lora_rank=4",
            "optim.lr=1e-3",
            "optim.warmup_steps=4",
            "sampler.num_steps=3",
            "sampler.height=32",
            "sampler.width=32",
            "train.max_steps=10",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
            *[s for s in SETTINGS.get(algorithm, []) if "kl" not in s],
            *(settings if algorithm == "alignprop" else []),
            *extra,
        ],
    )
    trainer = Trainer(config, progress=False)
    for step in (1, 2):
        trainer.algorithm.step(step)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * step / 4, rel=1e-12)


def test_dancegrpo_steps_rule():
    """fastvideo/train_grpo_flux.py:512-572 at 15cc71d: of 16 steps the last is never trained; each sample
    trains int(15 x 0.6) = 9 of the other 15, drawn per sample, uniformly."""
    from vialign.algorithms.grpo import trained_steps

    counts = torch.zeros(16)
    draws = [
        trained_steps(range(16), mode="dance", fraction=0.6, generator=torch.Generator().manual_seed(i))
        for i in range(3000)
    ]
    for steps in draws:
        assert len(steps) == 9 == len(set(steps)) and 15 not in steps
        counts[steps] += 1
    assert len({tuple(s) for s in draws}) > 2000  # per sample, not one choice
    frequency = counts[:15] / len(draws)  # each step is trained with probability 9/15 = 0.6
    assert (frequency - 0.6).abs().max() < 4 * math.sqrt(0.6 * 0.4 / len(draws))


def test_dance_steps_are_per_sample_and_agree_across_processes(
    tmp_path, tiny_dir, prompt_file, quiet_libraries
):
    from vialign.trainer import Trainer

    config = small_grpo(
        tmp_path,
        tiny_dir("sd3"),
        prompt_file,
        "grpo.train_steps=dance",
        "grpo.step_fraction=0.6",
        "sampler.num_steps=8",
    )
    algorithm = Trainer(config, progress=False).algorithm
    stochastic = list(range(8))
    everything = algorithm.steps_to_train(3, stochastic, 0, 8)
    assert len({tuple(s) for s in everything}) > 1 and all(
        len(s) == int(7 * 0.6) and 7 not in s for s in everything
    )
    assert algorithm.steps_to_train(3, stochastic, 4, 8) == everything[4:]  # process 2 of 2 agrees


def test_ema_warmup_equals_diffusers_ema_model_and_ema_every():
    from diffusers.training_utils import EMAModel

    from vialign.trainer import ema_decay

    param = torch.nn.Parameter(torch.zeros(3))
    reference = EMAModel([param], decay=0.9999)
    ours = param.detach().clone()
    for update in range(1, 30):
        with torch.no_grad():
            param.add_(torch.tensor([1.0, -2.0, 0.5]) * update)
        reference.step([param])
        d = ema_decay(update, 0.9999, warmup=True)
        ours = d * ours + (1 - d) * param.detach()
        torch.testing.assert_close(ours, reference.shadow_params[0], rtol=1e-6, atol=1e-6)
    assert ema_decay(7, 0.9, warmup=False) == 0.9 and ema_decay(1000, 0.9, warmup=True) == 0.9


def test_ema_every_n_updates(tmp_path, tiny_dir, prompt_file, quiet_libraries):
    """finetune.ema_every=2: the average moves at updates 2, 4, ... only (Flow-GRPO: every 8)."""
    from vialign.trainer import Trainer

    config = small_grpo(
        tmp_path,
        tiny_dir("sd3"),
        prompt_file,
        "grpo.updates_per_round=2",
        "finetune.ema_decay=0.5",
        "finetune.ema_every=2",
        "train.max_steps=2",
    )
    trainer = Trainer(config, progress=False)
    start = [e.clone() for e in trainer.ema]
    trainer.algorithm.step(1)  # updates 1 and 2: one EMA update, after the second
    after_first = [p.detach().float().clone() for p in trainer.trainable]
    lora = [
        i
        for i, p in enumerate(trainer.trainable)
        if p.detach().abs().sum() > 0 and "lora_B" in trainer._trainable_names()[i]
    ]
    i = lora[0]
    torch.testing.assert_close(trainer.ema[i], 0.5 * start[i] + 0.5 * after_first[i])


def test_socs_loss_step_split():
    """am_trainer.py:204-225 at 489f904: 2 of 4 loss steps from the first round(0.6 x 50) = 30, 2 from
    the last 20, without replacement."""
    from vialign.algorithms.adjoint_matching import split_steps

    seen = set()
    for i in range(500):
        steps = split_steps(50, 4, 2, 0.6, torch.Generator().manual_seed(i))
        assert len(set(steps)) == 4 and sum(k < 30 for k in steps) == 2 and all(0 <= k < 50 for k in steps)
        seen.update(steps)
    assert seen == set(range(50))
    with pytest.raises(VialignInputError, match="early_timesteps"):
        split_steps(6, 4, 4, 0.5, torch.Generator())


# ----------------------------------------------------------------------------------------------- prompt data
def test_shipped_prompt_sets_are_the_anchors_files_byte_for_byte():
    from vialign.data import load_prompts
    from vialign.prompt_data import PROMPT_SETS, git_blob_id, prompt_file

    counts = {
        "simple_animals": 45,
        "pickscore_test": 2048,
        "geneval_test": 2212,
        "imagereward_benchmark": 100,
    }
    for name, entry in PROMPT_SETS.items():
        if entry.shipped:
            assert git_blob_id(prompt_file(name).read_bytes()) == entry.blob, name
            assert len(load_prompts(f"prompts:{name}")) == counts[name], name
    assert load_prompts("prompts:simple_animals")[:3] == ["cat", "dog", "horse"]


def test_prompt_sets_are_fetched_checked_and_named_when_missing(tmp_path, monkeypatch, capsys):
    from vialign.cli import main
    from vialign.data import load_prompts
    from vialign.prompt_data import PROMPT_SETS, PromptSet, git_blob_id

    monkeypatch.setenv("VIALIGN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(VialignInputError, match="vialign prompts get refl"):
        load_prompts("prompts:refl")
    rows = [{"text": "a cat", "image": "1"}, {"text": "a dog", "image": "2"}]
    good = tmp_path / "refl_data.json"
    good.write_text(json.dumps(rows))
    entry = PROMPT_SETS["refl"]
    monkeypatch.setitem(
        PROMPT_SETS, "refl", PromptSet(**{**entry.__dict__, "blob": git_blob_id(good.read_bytes())})
    )
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(rows[:1]))
    assert main(["prompts", "get", "refl", "--url", bad.as_uri()]) == 2
    assert "not the file the recipe used" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "prompts" / "refl.json").exists()  # nothing half-written
    assert main(["prompts", "get", "refl", "--url", good.as_uri()]) == 0
    assert load_prompts("prompts:refl") == ["a cat", "a dog"]
    assert main(["prompts", "list"]) == 0
    listing = capsys.readouterr().out
    assert "prompts:refl" in listing and "fetched" in listing and "prompts:pickscore_train" in listing
    with pytest.raises(VialignInputError, match="unknown prompt set"):
        load_prompts("prompts:nope")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"caption": "x"}]))
    with pytest.raises(VialignInputError, match="element 0 has no string 'text' field"):
        load_prompts(str(broken), "text")


def test_dancegrpo_prompt_rule():
    from vialign.prompt_data import PROMPT_SETS, select_prompts

    lines = ["a cat", "\u4e00\u53ea\u732b", "a dog"] + [f"p{i}" for i in range(60_000)]
    kept = select_prompts(PROMPT_SETS["hpdv2"], lines)
    assert kept[:2] == ["a cat", "a dog"] and len(kept) == 50_000


# ----------------------------------------------------------------------------------------------- DPO knobs
def online_dpo_config(tmp_path, model, prompt_file, *extra: str) -> TrainConfig:
    settings = [
        "algorithm=online_dpo",
        "online_dpo.beta=100",
        "online_dpo.samples_per_prompt=2",
        "online_dpo.pairs_per_step=2",
        "online_dpo.micro_batch_size=1",
    ]
    return tiny_run(
        tmp_path, model, prompt_file, "sampler.num_steps=3", "train.max_steps=4", *settings, *extra
    )


def recorded_rollouts(trainer) -> list[torch.Tensor]:
    finals, original = [], trainer.algorithm.context.rollout

    def rollout(*args, **kwargs):
        trajectory = original(*args, **kwargs)
        finals.append(trajectory.final.clone())
        return trajectory

    trainer.algorithm.context.rollout = rollout
    return finals


def test_online_dpo_samples_from_the_reference_and_refreshes_it(
    tmp_path, tiny_dir, prompt_file, quiet_libraries
):
    """flow_grpo's DPO: pairs from the reference's samples (the initial model until refreshed), the
    reference replaced by the policy every N steps, and kept through a checkpoint."""
    from vialign.trainer import Trainer

    model = tiny_dir("sd3")
    config = online_dpo_config(
        tmp_path / "ref",
        model,
        prompt_file,
        "online_dpo.rollout_model=reference",
        "online_dpo.reference_update_every=2",
        "online_dpo.noise_level=0.7",
        "train.checkpoint_every=2",
    )
    trainer = Trainer(config, progress=False)
    finals = recorded_rollouts(trainer)
    trainer.algorithm.step(1)
    trainer.algorithm.step(2)  # weights moved at step 1; step 2 still samples the initial model
    policy = Trainer(
        online_dpo_config(tmp_path / "policy", model, prompt_file, "online_dpo.noise_level=0.7"),
        progress=False,
    )
    policy_finals = recorded_rollouts(policy)
    for step in (1, 2):
        policy.algorithm.step(step)
    assert len(finals) == len(policy_finals) == 4  # two rollout calls (one group each) per step
    assert all(
        torch.equal(a, b) for a, b in zip(finals[:2], policy_finals[:2])
    )  # step 1: both the initial model
    assert not torch.equal(finals[2], policy_finals[2])  # step 2: the policy has moved, the reference not
    assert trainer.reference_snapshot is None
    after_two = [p.detach().clone() for p in trainer.trainable]
    trainer.save_checkpoint(2)
    trainer.algorithm.step(3)  # (3 - 1) % 2 == 0: the reference becomes the policy of step 2's end
    assert all(torch.equal(a, b) for a, b in zip(trainer.reference_snapshot, after_two))
    trainer.save_checkpoint(3)
    resumed = Trainer(config, resume=True, progress=False)
    assert resumed.start_step == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed.reference_snapshot, after_two))
    with resumed.reference():  # the snapshot stands in for the weights inside, the trained ones after
        assert all(torch.equal(p, b) for p, b in zip(resumed.trainable, after_two))
    assert not all(torch.equal(p, b) for p, b in zip(resumed.trainable, after_two))


def test_dpo_shifted_logit_normal_timesteps(tiny_dir, quiet_libraries):
    """flow_grpo's DPO draws sigma from the scheduler's shifted sigmas: s t / (1 + (s - 1) t), t logit-normal."""
    from vialign.algorithms.dpo import DPOSettings, dpo_timesteps
    from vialign.config import ModelConfig
    from vialign.sample import load_model

    adapter = load_model(ModelConfig(path=tiny_dir("sd3"), scheduler={"shift": 3.0}), device="cpu")
    plain = dpo_timesteps(adapter, 1000, DPOSettings(beta=1), torch.Generator().manual_seed(0)) / 1000
    shifted = dpo_timesteps(
        adapter, 1000, DPOSettings(beta=1, shift_timesteps=True), torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(shifted / 1000, 3 * plain / (1 + 2 * plain))
    u = torch.logit(plain.double())
    assert abs(float(u.mean())) < 4 / math.sqrt(1000) and abs(float(u.std()) - 1) < 0.1  # logit-normal(0, 1)


def test_dpo_prompt_dropout_and_draws_per_pair(tmp_path, tiny_dir, quiet_libraries):
    """Diffusion-DPO's proportion_empty_prompts drops the pairs' prompts (seeded per step, the same on every
    process); draws_per_pair averages the loss over several (noise, t) draws in one update."""
    from train_two_steps import regularizer_images

    from vialign.algorithms.base import PROMPT_DROPOUT_STREAM, drop_prompts
    from vialign.seeds import mix_seed
    from vialign.trainer import Trainer

    regularizer_images(tmp_path / "images")
    config = load_config(
        TrainConfig,
        None,
        [
            "algorithm=dpo",
            f"model.path={tiny_dir('sd3')}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={tmp_path / 'images' / 'preferences.jsonl'}",
            "data.eval=null",
            "data.prompt_dropout=0.5",
            "rewards={}",
            "finetune.lora_rank=4",
            "sampler.height=32",
            "sampler.width=32",
            "dpo.beta=100",
            "dpo.pairs_per_step=4",
            "dpo.micro_batch_size=2",
            "dpo.draws_per_pair=3",
            "train.tensorboard=false",
        ],
    )
    trainer = Trainer(config, progress=False)
    seen = []
    original = trainer.algorithm.dpo_update
    trainer.algorithm.dpo_update = lambda step, prompts, *rest: (
        seen.append(prompts) or original(step, prompts, *rest)
    )
    from vialign.data import prompts_for_step

    latents = trainer.algorithm.latents
    indices = prompts_for_step(range(len(latents.prompts)), 1, 4, config.seed)
    metrics = trainer.algorithm.step(1)
    expected = drop_prompts(
        [latents.prompts[i] for i in indices], 0.5, mix_seed(config.seed, 1, PROMPT_DROPOUT_STREAM)
    )
    assert seen[0] == expected and "" in expected
    assert trainer.optimizer_updates == 1 and math.isfinite(metrics["loss"])


def test_adafactor_is_diffusion_dpos_sdxl_optimizer_and_resumes(
    tmp_path, tiny_dir, prompt_file, quiet_libraries
):
    """optim.optimizer=adafactor: transformers' Adafactor as Diffusion-DPO builds it for SDXL (fixed lr, no
    relative step or parameter scaling, update clip 1, weight decay), and its state survives a checkpoint."""
    from transformers.optimization import Adafactor

    from vialign.checkpoint import optimizer_from_flat, optimizer_to_flat
    from vialign.trainer import Trainer

    config = small_grpo(
        tmp_path, tiny_dir("sd3"), prompt_file, "optim.optimizer=adafactor", "optim.weight_decay=0.01"
    )
    trainer = Trainer(config, progress=False)
    optimizer = trainer.optimizer
    assert isinstance(optimizer, Adafactor)
    group = optimizer.param_groups[0]
    assert (
        group["relative_step"],
        group["scale_parameter"],
        group["clip_threshold"],
        group["weight_decay"],
    ) == (
        False,
        False,
        1.0,
        0.01,
    )
    trainer.algorithm.step(1)
    tensors, meta = optimizer_to_flat(optimizer)
    fresh = Trainer(
        small_grpo(tmp_path / "b", tiny_dir("sd3"), prompt_file, "optim.optimizer=adafactor"), progress=False
    )
    optimizer_from_flat(fresh.optimizer, tensors, meta)
    again, _ = optimizer_to_flat(fresh.optimizer)
    assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)
