"""The published recipes' prompt sets, by name: ``data.train: prompts:simple_animals``.

Small sets are shipped (``assets/prompts``); larger ones are fetched once from the recipe's repository at the
pinned commit with ``vialign prompts get NAME`` and checked against the git blob id of that file, so what a
preset trains on is byte for byte what the paper's code read. ``vialign prompts list`` shows them all.

    vialign.data.load_prompts("prompts:pickscore_test")   # shipped: 2,048 prompts (Flow-GRPO's eval set)
    vialign.data.load_prompts("prompts:refl")             # needs `vialign prompts get refl` first
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vialign.errors import VialignInputError

RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"


@dataclass(frozen=True)
class PromptSet:
    """One named prompt set: where it comes from (``repo`` at ``commit``, file ``path``, git ``blob`` id)
    and how to read it."""

    description: str
    repo: str
    commit: str
    path: str
    blob: str
    licence: str
    shipped: str | None = None  # file name in assets/prompts, or None: fetched by `vialign prompts get`
    column: str = "prompt"  # JSON / JSONL field holding the prompt
    rule: str | None = None  # a recipe's own filter on the file's lines (see select_prompts)

    @property
    def suffix(self) -> str:
        return Path(self.path).suffix

    @property
    def url(self) -> str:
        return RAW_URL.format(repo=self.repo, commit=self.commit, path=self.path)


FLOW_GRPO = ("yifan123/flow_grpo", "ac4c86e8cae021841f1fde853d340e0db67690dd")
IMAGEREWARD = ("THUDM/ImageReward", "c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb")

PROMPT_SETS: dict[str, PromptSet] = {
    "simple_animals": PromptSet(
        "45 animal names (DDPO, AlignProp)",
        "kvablack/ddpo-pytorch",
        "1958463f020112c9a7bc85768d296daacc2e1b4b",
        "ddpo_pytorch/assets/simple_animals.txt",
        "bc9e1176a2eb831541d98dcd810b674a36602a78",
        "MIT",
        shipped="simple_animals.txt",
    ),
    "pickscore_train": PromptSet(
        "25,432 Pick-a-Pic v1 prompts (Flow-GRPO's PickScore training set)",
        *FLOW_GRPO,
        "dataset/pickscore/train.txt",
        "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b",
        "MIT (flow_grpo); prompts by Pick-a-Pic users",
    ),
    "pickscore_test": PromptSet(
        "2,048 Pick-a-Pic v1 prompts (Flow-GRPO's PickScore evaluation set)",
        *FLOW_GRPO,
        "dataset/pickscore/test.txt",
        "45f05231b969fb5f74c8debd606b22cd3be27f8e",
        "MIT (flow_grpo); prompts by Pick-a-Pic users",
        shipped="pickscore_test.txt",
    ),
    "geneval_train": PromptSet(
        "GenEval-style compositional training prompts (Flow-GRPO's GenEval recipe; metadata rows)",
        *FLOW_GRPO,
        "dataset/geneval/train_metadata.jsonl",
        "0b97e8a6802c08fc7537cd00c76ae79c851bddcb",
        "MIT (flow_grpo, GenEval)",
    ),
    "geneval_test": PromptSet(
        "GenEval's 553 prompts, 4 rows each (Flow-GRPO's GenEval evaluation metadata)",
        *FLOW_GRPO,
        "dataset/geneval/test_metadata.jsonl",
        "27cdaf5cc1356fe15aeadbb8df55682ca74228f0",
        "MIT (flow_grpo, GenEval)",
        shipped="geneval_test.jsonl",
    ),
    "refl": PromptSet(
        "10,000 DiffusionDB prompts of ImageReward's ReFL (refl_data.json; soc-fine-tuning-sd ships the same file)",
        *IMAGEREWARD,
        "data/refl_data.json",
        "aaa4b2592b9ae733b86c8a769a1d0be4cace1ade",
        "Apache-2.0 (ImageReward); DiffusionDB prompts: CC0-1.0",
        column="text",
    ),
    "imagereward_benchmark": PromptSet(
        "ImageReward's 100 benchmark prompts (soc-fine-tuning-sd's validation set)",
        "microsoft/soc-fine-tuning-sd",
        "489f904a824fa3f6f2700f3b9a36826318f4d2ac",
        "prompt_files/benchmark_ir.json",
        "d4618b9f492bc6c8a538b8e9137710c189b3dd06",
        "MIT (soc-fine-tuning-sd); ImageReward: Apache-2.0",
        shipped="imagereward_benchmark.json",
        column="text",
    ),
    "hpdv2": PromptSet(
        "HPDv2 prompts of DanceGRPO (assets/prompts.txt; its preprocessing keeps the first 50,000 lines "
        "without CJK characters)",
        "XueZeyue/DanceGRPO",
        "15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344",
        "assets/prompts.txt",
        "b47234e475645222ca9a0bb7742ebf4d08123855",
        "Apache-2.0 (DanceGRPO; HPDv2: Apache-2.0)",
        rule="dancegrpo",
    ),
    "dancegrpo_video": PromptSet(
        "50,000 video prompts of DanceGRPO's HunyuanVideo recipe (assets/video_prompts.txt; its "
        "preprocessing drops lines with CJK characters, of which the file has none)",
        "XueZeyue/DanceGRPO",
        "15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344",
        "assets/video_prompts.txt",
        "2a7457f2d7b59ff7915be588de1ddb8fa95c8028",
        "Apache-2.0 (DanceGRPO)",
        rule="dancegrpo",
    ),
}


def cache_dir() -> Path:
    """Where fetched prompt sets live: ``$VIALIGN_CACHE/prompts`` (default ``~/.cache/vialign/prompts``)."""
    root = os.environ.get("VIALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vialign")
    return Path(root) / "prompts"


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def prompt_set(name: str) -> PromptSet:
    if name not in PROMPT_SETS:
        raise VialignInputError(
            f"unknown prompt set {name!r}; choose one of {', '.join(sorted(PROMPT_SETS))} (vialign prompts list)"
        )
    return PROMPT_SETS[name]


def prompt_file(name: str) -> Path:
    """The local file of prompt set ``name``; a set not fetched yet is an error naming the command."""
    entry = prompt_set(name)
    if entry.shipped is not None:
        import vialign_assets

        return vialign_assets.path("prompts", entry.shipped)
    path = cache_dir() / f"{name}{entry.suffix}"
    if not path.is_file():
        raise VialignInputError(
            f"prompt set {name!r} ({entry.description}) is not on this machine: fetch it with "
            f"`vialign prompts get {name}` (downloads {entry.url} into {cache_dir()})"
        )
    return path


def fetch_prompt_set(name: str, *, url: str | None = None) -> Path:
    """Download prompt set ``name`` into :func:`cache_dir`, check its git blob id, and write it atomically.
    Shipped sets are already here. ``url`` replaces the recipe's (a mirror)."""
    entry = prompt_set(name)
    if entry.shipped is not None:
        return prompt_file(name)
    source = url or entry.url
    try:
        with urllib.request.urlopen(source, timeout=60) as response:  # noqa: S310 - a fixed https URL or the user's
            data = response.read()
    except OSError as error:
        raise VialignInputError(f"could not download prompt set {name!r} from {source}: {error}") from None
    found = git_blob_id(data)
    if found != entry.blob:
        raise VialignInputError(
            f"{source} is not the file the recipe used: its git blob id is {found}, expected {entry.blob} "
            f"({entry.repo}@{entry.commit[:7]}:{entry.path})"
        )
    target = cache_dir() / f"{name}{entry.suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(data)
    os.replace(tmp.name, target)
    return target


_CJK = re.compile("[\u4e00-\u9fff]")


def select_prompts(entry: PromptSet, prompts: list[str]) -> list[str]:
    """A recipe's own filter of its file: DanceGRPO's preprocessing (preprocess_flux_embedding.py at
    15cc71d) drops lines with CJK characters and keeps the first 50,000."""
    if entry.rule == "dancegrpo":
        return [p for p in prompts if not _CJK.search(p)][:50_000]
    return prompts
