"""Config fuzzing: bad input is refused with a message naming the key, never a traceback.

Configs: every preset in configs/ (sample_* for SampleConfig, eval_* for EvalConfig, the rest TrainConfig),
a ScoreConfig document (no score preset ships) and a full dump of each schema (every declared key, and the
section of every training algorithm) are mutated, deterministically (``random.Random`` with a fixed seed):
a leaf or list item replaced by a value of the wrong type or out of range (string, empty string, list,
mapping, None, bool, 10**30, -1, -1e30, 0, 1e30, 1.5, NaN, +-inf); an unknown key added at every level (a
typo of a key there, or a made-up name, ``base`` and ``include`` among them: presets have no includes); a
key or section deleted; a section replaced by a scalar or a list; a key moved into another section; the
whole document replaced by a non-mapping. About 3,600 mutations (>= 2,000 asserted). Each mutant is written
to a YAML file and loaded with ``load_config``, as the CLI does: it must validate, or raise
VialignInputError whose message names the mutated key (one line, or ``invalid config (...):`` and one
indented line per problem), never another exception. Unknown keys, strings for numbers, scalars for
sections and non-mapping documents must always be refused.

CLI: ``vialign.cli.main`` on about 500 mutated command lines of sample, score, eval and train (unknown
flags, flags without their value, wrong-typed and out-of-range flag values, malformed, unknown and
mistyped key=value overrides, bad --reward / --reward-option), with the jobs replaced by stubs: the argv
runs the job, or ends with status 2 and one ``vialign: error:`` message or an argparse usage error naming
the flag or key, never a traceback.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import random
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel

from vialign import cli
from vialign.algorithms import algorithm_names, get_algorithm
from vialign.config import EvalConfig, SampleConfig, ScoreConfig, TrainConfig, load_config
from vialign.errors import VialignInputError

SEED = 20250611
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))
SCHEMAS = {"sample": SampleConfig, "eval": EvalConfig}  # everything else is a training preset
SCORE_DOCUMENT = {  # no score preset ships: a document that uses every key of ScoreConfig
    "rewards": {
        "pickscore": {"weight": 1.0, "options": {"pretrained": "/models/pickscore"}},
        "aesthetic": {},
    },
    "images": ["samples/", "videos/*.mp4"],
    "prompts_from": "samples/samples.jsonl",
    "batch_size": 16,
    "out": "scores.csv",
    "frames": "uniform",
    "num_frames": 8,
    "max_frames": 64,
    "device": "cpu",
    "overwrite": False,
    "resume": False,
}
WRONG_VALUES = [
    "abc", "", [1, 2], {"x": 1}, None, True, 10**30, -1, -1e30, 0, 1e30, 1.5, math.nan, math.inf, -math.inf,
]  # fmt: skip
MADE_UP_KEYS = [
    "foo",
    "colour",
    "learning_rate",
    "num_step",
    "base",
    "include",
    "Model",
    "key with space",
    "ñ",
    7,
]
NOT_MAPPINGS = [[1, 2], "abc", 5, [{"model": {"path": "x"}}]]
# mutations kept per document and kind (drawn from all of that kind): ~95 per document, 38 documents
PER_KIND = {"type": 45, "unknown": 14, "delete": 10, "section": 10, "move": 12, "document": 4}

Path_ = tuple[Any, ...]


@dataclass
class Mutation:
    source: str
    schema: type[BaseModel]
    kind: str
    path: Path_
    change: str
    make: Callable[[], Any]  # the mutant document (built only for the mutations drawn)
    must_refuse: bool
    names: tuple[str, ...]  # the message of a refusal names one of these

    def __str__(self) -> str:
        where = ".".join(map(str, self.path)) or "<document>"
        return f"{self.source} [{self.schema.__name__}] {self.kind} {where}: {self.change}"


def schema_for(path: Path) -> type[BaseModel]:
    return SCHEMAS.get(path.stem.split("_")[0], TrainConfig)


def read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@functools.cache
def sources() -> list[tuple[str, type[BaseModel], dict[str, Any]]]:
    """(name, schema, document): the presets as written, a score document, and full dumps of each schema."""
    found = [(path.name, schema_for(path), read(path)) for path in PRESETS]
    found.append(("score document", ScoreConfig, SCORE_DOCUMENT))
    full: dict[str, Path] = {}
    for path in PRESETS:
        schema = schema_for(path)
        name = read(path).get("algorithm", "grpo") if schema is TrainConfig else schema.__name__
        full.setdefault(name, path)
    for path in full.values():
        dump = load_config(schema_for(path), path).model_dump(mode="json")
        found.append((f"{path.name} (full dump)", schema_for(path), dump))
    return found


# --- the schema: which type a node has -------------------------------------------------------------------


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), len(rest) < len(args)
    return annotation, False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def annotation_at(schema: type[BaseModel], path: Path_) -> Any:
    """The declared type of the node at ``path``; Any inside free mappings (reward options) or off-schema."""
    annotation: Any = schema
    for i, part in enumerate(path):
        annotation, _ = _strip_none(annotation)
        origin = typing.get_origin(annotation)
        if _is_model(annotation):
            if part in annotation.model_fields:
                annotation = annotation.model_fields[part].annotation
            elif annotation is TrainConfig and i == 0 and part in algorithm_names():
                annotation = get_algorithm(part).Settings | None  # `grpo:` with nothing is the defaults
            else:
                return Any
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        elif origin in (list, tuple) and isinstance(part, int):
            annotation = typing.get_args(annotation)[0]
        else:
            return Any
    return annotation


def must_refuse(annotation: Any, value: Any) -> bool:
    """Whether no value of this declared type could be ``value`` (so the fuzz cannot pass vacuously)."""
    base, optional = _strip_none(annotation)
    if base is Any:
        return False
    if value is None:
        return not optional
    origin = typing.get_origin(base)
    if _is_model(base) or origin is dict:
        return not isinstance(value, dict)
    if base in (int, float):
        wrong_float = base is int and isinstance(value, float) and not value.is_integer()
        return isinstance(value, (str, list, dict)) or wrong_float
    if base is str:
        return not isinstance(value, str)
    if base is bool:
        return isinstance(value, (list, dict)) or value == "abc"
    if origin is Literal:
        return isinstance(value, (list, dict)) or value not in typing.get_args(base)
    if origin in (list, tuple):
        return not isinstance(value, list)
    return False


# --- mutations ---------------------------------------------------------------------------------------------


def _nodes(node: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """(path, value) of every key and list item below ``node``, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*path, key), value
        yield from _nodes(value, (*path, key))


