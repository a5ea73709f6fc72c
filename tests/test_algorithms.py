"""The algorithm boundary: a new algorithm is one file plus a preset; the import graph has no cycles;
algorithms see a TrainingContext, never the trainer; full fine-tuning keeps a frozen reference."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from pydantic import Field

import vialign.algorithms.base as base
from vialign.algorithms import Algorithm, TrainingContext, register
from vialign.config import TrainConfig, load_config
from vialign.errors import ConfigError
from vialign.schema import StrictModel

ROOT = Path(__file__).parents[1]


class ShrinkSettings(StrictModel):
    target: float = Field(0.0, description="the denoiser output is pulled towards this value")
    batch: int = Field(2, ge=1, description="latents per step")


class ShrinkOutput(Algorithm):
    """A toy algorithm written in a test module: pull the denoiser's output on fixed noise towards a
    constant. It needs no reward and no reference model."""

    name = "shrink_output"
    Settings = ShrinkSettings
    reward = "none"

    def step(self, step: int) -> dict[str, float]:
        context = self.context
        adapter = context.adapter
        generator = torch.Generator().manual_seed(context.seed)  # the same input every step
        x = torch.randn(
            self.settings.batch, *adapter.latent_shape(context.height, context.width), generator=generator
        )
        schedule = context.schedule
        with torch.no_grad():
            cond = adapter.encode_prompt(context.prompts[: self.settings.batch])
        with context.train_mode():
            output = adapter.predict(x, schedule.timesteps[0], cond)
            loss = (output.float() - self.settings.target).square().mean()
            context.backward(loss)
            grad_norm = context.optimizer_step(step)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}


@pytest.fixture
def toy_registry(monkeypatch):
    """Register the toy algorithm for one test only."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register(ShrinkOutput)


