"""Typed configs: every preset validates; unknown keys, wrong types, out-of-range values and malformed
YAML are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vialign.config import EvalConfig, SampleConfig, TrainConfig, load_config, parse_override
from vialign.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# vialign's own configs; configs/accelerate/ holds accelerate's launch files (tests/test_fsdp.py checks them)
CONFIG_FILES = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name != "accelerate")
SCHEMAS = {"sample": SampleConfig, "eval": EvalConfig}


def test_every_config_file_is_checked():
    on_disk = [
        p for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.parent.name != "accelerate"
    ]
    assert len(CONFIG_FILES) == len(on_disk) >= 5


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_file_validates(path):
    schema = SCHEMAS.get(path.stem.split("_")[0], TrainConfig)  # everything else is a training preset
    config = load_config(schema, path)
    assert config.model.path
    if config.model.path.startswith("tiny-") or config.model.path.startswith("shapeworld"):
        from pipelines import builtin_models

        assert config.model.path in builtin_models()


def test_defaults_and_overrides():
    config = load_config(
        SampleConfig,
        CONFIG_DIR / "sample_tiny.yaml",
        [
            "sampler.num_steps=3",
            "sampler.kind=sde",
            "sampler.sde_window=[0, 2]",
            "model.dtype=bfloat16",
            "prompts=[a, b, c]",
            "sampler.negative_prompt=blurry: ugly",
        ],
    )
    assert config.sampler.num_steps == 3 and config.sampler.kind == "sde"
    assert config.sampler.sde_window == (0, 2) and config.model.dtype == "bfloat16"
    assert config.prompts == ["a", "b", "c"]
    assert config.sampler.negative_prompt == "blurry: ugly"
    assert config.seed == 0  # from the file


def test_flags_then_overrides_precedence():
    config = load_config(SampleConfig, None, ["seed=7"], {"seed": "5", "sampler.num_steps": "9"})
    assert config.seed == 7 and config.sampler.num_steps == 9


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "sampler.num_stepz=3",
            "sampler.num_stepz: unknown key; allowed keys here: guidance_scale, kind, negative_prompt",
        ),
        ("modle.path=x", "modle: unknown key; allowed keys here: batch_size, fps, height, model"),
        ("sampler.num_steps=0", "sampler.num_steps: Input should be greater than or equal to 1 (got 0)"),
        ("sampler.num_steps=ten", "sampler.num_steps: Input should be a valid integer"),
        ("sampler.kind=langevin", "sampler.kind: Input should be 'ode' or 'sde' (got 'langevin')"),
        (
            "sampler.sde_kind=euler",
            "sampler.sde_kind: Input should be 'ddim', 'flow-sde', 'dance-sde' or 'cps'",
        ),
        ("model.dtype=int8", "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ("model.device=gpu", "model.device: must be auto, cpu, cuda, cuda:N or mps"),
        ("sampler.sde_window=[3, 1]", "sampler.sde_window: must be [start, stop) with 0 <= start < stop"),
        ("height=-64", "height: Input should be greater than or equal to 8"),
        ("seed.x=1", "seed: Input should be a valid integer (got {'x': 1})"),
        ("num_steps", "not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(SampleConfig, None, [override])
    assert message in str(error.value)


def test_sde_options_without_sde_are_an_error():
    with pytest.raises(ConfigError, match="sde_kind, noise_level only apply to kind=sde"):
        load_config(SampleConfig, None, ["sampler.sde_kind=cps", "sampler.noise_level=0.5"])
    assert (
        load_config(SampleConfig, None, ["sampler.sde_kind=cps", "sampler.kind=sde"]).sampler.sde_kind
        == "cps"
    )


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(SampleConfig, None, ["seed=3", "seed.x=1"])


def test_flag_names_appear_in_messages():
    with pytest.raises(ConfigError, match=r"sampler.num_steps \(--num-steps\)"):
        load_config(
            SampleConfig, None, values={"sampler.num_steps": "-1"}, flags={"sampler.num_steps": "--num-steps"}
        )


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: tiny-sd\nsampler: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+, column \d+"):
        load_config(SampleConfig, path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SampleConfig, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SampleConfig, tmp_path / "missing.yaml")


def test_parse_override_types():
    assert parse_override("a.b=20") == ("a.b", 20)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=a red cat") == ("a", "a red cat")