def _replaced(document: Any, path: Path_, value: Any) -> Any:
    copied = copy.deepcopy(document)
    node = copied
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return copied


def _deleted(document: Any, path: Path_) -> Any:
    copied = copy.deepcopy(document)
    node = copied
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return copied


def _typo(key: str, rng: random.Random) -> str:
    """A plausible misspelling of ``key``: a letter dropped, doubled or swapped, or - for _."""
    i = rng.randrange(len(key))
    choices = [key[:i] + key[i + 1 :], key[:i] + key[i] + key[i:], key + "s"]
    if len(key) > 1:
        j = min(i, len(key) - 2)
        choices.append(key[:j] + key[j + 1] + key[j] + key[j + 2 :])
    if "_" in key:
        choices.append(key.replace("_", "-"))
    return rng.choice(choices)


def _leaf_name(path: Path_) -> str:
    return next((str(p) for p in reversed(path) if isinstance(p, str)), "")


def _get(document: Any, path: Path_) -> Any:
    for part in path:
        document = document[part]
    return document


def _moved(document: Any, path: Path_, target: Path_) -> Any:
    return _replaced(_deleted(document, path), (*target, path[-1]), _get(document, path))


def mutations_of(source: str, schema: type[BaseModel], document: dict[str, Any]) -> list[Mutation]:
    """Every mutation of ``document`` is listed; PER_KIND of each kind are drawn (seeded by the name)."""
    rng = random.Random(f"{SEED}:{source}")
    nodes = list(_nodes(document))
    sections = [()] + [path for path, value in nodes if isinstance(value, dict)]
    found: dict[str, list[Mutation]] = {kind: [] for kind in PER_KIND}

    def add(
        kind: str, path: Path_, change: str, make: Callable[[], Any], refuse: bool, names: tuple[str, ...]
    ):
        found[kind].append(Mutation(source, schema, kind, path, change, make, refuse, names))

    for path, value in nodes:
        dotted, leaf = ".".join(map(str, path)), _leaf_name(path)
        declared = annotation_at(schema, path)
        if isinstance(value, dict):  # a section: a scalar or a list in its place (falsy ones too)
            kind, wrongs = "section", ["abc", 3, [1, 2], [value], True, "", 0, False, []]
        else:  # a leaf: wrong types, out-of-range numbers, a mapping around the value
            kind, wrongs = "type", [w for w in WRONG_VALUES if not (type(w) is type(value) and w == value)]
            wrongs.append({leaf: value})
        for wrong in wrongs:
            make = functools.partial(_replaced, document, path, wrong)
            change, refuse = f"{value!r:.40} -> {wrong!r:.40}", must_refuse(declared, wrong)
            add(kind, path, change, make, refuse, (dotted, leaf))
        if isinstance(path[-1], str):
            names = tuple(str(p) for p in path)
            add("delete", path, "deleted", functools.partial(_deleted, document, path), False, names)
    for path in sections:  # unknown keys: a typo of a key there, made-up names
        node = _get(document, path)
        model = _strip_none(annotation_at(schema, path))[0]
        keys = [k for k in node if isinstance(k, str)]
        for new in ([_typo(rng.choice(keys), rng)] if keys else []) + MADE_UP_KEYS:
            if new in node or (_is_model(model) and new in model.model_fields):
                continue
            make = functools.partial(_replaced, document, (*path, new), rng.choice([1, "x", None, {"a": 1}]))
            add("unknown", (*path, new), f"unknown key {new!r}", make, _is_model(model), (str(new),))
    for path, _ in nodes:  # a key moved into another section
        for target in sections:
            if (
                not isinstance(path[-1], str)
                or target == path[:-1]
                or path[-1] in _get(document, target)
                or target[: len(path)] == path
            ):
                continue
            declared = annotation_at(schema, (*target, path[-1]))
            model = _is_model(_strip_none(annotation_at(schema, target))[0])
            make = functools.partial(_moved, document, path, target)
            change = f"moved from {'.'.join(map(str, path))}"
            add("move", (*target, path[-1]), change, make, model and declared is Any, (path[-1],))
    for wrong in NOT_MAPPINGS:
        make = functools.partial(copy.deepcopy, wrong)
        add("document", (), f"document -> {wrong!r}", make, True, ("top level",))
    chosen = []
    for kind, items in found.items():
        chosen += rng.sample(items, min(PER_KIND[kind], len(items)))
    return chosen