def test_an_algorithm_from_a_test_module_runs_through_vialign_train(
    tmp_path, tiny_dir, toy_registry, quiet_libraries
):
    from vialign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    preset = tmp_path / "shrink.yaml"
    preset.write_text(
        f"algorithm: shrink_output\nmodel: {{path: {tiny_dir('sd3')}}}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {prompts}, eval: null}}\nrewards: {{}}\nfinetune: {{lora_rank: 4}}\n"
        "optim: {lr: 0.01}\nsampler: {height: 32, width: 32, num_steps: 4}\n"
        "shrink_output: {target: 0.0, batch: 2}\n"
        "train: {max_steps: 3, eval_every: 0, checkpoint_every: 2, tensorboard: false}\n"
    )
    assert main(["train", str(preset)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]  # lr 0.01 on the output's square: it shrinks
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2" / "state.json").exists()
    # its settings are validated like a built-in's
    with pytest.raises(ConfigError, match="shrink_output.batch: Input should be greater than or equal to 1"):
        load_config(TrainConfig, preset, ["shrink_output.batch=0"])
    with pytest.raises(ConfigError, match="shrink_output.nonsense: unknown key"):
        load_config(TrainConfig, preset, ["shrink_output.nonsense=1"])


def test_an_algorithm_that_needs_a_reward_gets_one(toy_registry):
    with pytest.raises(ConfigError, match="rewards: at least one training reward is needed"):
        load_config(TrainConfig, None, ["algorithm=grpo", "rewards={}"])
    assert load_config(TrainConfig, None, ["algorithm=shrink_output", "rewards={}"]).rewards == {}
    with pytest.raises(
        ConfigError, match="algorithm: unknown algorithm 'nope'; choose one of .*shrink_output"
    ):
        load_config(TrainConfig, None, ["algorithm=nope"])


def test_a_pair_algorithm_on_prompt_data_is_refused(tmp_path, tiny_dir, toy_registry):
    from vialign.errors import VialignInputError
    from vialign.trainer import Trainer

    class PairwiseShrink(ShrinkOutput):
        name = "pairwise_shrink"
        data = "preference_pairs"

    register(PairwiseShrink)
    config = load_config(
        TrainConfig, None, ["algorithm=pairwise_shrink", "rewards={}", f"output_dir={tmp_path / 'run'}"]
    )
    # the trainer loads pairs for it from data.train, and a prompt set there is named as the mistake
    with pytest.raises(
        VialignInputError,
        match="shapeworld:align is a prompt set, and this algorithm trains on preference pairs",
    ):
        Trainer(config, progress=False)


def test_register_rejects_malformed_algorithms(toy_registry):
    class NoSettings(Algorithm):
        name = "no_settings"

    with pytest.raises(ValueError, match="Settings must be"):
        register(NoSettings)

    class Clash(ShrinkOutput):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Clash)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """First-party modules ``path`` imports anywhere in the file (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known and name != module}


def test_import_graph():
    """vialign has no import cycle, counting imports inside functions; algorithms never import the trainer
    or the config; rewards and pipelines never import vialign."""
    files = {}
    for package in ("vialign", "rewards", "pipelines"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    graph = {name: _imports(path, name, set(files)) for name, path in files.items()}
    for name, imported in graph.items():
        if name.startswith(("rewards", "pipelines")):
            assert not {m for m in imported if m.startswith("vialign")}, name
        if name.startswith("vialign.algorithms"):
            assert not imported & {"vialign.trainer", "vialign.config", "vialign.cli"}, name

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, nxt]
                if nxt not in seen and nxt.startswith("vialign"):
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [cycle for name in graph if name.startswith("vialign") and (cycle := cycle_from(name))]
    assert not cycles, cycles[0]


def test_algorithms_get_a_context_not_the_trainer(tmp_path, tiny_dir, quiet_libraries):
    from vialign.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    for algorithm in ("grpo", "draft", "alignprop", "refl", "adjoint_matching"):
        config = load_config(
            TrainConfig,
            None,
            [
                f"algorithm={algorithm}",
                f"model.path={tiny_dir('sd')}",
                f"output_dir={tmp_path / algorithm}",
                f"data.train={prompts}",
                "data.eval=null",
                "rewards={brightness: {}}",
                "sampler.num_steps=3",
                "train.tensorboard=false",
            ],
        )
        trainer = Trainer(config, progress=False)
        assert isinstance(trainer.algorithm.context, TrainingContext)
        assert not any(value is trainer for value in vars(trainer.algorithm).values())


def test_full_fine_tuning_keeps_a_frozen_reference_and_exports_a_pipeline(
    tmp_path, tiny_dir, quiet_libraries
):
    """finetune.method=full with GRPO's KL: a frozen copy is the reference (KL 0 at step 1, > 0 after),
    every denoiser weight trains, and the export is a pipeline folder that diffusers loads."""
    from diffusers import StableDiffusion3Pipeline

    from vialign.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    config = load_config(
        TrainConfig,
        None,
        [
            f"model.path={tiny_dir('sd3')}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts}",
            "data.eval=null",
            "rewards={brightness: {}}",
            "finetune.method=full",
            "optim.lr=1e-3",
            "sampler.num_steps=3",
            "sampler.height=32",
            "sampler.width=32",
            "grpo.group_size=2",
            "grpo.prompts_per_step=2",
            "grpo.micro_batch_size=4",
            "grpo.clip_range=0.2",
            "grpo.kl_beta=1.0",
            "train.max_steps=2",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
        ],
    )
    trainer = Trainer(config, progress=False)
    denoiser = trainer.adapter.unwrapped_denoiser
    initial = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    assert len(trainer.trainable) == len(initial)
    first, second = trainer.algorithm.step(1), trainer.algorithm.step(2)
    assert first["kl"] == 0.0 and second["kl"] > 0
    reference = dict(trainer.reference_denoiser.named_parameters())
    assert all(torch.equal(reference[n], value) for n, value in initial.items())  # frozen
    assert not all(torch.equal(p, initial[n]) for n, p in denoiser.named_parameters())  # trained
    final = trainer.export()
    pipe = StableDiffusion3Pipeline.from_pretrained(final)
    for name, param in pipe.transformer.named_parameters():
        torch.testing.assert_close(param, dict(denoiser.named_parameters())[name], rtol=0, atol=0)
