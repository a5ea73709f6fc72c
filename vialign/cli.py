"""The ``vialign`` command line.

    vialign sample --prompt "a red square" --out samples/          # built-in tiny model, CPU, seconds
    vialign sample --config configs/sample_tiny.yaml sampler.num_steps=20

Flags and ``key=value`` overrides both land in the job's typed config (``vialign.config``), so every
bad value is reported the same way, naming the key. Problems with the input (config, paths, sizes,
models) print one ``vialign: error:`` message and exit with status 2, without a traceback; set
``VIALIGN_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pipelines.errors import PipelineInputError
from vialign import __version__
from vialign.errors import VialignInputError

# flag dest -> (config key, flag as typed): flags are shorthands for config keys
SAMPLE_FLAGS = {
    "model": ("model.path", "--model"),
    "prompt": ("prompts", "--prompt"),
    "prompts": ("prompts_file", "--prompts"),
    "num_steps": ("sampler.num_steps", "--num-steps"),
    "guidance_scale": ("sampler.guidance_scale", "--guidance-scale"),
    "true_cfg_scale": ("sampler.true_cfg_scale", "--true-cfg-scale"),
    "negative_prompt": ("sampler.negative_prompt", "--negative-prompt"),
    "sampler": ("sampler.kind", "--sampler"),
    "sde_kind": ("sampler.sde_kind", "--sde-kind"),
    "noise_level": ("sampler.noise_level", "--noise-level"),
    "height": ("height", "--height"),
    "width": ("width", "--width"),
    "seed": ("seed", "--seed"),
    "batch_size": ("batch_size", "--batch-size"),
    "out": ("out", "--out"),
    "dtype": ("model.dtype", "--dtype"),
    "device": ("model.device", "--device"),
    "lora": ("model.lora", "--lora"),
    "overwrite": ("overwrite", "--overwrite"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vialign", description="Align visual generative models with rewards."
    )
    parser.add_argument("--version", action="version", version=f"vialign {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    sample = commands.add_parser(
        "sample",
        help="generate images (PNG + samples.jsonl)",
        description="Generate one PNG per prompt (image i uses seed S+i) and DIR/samples.jsonl. "
        "Any config key can also be set as key=value, e.g. sampler.num_steps=20.",
    )
    sample.add_argument("--config", help="YAML config (keys: see configs/sample_tiny.yaml)")
    sample.add_argument(
        "--model", help="diffusers folder, hub id, or built-in tiny-sd/-sdxl/-sd3/-flux (default tiny-sd3)"
    )
    sample.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    sample.add_argument(
        "--prompts", metavar="FILE", help="text file with one prompt per line, or JSONL with 'prompt'"
    )
    sample.add_argument("--num-steps", help="denoising steps (default 20)")
    sample.add_argument(
        "--guidance-scale", help="the stock pipeline's guidance_scale (default: the pipeline's)"
    )
    sample.add_argument("--true-cfg-scale", help="FLUX only: true classifier-free guidance scale")
    sample.add_argument("--negative-prompt", help="negative prompt")
    sample.add_argument("--height", help="image height in pixels (default: the model's)")
    sample.add_argument("--width", help="image width in pixels (default: the model's)")
    sample.add_argument("--seed", help="seed of the first image (default 0)")
    sample.add_argument("--sampler", help="ode (default) or sde")
    sample.add_argument("--sde-kind", help="ddim (UNet models) | flow-sde | dance-sde | cps (flow models)")
    sample.add_argument("--noise-level", help="SDE noise level (eta or a; default per SDE kind)")
    sample.add_argument("--batch-size", help="images per batch (default 4)")
    sample.add_argument("--out", metavar="DIR", help="output folder (default samples)")
    sample.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    sample.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    sample.add_argument("--lora", help="folder with diffusers-format LoRA weights")
    sample.add_argument(
        "--overwrite", action="store_const", const=True, help="replace an existing samples.jsonl in DIR"
    )
    return parser


def _flag_values(args: argparse.Namespace, flags: dict[str, tuple[str, str]]) -> dict[str, object]:
    return {
        key: getattr(args, dest) for dest, (key, _) in flags.items() if getattr(args, dest, None) is not None
    }


def _quiet_libraries() -> None:
    """diffusers/transformers progress bars and info logs drown vialign's own progress bar."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_sample(args: argparse.Namespace) -> int:
    from vialign.config import SampleConfig, load_config
    from vialign.sample import run_sample

    config = load_config(
        SampleConfig,
        args.config,
        args.overrides,
        _flag_values(args, SAMPLE_FLAGS),
        flags={key: flag for key, flag in SAMPLE_FLAGS.values()},
    )
    _quiet_libraries()
    report = run_sample(config, progress=True)
    print(
        f"wrote {len(report.files)} images ({report.width}x{report.height}) and "
        f"{report.out / 'samples.jsonl'}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # whatever argparse did not recognise must be key=value overrides
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides are written key=value)")
    args.overrides = rest
    logging.basicConfig(level=logging.WARNING, format="vialign: %(message)s", stream=sys.stderr)
    for name in ("vialign", "pipelines", "rewards"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        return {"sample": cmd_sample}[args.command](args)
    except (VialignInputError, PipelineInputError, FileNotFoundError) as error:
        if os.environ.get("VIALIGN_DEBUG"):
            raise
        print(f"vialign: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vialign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