def all_config_mutations() -> list[Mutation]:
    return [m for name, schema, document in sources() for m in mutations_of(name, schema, document)]


# --- running them ------------------------------------------------------------------------------------------

Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
if hasattr(yaml, "CSafeLoader"):  # libyaml: the SafeLoader's rules, 5x faster than pure-Python safe_load

    def fast_safe_load(stream: Any) -> Any:
        return yaml.load(stream, Loader=yaml.CSafeLoader)

else:
    fast_safe_load = yaml.safe_load
STOCK_LOADER_EVERY = 20  # every 20th mutant is read by the stock yaml.safe_load, the rest by fast_safe_load


def load_mutant(mutation: Mutation, path: Path) -> tuple[str, str]:
    """("accepted" | "refused" | "crash", message), loading the mutant as the CLI does."""
    path.write_text(yaml.dump(mutation.make(), Dumper=Dumper, allow_unicode=True, sort_keys=False), "utf-8")
    try:
        load_config(mutation.schema, path)
    except VialignInputError as error:
        return "refused", str(error)
    except Exception as error:  # anything else is a traceback at the command line
        return "crash", f"{type(error).__name__}: {error}"
    return "accepted", ""


def form_problem(message: str) -> str | None:
    """What is wrong with the form of a refusal's message, or None: one line, or the ``invalid config
    (SOURCE):`` header and one indented line per problem."""
    lines = message.splitlines()
    if not lines or "Traceback" in message:
        return "empty message or a traceback"
    if len(lines) > 1 and not (
        lines[0].startswith("invalid config (")
        and lines[0].endswith(":")
        and all(line.startswith("  ") and line.strip() for line in lines[1:])
    ):
        return "several lines, not 'invalid config (...):' and one indented line per problem"
    if any(line.rstrip().endswith("allowed keys here:") for line in lines):
        return "an empty list of allowed keys"
    return None


