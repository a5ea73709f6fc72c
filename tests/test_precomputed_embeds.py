"""``model.prompt_embeds``: training from precomputed prompt embeddings, without text encoders.

A run reading its prompts' embeddings from a file written by ``vialign precompute-embeds`` must train
exactly as the run that encodes them (same metrics, same LoRA), never load a text encoder or tokenizer
(its parameters shrink by exactly theirs), and refuse to start when the file lacks a prompt it needs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pipelines
from pipelines.errors import PipelineInputError
from pipelines.loading import text_component_names
from vialign.cli import main
from vialign.config import TrainConfig, load_config
from vialign.errors import ConfigError
from vialign.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from train_two_steps import COMMON, SETTINGS, regularizer_images  # noqa: E402

TRAIN = ["a red square", "a blue circle", "a green triangle", "a white star"]
HELD_OUT = ["a yellow square", "a red circle"]
REGRESSION = ["a blue star"]
# ReFL with CFG (the empty prompt) and captioned images; GRPO with FLUX's guidance embedding
CASES = {"sd3": "refl", "flux": "grpo"}


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_config(tmp_path: Path, family: str, model: str) -> Path:
    """A two-step run on ``model`` that evaluates (held-out and regression prompts) at its start and end."""
    algorithm = CASES[family]
    overrides = [
        f"algorithm={algorithm}",
        f"model.path={model}",
        "model.device=cpu",
        f"data.train={write_lines(tmp_path / 'train.txt', TRAIN)}",
        *[o for o in COMMON if not o.startswith(("data.eval", "train.eval_every"))],
        *SETTINGS[algorithm],
        f"data.eval={write_lines(tmp_path / 'eval.txt', HELD_OUT)}",
        f"eval.regression_prompts={write_lines(tmp_path / 'regression.txt', REGRESSION)}",
        "train.eval_every=2",
        "eval.samples_per_prompt=2",
        "eval.regression_samples_per_prompt=1",
        "eval.num_steps=2",
    ]
    if algorithm == "refl":
        overrides.append(f"refl.regularizer_data={regularizer_images(tmp_path / 'images')}")
    config = load_config(TrainConfig, None, overrides)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    return path


def parameter_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def metric_rows(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CASES))
def test_precomputed_embeddings_train_exactly_as_encoding_and_load_no_text_encoder(
    tmp_path, tiny_dir, family, monkeypatch, capsys, quiet_libraries
):
    config_file = write_config(tmp_path, family, tiny_dir(family))
    encoding = Trainer(
        load_config(TrainConfig, config_file, [f"output_dir={tmp_path / 'encoding'}"]), progress=False
    )
    encoding.train()

    embeds = tmp_path / "embeds" / "prompts.safetensors"
    assert main(["precompute-embeds", "--config", str(config_file), "--out", str(embeds)]) == 0
    assert f"wrote {embeds}: " in capsys.readouterr().out
    stored = json.loads(__import__("safetensors").safe_open(str(embeds), "pt").metadata()["prompts"])
    captions = [f"image {i}" for i in range(4)] if CASES[family] == "refl" else []
    assert sorted(stored) == sorted(["", *TRAIN, *HELD_OUT, *REGRESSION, *captions])

    cls = type(encoding.adapter)

    def no_encoding(self, prompts):
        raise AssertionError(f"a text encoder was called for {prompts}")

    monkeypatch.setattr(cls, "_encode_prompts", no_encoding)
    calls = []
    original = cls.pipeline_class.from_pretrained.__func__
    monkeypatch.setattr(
        cls.pipeline_class,
        "from_pretrained",
        classmethod(lambda klass, *a, **kw: calls.append(kw) or original(klass, *a, **kw)),
    )
    overrides = [f"output_dir={tmp_path / 'precomputed'}", f"model.prompt_embeds={embeds}"]
    precomputed = Trainer(load_config(TrainConfig, config_file, overrides), progress=False)
    precomputed.train()

    # never loaded: every text encoder and tokenizer was passed to from_pretrained as None
    names = text_component_names(cls)
    assert [kw for kw in calls if not all(n in kw and kw[n] is None for n in names)] == []
    assert not precomputed.adapter.has_text_encoders
    assert not any(n in precomputed.adapter.components for n in names)

    # the same run: metrics (evaluation rows too) and the exported LoRA
    assert metric_rows(tmp_path / "precomputed") == metric_rows(tmp_path / "encoding")
    assert len(metric_rows(tmp_path / "encoding")) == 4  # eval at 0, steps 1 and 2, eval at 2
    lora = [
        load_file(tmp_path / run / "final" / "pytorch_lora_weights.safetensors")
        for run in ("encoding", "precomputed")
    ]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])

    # the parameters in memory shrink by exactly the text encoders'
    text_bytes = parameter_bytes(m for n, m in encoding.adapter.modules().items() if n in cls.text_components)
    with_text = parameter_bytes(encoding.adapter.modules().values())
    without = parameter_bytes(precomputed.adapter.modules().values())
    assert text_bytes > 0 and with_text - without == text_bytes
    print(f"{family}: text encoders {text_bytes} bytes; model {with_text} -> {without} bytes")


def test_a_missing_prompt_is_refused_before_the_model_loads(
    tmp_path, tiny_dir, monkeypatch, capsys, quiet_libraries
):
    config_file = write_config(tmp_path, "sd3", tiny_dir("sd3"))
    embeds = tmp_path / "train-only.safetensors"
    train_file = str(tmp_path / "train.txt")
    assert (
        main(["precompute-embeds", "--model", tiny_dir("sd3"), "--prompts", train_file, "--out", str(embeds)])
        == 0
    )
    assert "5 prompts (5 encoded now, 0 kept from the file)" in capsys.readouterr().out  # with ""

    import vialign.sample

    loads = []
    monkeypatch.setattr(vialign.sample, "load_model", lambda *a, **kw: loads.append(a))
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.prompt_embeds={embeds}", "model.device=cpu"]
    with pytest.raises(ConfigError) as error:
        Trainer(load_config(TrainConfig, config_file, overrides))
    message = str(error.value)
    assert message.startswith(
        f"model.prompt_embeds: 7 of the 12 prompts this run encodes are not in {embeds} (e.g. 'image 0')"
    )
    assert "vialign precompute-embeds --config CONFIG" in message and loads == []
    assert main(["train", str(config_file), *overrides]) == 2
    assert capsys.readouterr().err.strip().endswith(message.splitlines()[-1])

    # the fix: the run's config extends the file with what is missing
    monkeypatch.undo()
    assert main(["precompute-embeds", "--config", str(config_file), f"model.prompt_embeds={embeds}"]) == 0
    assert "12 prompts (7 encoded now, 5 kept from the file)" in capsys.readouterr().out
    trainer = Trainer(load_config(TrainConfig, config_file, overrides))
    assert not trainer.adapter.has_text_encoders

    # the adapter's own guard, for prompts no check foresaw
    with pytest.raises(PipelineInputError, match="1 prompt.s. have no precomputed embedding, e.g. 'a cat'"):
        trainer.adapter.encode_prompt(["a red square", "a cat"])


def test_a_file_encoded_otherwise_is_refused(tmp_path, tiny_dir, quiet_libraries):
    adapter = pipelines.load_pipeline(tiny_dir("sd3"), device="cpu")
    path = tmp_path / "embeds.safetensors"
    adapter.precompute_prompt_embeds(["", "a red square"], path)
    for options, problem in [
        ({"dtype": "bfloat16"}, "dtype 'float32' (this model: 'bfloat16')"),
        ({"max_sequence_length": 8}, "max_sequence_length"),
        ({"use_t5": False}, "t5 True (this model: False)"),
    ]:
        other = pipelines.load_pipeline(tiny_dir("sd3"), device="cpu", text_encoders=False, **options)
        with pytest.raises(PipelineInputError, match=f"encoded with .*{re.escape(problem)}"):
            other.load_prompt_embeds(path)
    with pytest.raises(PipelineInputError, match="holds prompt embeddings of model"):
        pipelines.load_pipeline(tiny_dir("flux"), device="cpu", text_encoders=False).load_prompt_embeds(path)
    # another spelling of the same folder is the same model
    same = pipelines.load_pipeline(tiny_dir("sd3") + "/.", device="cpu", text_encoders=False)
    assert same.load_prompt_embeds(path) == 2
    row = same.encode_prompt(["a red square"])
    for name, tensor in adapter.encode_prompt(["a red square"]).items():
        assert torch.equal(row.tensors[name], tensor)


@pytest.mark.parametrize("model", ["sd3", "tiny-flux"])
def test_full_export_without_text_encoders_reads_them_again(tmp_path, tiny_dir, model, quiet_libraries):
    """finetune.method=full exports a whole pipeline: the text encoders it never loaded are read for it."""
    source = tiny_dir(model) if not model.startswith("tiny-") else model
    adapter = pipelines.load_pipeline(source, device="cpu", text_encoders=False)
    assert not adapter.has_text_encoders and adapter.omitted_components
    adapter.save_pipeline(tmp_path / "full")
    exported = pipelines.load_pipeline(str(tmp_path / "full"), device="cpu")
    original = pipelines.load_pipeline(source, device="cpu")
    for name, tensor in original.encode_prompt(["a red square"]).items():
        assert torch.equal(exported.encode_prompt(["a red square"]).tensors[name], tensor)


def test_a_folder_of_files_is_written_a_file_at_a_time_and_extended(
    tmp_path, tiny_dir, capsys, quiet_libraries
):
    """``--out`` not ending in .safetensors: a folder of files of at most shard_size prompts; extending it
    writes new files only, and a model without text encoders reads the folder as one file."""
    adapter = pipelines.load_pipeline(tiny_dir("flux"), device="cpu")
    folder = tmp_path / "embeds"
    assert adapter.precompute_prompt_embeds(["", *TRAIN], folder, shard_size=2) == 5
    first = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert sorted(first) == [f"prompts-0000{i}.safetensors" for i in range(3)]
    assert adapter.precompute_prompt_embeds([*TRAIN, *HELD_OUT], folder, shard_size=2) == 6
    assert len(list(folder.iterdir())) == 4 and all((folder / n).read_bytes() == b for n, b in first.items())

    reader = pipelines.load_pipeline(tiny_dir("flux"), device="cpu", text_encoders=False)
    assert reader.load_prompt_embeds(folder) == 7
    prompts = ["", *HELD_OUT, *TRAIN]
    rows, encoded = reader.encode_prompt(prompts), adapter.encode_prompt(prompts)
    assert all(torch.equal(rows.tensors[n], t) for n, t in encoded.items())

    # the command: a folder of another model is not extended
    argv = ["precompute-embeds", "--model", tiny_dir("sd3"), "--prompt", "a cat", "--out", str(folder)]
    assert main(argv) == 2
    assert "cannot be extended" in capsys.readouterr().err
    argv[2] = tiny_dir("flux")
    assert main(argv) == 0
    assert "8 prompts (1 encoded now, 7 kept from the file)" in capsys.readouterr().out
