"""Shared fixtures: offline hub, tiny pipelines saved to disk once per session."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: an offline hub call otherwise hangs ~45 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(family)`` -> a folder holding ``pipelines.tiny.build(family).save_pretrained``."""
    from pipelines import tiny

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny.build(family).save_pretrained(folder)
            cache[family] = str(folder)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def quiet_libraries():
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
