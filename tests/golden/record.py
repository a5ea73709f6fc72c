"""Record the golden values of ``tests/golden/cases.py``: ``python tests/golden/record.py [--old-keys]``.

For every case: two training steps from the config, then ``golden/<case>.json`` (the metrics of steps
1 and 2, timings left out) and ``golden/<case>.safetensors`` (the exported LoRA weights).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CASES, old_style  # noqa: E402


def run_case(overrides: list[str], output_dir: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from vialign.config import TrainConfig, load_config
    from vialign.trainer import Trainer

    config = load_config(TrainConfig, None, [*overrides, f"output_dir={output_dir}"])
    Trainer(config, progress=False).train()
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]
    weights = load_file(Path(output_dir) / "final" / "pytorch_lora_weights.safetensors")
    return rows, weights


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    old = "--old-keys" in sys.argv
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(CASES)
    for name in names:
        overrides = old_style(CASES[name]) if old else CASES[name]
        with tempfile.TemporaryDirectory() as tmp:
            rows, weights = run_case(overrides, tmp)
        (HERE / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in weights.items()}, str(HERE / f"{name}.safetensors"))
        print(name, rows[-1].get("reward/mean"), len(weights), sum(v.numel() for v in weights.values()))


if __name__ == "__main__":
    main()