def test_the_fuzzed_documents_validate_as_they_are():
    for name, schema, document in sources():
        try:
            schema.model_validate(document)
        except Exception as error:
            pytest.fail(f"{name} does not validate, so its mutations test nothing: {error}")


def test_config_mutations_are_accepted_or_refused_naming_the_key(tmp_path, capsys, monkeypatch):
    mutations = all_config_mutations()
    stock_safe_load = yaml.safe_load
    outcomes: Counter[str] = Counter()
    by_kind: Counter[tuple[str, str]] = Counter()
    failures, examples = [], {}
    for i, mutation in enumerate(mutations):
        monkeypatch.setattr(
            yaml, "safe_load", stock_safe_load if i % STOCK_LOADER_EVERY == 0 else fast_safe_load
        )
        outcome, message = load_mutant(mutation, tmp_path / "mutant.yaml")
        outcomes[outcome] += 1
        by_kind[mutation.kind, outcome] += 1
        if outcome == "crash":
            failures.append(f"{mutation}\n    raised {message}")
        elif outcome == "accepted" and mutation.must_refuse:
            failures.append(f"{mutation}\n    was accepted, but no value of the declared type is this")
        elif outcome == "refused":
            problem = form_problem(message)
            if problem is None and not any(name and name in message for name in mutation.names):
                problem = f"does not name {' or '.join(mutation.names)}"
            if problem:
                failures.append(f"{mutation}\n    {problem}: {message!r}")
            examples.setdefault(mutation.kind, message)
    with capsys.disabled():
        kinds = ", ".join(
            f"{kind} {by_kind[kind, 'accepted']}/{by_kind[kind, 'refused']}" for kind in PER_KIND
        )
        print(
            f"\nconfig fuzz: {len(mutations)} mutations of {len(sources())} documents: "
            f"{outcomes['accepted']} accepted, {outcomes['refused']} refused, {outcomes['crash']} crashed "
            f"(accepted/refused: {kinds})"
        )
    assert not failures, f"{len(failures)} of {len(mutations)} mutations failed:\n" + "\n".join(failures[:20])
    assert len(mutations) >= 2000
    required = sum(m.must_refuse for m in mutations)
    assert required >= 1000 and outcomes["refused"] >= required  # not vacuous: most bad input is refused
    assert set(examples) >= {"type", "unknown", "section", "move", "document"}


def test_schema_types_used_by_the_fuzz():
    """The refusal rules above read the schemas right (else the fuzz could pass by expecting nothing)."""
    assert annotation_at(TrainConfig, ("sampler", "num_steps")) == int | None
    assert _is_model(_strip_none(annotation_at(TrainConfig, ("grpo",)))[0])
    assert annotation_at(TrainConfig, ("rewards", "x", "options", "y")) is Any
    assert must_refuse(annotation_at(SampleConfig, ("seed",)), "abc")
    assert must_refuse(annotation_at(SampleConfig, ("model",)), 3)
    assert not must_refuse(annotation_at(SampleConfig, ("height",)), None)


def test_what_the_fuzz_found(capsys):
    """Regressions: an unknown key in a reward listed no allowed keys; `grpo: false` (or [], "", 0) meant
    the defaults; --reward-option NAME.=VALUE was refused without naming the flag; NaN/inf floats and
    AdamW betas outside [0, 1) were accepted."""
    allowed = "unknown key; allowed keys here: options, shaping, weight"
    with pytest.raises(VialignInputError, match=f"rewards.pickscore.wieght: {allowed}"):
        load_config(TrainConfig, None, ["rewards.pickscore.wieght=2"])
    with pytest.raises(VialignInputError, match=f"rewards.7.a: {allowed}"):
        load_config(TrainConfig, None, values={"rewards": {7: {"a": 1}}})
    for empty in ("false", "[]", "''", "0"):
        with pytest.raises(VialignInputError, match="grpo: Input should be a valid dictionary"):
            load_config(TrainConfig, None, [f"grpo={empty}"])
    assert load_config(TrainConfig, None, ["grpo=null"]).settings.group_size >= 1
    assert cli.main(["score", "--reward", "pickscore", "--reward-option", "pickscore.=1"]) == 2
    assert "vialign: error: --reward-option pickscore.=1: write NAME.KEY=VALUE" in capsys.readouterr().err
    # NaN and infinity were accepted for every float (a NaN reward weight makes every reward NaN)
    for override, key in [
        ("rewards={brightness: {weight: .nan}}", "rewards.brightness.weight"),
        ("optim.lr=.inf", "optim.lr"),
        ("grpo.kl_beta=.inf", "grpo.kl_beta"),
    ]:
        with pytest.raises(VialignInputError, match=f"{key}: Input should be a finite number"):
            load_config(TrainConfig, None, [override])
    with pytest.raises(VialignInputError, match=r"optim.betas.1: Input should be less than 1 \(got 1.5\)"):
        load_config(TrainConfig, None, ["optim.betas=[0.9, 1.5]"])


# --- the command line ------------------------------------------------------------------------------------


class JobRan(Exception):
    """The stubbed job was called: the command line was accepted."""


@pytest.fixture
def stub_jobs(monkeypatch, tmp_path):
    def ran(*args: Any, **kwargs: Any) -> None:
        raise JobRan

    for module, name in [
        ("vialign.sample", "run_sample"),
        ("vialign.score", "run_score"),
        ("vialign.eval", "run_eval"),
        ("vialign.trainer", "run_train"),
    ]:
        monkeypatch.setattr(importlib.import_module(module), name, ran)
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)
    monkeypatch.chdir(tmp_path)


CLI_BASES = {
    "sample": [
        ["sample", "--config", str(CONFIG_DIR / "sample_tiny.yaml")],
        ["sample", "--prompt", "a red square", "--sampler", "sde", "--num-steps", "4"],
        ["sample", "--prompt", "x", "--steer", "best-of-n", "--reward", "pickscore"],
    ],
    "score": [
        ["score", "--images", "samples/", "--reward", "pickscore"],
        [
            "score",
            "--reward",
            "aesthetic=0.5",
            "--reward-option",
            "aesthetic.pretrained=/m",
            "--out",
            "s.csv",
        ],
    ],
    "eval": [
        ["eval", "--config", str(CONFIG_DIR / "eval_shapeworld.yaml")],
        ["eval", "--model", "shapeworld"],
    ],
    "train": [
        ["train", str(CONFIG_DIR / "quickstart.yaml")],
        ["train", str(CONFIG_DIR / "hacking_demo.yaml")],
    ],
}
FLAGS = {  # command -> flag -> config key
    "sample": {flag: key for key, flag in cli.SAMPLE_FLAGS.values()},
    "score": {flag: key for key, flag in cli.SCORE_FLAGS.values()},
    "eval": {flag: key for key, flag in cli.EVAL_FLAGS.values()},
    "train": {},
}
SCHEMA_OF = {"sample": SampleConfig, "score": ScoreConfig, "eval": EvalConfig, "train": TrainConfig}
SWITCHES = {"--overwrite", "--resume", "--compile", "--save-frames"}  # flags without a value
BAD_FLAG_VALUES = [
    "abc", "-5", "1.5", "0", "", "nan", "inf", "1e30", "[1, 2]", "{a: 1}", "null", "true",
    "99999999999999999999999", "-1", "cuda:x", "a: b",
]  # fmt: skip
UNKNOWN_FLAGS = ["--nosuch", "--num_steps", "--num-stepz", "-z", "--config2", "--nosuch=3", "--Seed"]
OVERRIDES = [  # (override, must be refused)
    ("=5", True),
    ("a..b=1", True),
    (".a=1", True),
    ("a.=1", True),
    ("nosuchkey=1", True),
    ("seed.x=1", True),
    ("model.path.x=1", True),
    ("out=[1, 2]", True),
    ("sampler.num_steps=x", True),
    ("sampler.num_steps=-3", True),
    ("sampler.num_steps=1e30", True),
    ("sampler.kind=langevin", True),
    ("sampler.kind=sde", False),
    ("model=3", True),
    ("model={path: x}", False),
    ("steer.method=smc", False),
    ("steer.particles=0", True),
    ("rewards={}", False),
    ("rewards.pickscore.weight=abc", True),
    ("rewards.pickscore.nope=1", True),
    ("algorithm=nosuch", True),
    ("grpo.group_size=abc", True),
    ("refl.steps=[9, 3]", True),
    ("batch_size=0", True),
    ("seed=!!python/object:os.system", True),
    ("prompts=[a, b]", False),
    ("justaword", True),
    ("key with space=1", True),
    ("sampler.num_steps=[1", True),
]


def _mutate_argv(command: str, argv: list[str], rng: random.Random) -> tuple[list[str], str, bool, list[str]]:
    """One random change to ``argv``: (argv, what changed, must be refused, names a refusal may name)."""
    flags = FLAGS[command]
    valued = [flag for flag in flags if flag not in SWITCHES]
    op = rng.choice(["value", "value", "missing", "unknown", "override", "override", "reward"])
    if op == "value" and valued:
        flag, value = rng.choice(valued), rng.choice(BAD_FLAG_VALUES)
        declared = annotation_at(SCHEMA_OF[command], tuple(flags[flag].split(".")))
        numeric = _strip_none(declared)[0] in (int, float)
        literal = typing.get_origin(_strip_none(declared)[0]) is Literal
        refuse = (numeric and value in ("abc", "", "[1, 2]", "{a: 1}", "a: b", "cuda:x", "true", "null")) or (
            literal and value not in typing.get_args(_strip_none(declared)[0])
        )
        return [*argv, flag, value], f"{flag} {value!r}", refuse, [flag, flags[flag]]
    if op == "missing" and valued:
        flag = rng.choice(valued)
        if rng.random() < 0.5:
            return [*argv, flag], f"{flag} without a value", True, [flag]
        return [*argv, flag, "--overwrite"], f"{flag} followed by a flag", True, [flag]
    if op == "unknown" or (op in ("value", "missing") and not valued):
        flag = rng.choice(UNKNOWN_FLAGS)
        extra = [flag] if rng.random() < 0.5 or "=" in flag else [flag, "1"]
        return [*argv, *extra], f"unknown flag {' '.join(extra)}", True, [flag]
    if op == "reward" and command in ("sample", "score"):
        extra = rng.choice(
            [
                ["--reward", "pickscore=abc"],
                ["--reward", "pickscore="],
                ["--reward", "pickscore=1=2"],
                ["--reward-option", "nosuch.key=1"],
                ["--reward-option", "pickscore"],
                ["--reward-option", "pickscore.=1"],
                ["--reward", "pickscore", "--reward-option", "pickscore.=1"],
                ["--reward", "pickscore", "--reward-option", "pickscore.a.b=[1"],
                ["--reward"],
            ]
        )
        refuse = extra[-1] not in ("pickscore.a.b=[1",)
        return [*argv, *extra], " ".join(extra), refuse, ["--reward", "--reward-option"]
    text, refuse = rng.choice(OVERRIDES)
    key = text.partition("=")[0]
    # right after the command: --images A B takes every word after it, overrides too (train has a positional)
    argv = [*argv, text] if command == "train" else [argv[0], text, *argv[1:]]
    return argv, f"override {text!r}", refuse, [text, key, key.split(".")[0], "key=value"]


def cli_mutations() -> list[tuple[str, list[str], str, bool, list[str]]]:
    rng = random.Random(SEED)
    found = []
    for command, bases in CLI_BASES.items():
        for _ in range(125):
            argv = list(rng.choice(bases))
            changes, refuse, names = [], False, []
            for _ in range(rng.choice([1, 1, 1, 2])):
                argv, change, must, some = _mutate_argv(command, argv, rng)
                changes.append(change)
                refuse, names = refuse or must, names + some
            found.append((command, argv, "; ".join(changes), refuse, names))
    return found


def test_cli_mutations_are_accepted_or_refused_naming_the_flag(stub_jobs, capsys):
    mutations = cli_mutations()
    outcomes: Counter[str] = Counter()
    failures = []
    for _command, argv, change, refuse, names in mutations:
        try:
            code, outcome = cli.main(argv), "refused"
        except JobRan:
            code, outcome = 0, "accepted"
        except SystemExit as stop:
            code, outcome = stop.code, "usage"
        except Exception as error:  # a traceback at the command line
            code, outcome = None, f"crash: {type(error).__name__}: {error}"
        out, err = capsys.readouterr()
        outcomes[outcome if not outcome.startswith("crash") else "crash"] += 1
        lines = err.splitlines()
        problem = None
        if outcome.startswith("crash") or "Traceback" in out + err:
            problem = outcome
        elif outcome == "accepted":
            problem = "accepted, but must be refused" if refuse else None
        elif code != 2:
            problem = f"exit status {code}, not 2"
        elif outcome == "refused" and not any(line.startswith("vialign: error: ") for line in lines):
            problem = "no 'vialign: error:' line"
        elif outcome == "usage" and not (
            err.startswith("usage: vialign") and lines[-1].startswith("vialign") and ": error: " in lines[-1]
        ):
            problem = "not an argparse usage error"
        elif not any(name and name in err for name in names):
            problem = f"does not name {' or '.join(dict.fromkeys(n for n in names if n))}"
        if problem:
            failures.append(f"vialign {' '.join(argv)}  [{change}]\n    {problem}: {err!r}")
    with capsys.disabled():
        print(
            f"\ncli fuzz: {len(mutations)} command lines: {outcomes['accepted']} accepted, "
            f"{outcomes['refused']} refused (vialign: error), {outcomes['usage']} usage errors, "
            f"{outcomes['crash']} crashed"
        )
    assert not failures, f"{len(failures)} of {len(mutations)} command lines failed:\n" + "\n".join(
        failures[:20]
    )
    assert len(mutations) >= 400
    assert outcomes["accepted"] > 0 and outcomes["refused"] > 100 and outcomes["usage"] > 50
