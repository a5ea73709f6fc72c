"""The ``vialign`` command line.

    vialign sample --prompt "a red square" --out samples/          # built-in tiny model, CPU, seconds
    vialign sample --config configs/sample_tiny.yaml sampler.num_steps=20
    vialign score --images samples/ --reward pickscore --reward aesthetic=0.1 --out scores.csv
    vialign precompute-embeds --config train.yaml --out prompts.safetensors  # then model.prompt_embeds=...

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
import traceback
from collections.abc import Sequence
from pathlib import Path

from pipelines.errors import PipelineInputError
from rewards.errors import RewardInputError
from vialign import __version__
from vialign.errors import VialignInputError

# problems with the input: one `vialign: error:` line, exit status 2
INPUT_ERRORS = (VialignInputError, PipelineInputError, RewardInputError, FileNotFoundError)

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
    "num_frames": ("num_frames", "--num-frames"),
    "fps": ("fps", "--fps"),
    "save_frames": ("save_frames", "--save-frames"),
    "seed": ("seed", "--seed"),
    "batch_size": ("batch_size", "--batch-size"),
    "out": ("out", "--out"),
    "dtype": ("model.dtype", "--dtype"),
    "device": ("model.device", "--device"),
    "compile": ("model.compile", "--compile"),
    "lora": ("model.lora", "--lora"),
    "overwrite": ("overwrite", "--overwrite"),
    "resume": ("resume", "--resume"),
    "steer": ("steer.method", "--steer"),
    "particles": ("steer.particles", "--particles"),
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
        help="generate images or videos (PNG or MP4 + samples.jsonl)",
        description="Generate one PNG per prompt (image i uses seed S+i), or one MP4 for a video model, and "
        "DIR/samples.jsonl. Any config key can also be set as key=value, e.g. sampler.num_steps=20.",
    )
    sample.add_argument("--config", help="YAML config (keys: see configs/sample_tiny.yaml)")
    sample.add_argument(
        "--model",
        help="diffusers folder, hub id, or built-in tiny-sd/-sdxl/-sd3/-flux, video: tiny-wan/-cogvideox "
        "(default shapeworld)",
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
    sample.add_argument(
        "--num-frames",
        help="video models: frames per video, 4k+1 (Wan) or 8k+1 (CogVideoX); default the model's (81, 49)",
    )
    sample.add_argument(
        "--fps", help="video models: frame rate of the MP4s (default 16 for Wan, 8 for CogVideoX)"
    )
    sample.add_argument(
        "--save-frames",
        action="store_const",
        const=True,
        help="video models: also write each video's frames as lossless PNGs in DIR/NNNNN_frames/",
    )
    sample.add_argument("--seed", help="seed of the first image (default 0)")
    sample.add_argument("--sampler", help="ode (default) or sde")
    sample.add_argument("--sde-kind", help="ddim (UNet models) | flow-sde | dance-sde | cps (flow models)")
    sample.add_argument("--noise-level", help="SDE noise level (eta or a; default per SDE kind)")
    sample.add_argument("--batch-size", help="images per batch (default 4)")
    sample.add_argument("--out", metavar="DIR", help="output folder (default samples)")
    sample.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    sample.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    sample.add_argument(
        "--compile", action="store_const", const=True, help="torch.compile the denoiser (pays on GPUs)"
    )
    sample.add_argument("--lora", help="folder with diffusers-format LoRA weights")
    sample.add_argument(
        "--overwrite", action="store_const", const=True, help="replace an existing samples.jsonl in DIR"
    )
    sample.add_argument(
        "--resume",
        action="store_const",
        const=True,
        help="continue an interrupted run in DIR: keep its complete images, make the missing ones",
    )
    sample.add_argument(
        "--steer",
        help="inference-time alignment with --reward: best-of-n, smc, reno or guidance (options: steer.*)",
    )
    sample.add_argument(
        "--reward",
        action="append",
        metavar="NAME[=WEIGHT]",
        help="the steering reward and its weight (repeatable); see vialign score --list-rewards",
    )
    sample.add_argument(
        "--reward-option", action="append", metavar="NAME.KEY=VALUE", help="an option of one steering reward"
    )
    sample.add_argument("--particles", help="N: best-of-N candidates or SMC particles per prompt (default 4)")

    score = commands.add_parser(
        "score",
        help="score images/videos with rewards (JSONL or CSV, one row per file)",
        description="Score image and video files with one or more rewards. Works on a `vialign sample` folder "
        "as it is (its samples.jsonl gives the prompts). Corrupt files are reported and skipped.",
    )
    score.add_argument("--config", help="YAML config with the keys of ScoreConfig")
    score.add_argument(
        "--reward",
        action="append",
        metavar="NAME[=WEIGHT]",
        help="a reward and its weight in the total (repeatable); see --list-rewards",
    )
    score.add_argument(
        "--reward-option",
        action="append",
        metavar="NAME.KEY=VALUE",
        help="an option of one reward, e.g. pickscore.pretrained=/models/pickscore (repeatable)",
    )
    score.add_argument("--images", nargs="+", metavar="DIR|GLOB|FILE", help="what to score")
    score.add_argument(
        "--prompts", metavar="FILE", help="one prompt per line, in the sorted order of the files"
    )
    score.add_argument(
        "--prompts-from", metavar="TABLE", help="samples.jsonl, JSONL or CSV with file and prompt"
    )
    score.add_argument("--batch-size", help="files per batch (default 16)")
    score.add_argument("--out", help="scores.jsonl (default) or a .csv file")
    score.add_argument(
        "--frames",
        help="frames an image reward scores in a video: uniform (default), first-middle-last, random, all",
    )
    score.add_argument("--num-frames", help="frames for --frames uniform (default 8)")
    score.add_argument(
        "--device",
        help="device of the reward models: auto (default: CUDA when torch sees it, else cpu), cpu, cuda, cuda:N",
    )
    score.add_argument(
        "--overwrite", action="store_const", const=True, help="replace an existing output file"
    )
    score.add_argument(
        "--resume",
        action="store_const",
        const=True,
        help="continue an interrupted run: keep the rows already written, score the remaining files",
    )
    score.add_argument(
        "--list-rewards", action="store_true", help="list reward names with their metadata and exit"
    )

    evaluate = commands.add_parser(
        "eval",
        help="judge a model on ShapeWorld prompts with the oracle (eval.json + grid.png)",
        description="Sample ShapeWorld prompts (shapeworld:eval by default) and report oracle accuracy overall and per "
        "attribute, reward means and diversity. Works with the shipped testbed, a LoRA or a fine-tuned folder.",
    )
    evaluate.add_argument("--config", help="YAML config with the keys of EvalConfig")
    evaluate.add_argument("--model", help="model folder or built-in (default shapeworld)")
    evaluate.add_argument("--lora", help="folder with diffusers-format LoRA weights")
    evaluate.add_argument(
        "--prompts",
        help="shapeworld:eval (default), shapeworld:align, :train, :held_out, :all, or a file of ShapeWorld prompts",
    )
    evaluate.add_argument("--samples-per-prompt", help="images per prompt (default 8)")
    evaluate.add_argument("--num-steps", help="denoising steps (default: the model's)")
    evaluate.add_argument("--guidance-scale", help="guidance scale (default: the model's)")
    evaluate.add_argument("--sampler", help="ode (default) or sde")
    evaluate.add_argument("--sde-kind", help="ddim | flow-sde | dance-sde | cps")
    evaluate.add_argument(
        "--seed", help="first evaluation sample of every prompt (default 0; noise seed 2**62 + index)"
    )
    evaluate.add_argument("--reward", action="append", help="a reward whose mean is reported (repeatable)")
    evaluate.add_argument("--out", metavar="DIR", help="output folder (default eval)")
    evaluate.add_argument(
        "--overwrite", action="store_const", const=True, help="replace an existing eval.json"
    )
    train = commands.add_parser(
        "train",
        help="align a model with rewards (GRPO) from a YAML config",
        description="Train from a config (see configs/quickstart.yaml); any key can be overridden as key=value, "
        "e.g. output_dir=runs/x train.max_steps=10. Multi-GPU: accelerate launch -m vialign train CONFIG.",
    )
    train.add_argument("config", help="YAML config with the keys of TrainConfig")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its latest complete checkpoint",
    )
    prompts = commands.add_parser(
        "prompts",
        help="the published recipes' prompt sets: list them, or fetch one (data.train: prompts:NAME)",
        description="vialign prompts list | vialign prompts get NAME [NAME ...] [--url URL]",
    )
    prompts.add_argument("action", choices=["list", "get"], help="list the sets, or download some")
    prompts.add_argument("names", nargs="*", help="prompt sets to download (get)")
    prompts.add_argument("--url", help="get: download from this mirror instead (one name only)")
    precompute = commands.add_parser(
        "precompute-embeds",
        help="encode a training run's prompts once, for model.prompt_embeds (trains without text encoders)",
        description="Encode every prompt a training run of --config encodes (data.train, data.eval and "
        "eval.regression_prompts when it evaluates, refl.regularizer_data captions, the empty prompt), plus "
        "--prompt/--prompts, into --out (default the config's model.prompt_embeds): a .safetensors file, or "
        "else a folder of them. "
        "A run with model.prompt_embeds=PATH then never loads the text encoders. An existing PATH of the "
        "same model is extended (its rows are kept; only new prompts are encoded).",
    )
    precompute.add_argument("--config", help="the training run's YAML config (keys of TrainConfig)")
    precompute.add_argument("--model", help="model.path (default: the config's)")
    precompute.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    precompute.add_argument(
        "--prompts", action="append", metavar="SPEC", help="prompts in any form data.train takes (repeatable)"
    )
    precompute.add_argument(
        "--out",
        metavar="PATH",
        help="model.prompt_embeds to write: a .safetensors file, or else a folder of files of 1024 prompts",
    )
    precompute.add_argument("--dtype", help="model.dtype: must be the training run's")
    precompute.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    return parser


PRECOMPUTE_FLAGS = {
    "model": ("model.path", "--model"),
    "out": ("model.prompt_embeds", "--out"),
    "dtype": ("model.dtype", "--dtype"),
    "device": ("model.device", "--device"),
}


def cmd_precompute_embeds(args: argparse.Namespace) -> int:
    from vialign.config import TrainConfig, load_config
    from vialign.data import load_prompts
    from vialign.precompute import EMPTY_PROMPT, precompute_embeds, run_prompts

    config = load_config(
        TrainConfig,
        args.config,
        args.overrides,
        _flag_values(args, PRECOMPUTE_FLAGS),
        flags={key: flag for key, flag in PRECOMPUTE_FLAGS.values()},
    )
    out = config.model.prompt_embeds
    if out is None:
        raise VialignInputError("say where to write the embeddings: --out FILE (or model.prompt_embeds)")
    prompts = run_prompts(config) if args.config else [EMPTY_PROMPT]
    for spec in args.prompts or []:
        prompts += load_prompts(spec, config.data.prompt_column)
    prompts += args.prompt or []
    if not args.config and not (args.prompts or args.prompt):
        raise VialignInputError("nothing to precompute: pass --config (the run's) or --prompts/--prompt")
    _quiet_libraries()
    report = precompute_embeds(config, prompts, out)
    print(
        f"wrote {report.path}: {report.prompts} prompts ({report.encoded} encoded now, {report.kept} kept "
        f"from the file); train with model.prompt_embeds={report.path}"
    )
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from vialign.prompt_data import PROMPT_SETS, cache_dir, fetch_prompt_set

    if args.action == "list":
        for name, entry in PROMPT_SETS.items():
            where = (
                "shipped"
                if entry.shipped
                else ("fetched" if (cache_dir() / f"{name}{entry.suffix}").is_file() else "not fetched")
            )
            print(f"prompts:{name:<22} {where:<12} {entry.description}")
        return 0
    if not args.names:
        raise VialignInputError("vialign prompts get needs the names of prompt sets (vialign prompts list)")
    if args.url and len(args.names) != 1:
        raise VialignInputError("--url names one file: pass one prompt set with it")
    for name in args.names:
        print(f"prompts:{name} -> {fetch_prompt_set(name, url=args.url)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vialign.config import TrainConfig, load_config
    from vialign.trainer import run_train

    config = load_config(TrainConfig, args.config, args.overrides)
    _quiet_libraries()
    try:
        metrics = run_train(config, resume=args.resume)
    except Exception as error:
        _end_failed_process(error)  # several processes: never returns
        raise
    shown = {
        k: round(v, 4) for k, v in metrics.items() if k in ("reward/mean", "loss") or k.startswith("eval/")
    }
    print(f"final step: {shown}")
    print(f"wrote {Path(config.output_dir) / 'final'} and {Path(config.output_dir) / 'metrics.jsonl'}")
    return 0


def _end_failed_process(error: Exception) -> None:
    """In a run of several processes, end this one now, so that no other waits for it in a collective;
    return in a one-process run. The process that failed prints its error as ``main`` would (one line
    for bad input, else the traceback), once even when several processes fail the same way; a process
    stopped because another failed prints one line naming it."""
    from vialign import distributed

    rank = distributed.process_group_rank()
    if rank is None:
        return
    debug = bool(os.environ.get("VIALIGN_DEBUG"))
    if distributed.raised_by_collective(error) and not debug:
        first = distributed.first_failure()
        if first is None or first[0] != rank:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            cause = (
                f"process {first[0]} failed (its error is printed above)"
                if first
                else f"another process ended or stopped answering ({reason[:200]})"
            )
            print(f"vialign: error: process {rank} stopped: {cause}", file=sys.stderr)
            distributed.exit_now(1)
    user_error = isinstance(error, INPUT_ERRORS) and not debug
    message = f"vialign: error: {error}" if user_error else "".join(traceback.format_exception(error))
    first = distributed.record_failure(rank, message)
    if first is None or first[1] != message:  # another process printed the same: once is enough
        print(message.rstrip("\n"), file=sys.stderr)
    distributed.exit_now(2 if user_error else 1)


EVAL_FLAGS = {
    "model": ("model.path", "--model"),
    "lora": ("model.lora", "--lora"),
    "prompts": ("prompts", "--prompts"),
    "samples_per_prompt": ("samples_per_prompt", "--samples-per-prompt"),
    "num_steps": ("sampler.num_steps", "--num-steps"),
    "guidance_scale": ("sampler.guidance_scale", "--guidance-scale"),
    "sampler": ("sampler.kind", "--sampler"),
    "sde_kind": ("sampler.sde_kind", "--sde-kind"),
    "seed": ("seed", "--seed"),
    "reward": ("rewards", "--reward"),
    "out": ("out", "--out"),
    "overwrite": ("overwrite", "--overwrite"),
}


def cmd_eval(args: argparse.Namespace) -> int:
    from vialign.config import EvalConfig, load_config
    from vialign.eval import run_eval

    config = load_config(
        EvalConfig,
        args.config,
        args.overrides,
        _flag_values(args, EVAL_FLAGS),
        flags={key: flag for key, flag in EVAL_FLAGS.values()},
    )
    _quiet_libraries()
    result = run_eval(config)
    attributes = ", ".join(f"{k} {v:.3f}" for k, v in result["per_attribute"].items())
    print(
        f"oracle accuracy {result['oracle_accuracy']:.3f} on {result['num_samples']} samples of "
        f"{result['num_prompts']} {config.prompts} prompts ({attributes}); clip diversity {result['clip_diversity']}, pixel diversity {result['pixel_diversity']}"
    )
    for name, value in result["rewards"].items():
        print(f"  {name}: {value:.4f}")
    print(f"wrote {Path(config.out) / 'eval.json'} and grid.png")
    return 0


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

    values = _flag_values(args, SAMPLE_FLAGS)
    rewards_given = _reward_flags(args)
    if rewards_given:
        values["steer.rewards"] = rewards_given
    config = load_config(
        SampleConfig,
        args.config,
        args.overrides,
        values,
        flags={key: flag for key, flag in SAMPLE_FLAGS.values()},
    )
    _quiet_libraries()
    try:
        report = run_sample(config, progress=True)
    except Exception as error:
        _end_failed_process(error)  # several processes: never returns
        raise
    if not report.main_process:  # under accelerate launch / torchrun the main process reports
        return 0
    if report.num_frames is not None:
        what = f"videos ({report.width}x{report.height}, {report.num_frames} frames at {report.fps} fps)"
    else:
        what = f"images ({report.width}x{report.height})"
    print(f"wrote {len(report.files)} {what} and {report.out / 'samples.jsonl'}")
    return 0


SCORE_FLAGS = {
    "images": ("images", "--images"),
    "prompts": ("prompts_file", "--prompts"),
    "prompts_from": ("prompts_from", "--prompts-from"),
    "batch_size": ("batch_size", "--batch-size"),
    "out": ("out", "--out"),
    "frames": ("frames", "--frames"),
    "num_frames": ("num_frames", "--num-frames"),
    "device": ("device", "--device"),
    "overwrite": ("overwrite", "--overwrite"),
    "resume": ("resume", "--resume"),
}


def _reward_flags(args: argparse.Namespace) -> dict[str, dict]:
    """``--reward NAME[=WEIGHT]`` and ``--reward-option NAME.KEY=VALUE`` as the config's ``rewards`` mapping."""
    from vialign.config import parse_override

    specs: dict[str, dict] = {}
    for text in args.reward or []:
        name, _, weight = text.partition("=")
        try:
            specs[name.strip()] = {"weight": float(weight) if weight else 1.0, "options": {}}
        except ValueError:
            raise VialignInputError(f"--reward {text}: the weight after '=' must be a number") from None
    for text in args.reward_option or []:
        target, _, _ = text.partition("=")
        name, dot, key = target.rpartition(".")
        if not dot or not name or not key.strip() or name not in specs:
            raise VialignInputError(
                f"--reward-option {text}: write NAME.KEY=VALUE for a reward given with --reward ({', '.join(specs) or 'none'})"
            )
        specs[name]["options"][key] = parse_override(f"{key}={text.partition('=')[2]}")[1]
    return specs


def cmd_score(args: argparse.Namespace) -> int:
    from vialign.config import ScoreConfig, load_config

    if args.list_rewards:
        import rewards

        for info in rewards.list_rewards():
            low, high = info.typical_range
            print(
                f"{info.name:24s} {'differentiable' if info.differentiable else 'no gradients':15s} "
                f"{info.modality:12s} {info.scale} (typically {low:g}..{high:g})"
                + (f"; loads {info.default_checkpoint}" if info.default_checkpoint else "")
            )
        return 0
    values = _flag_values(args, SCORE_FLAGS)
    rewards_given = _reward_flags(args)
    if rewards_given:
        values["rewards"] = rewards_given
    config = load_config(
        ScoreConfig,
        args.config,
        args.overrides,
        values,
        flags={key: flag for key, flag in SCORE_FLAGS.values()},
    )
    from vialign.score import run_score

    _quiet_libraries()
    try:
        report = run_score(config, progress=True)
    except Exception as error:
        _end_failed_process(error)  # several processes: never returns
        raise
    if not report.main_process:  # under accelerate launch / torchrun the main process reports
        return 0
    print(report.summary())
    print(f"wrote {config.out}")
    return 0


_OWN_LOGGERS = ("vialign", "pipelines", "rewards")


class _StderrOnce(logging.StreamHandler):
    """The root's handler: vialign's records as ``vialign: MESSAGE``, other libraries' as they are.

    huggingface_hub prints through a handler of its own *and* propagates to the root, so a plain root
    handler showed each of its lines twice (an unreachable hub printed every retry twice). Records that
    a handler below the root already printed are skipped here; libraries that only attach a
    ``NullHandler`` (urllib3) still get their warnings shown, once.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
                return False
            logger = logger.parent  # type: ignore[assignment]
        return super().filter(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"vialign: {text}" if record.name.split(".")[0] in _OWN_LOGGERS else text


def _setup_logging() -> None:
    """vialign's INFO lines and every library's warnings on stderr, each once.

    Like ``logging.basicConfig``, this leaves a program that configured logging itself (the root
    already has handlers, as under pytest) alone.
    """
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_StderrOnce())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # whatever argparse did not recognise must be key=value overrides
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides are written key=value)")
    args.overrides = rest
    _setup_logging()
    try:
        commands = {
            "sample": cmd_sample,
            "score": cmd_score,
            "eval": cmd_eval,
            "train": cmd_train,
            "prompts": cmd_prompts,
            "precompute-embeds": cmd_precompute_embeds,
        }
        return commands[args.command](args)
    except INPUT_ERRORS as error:
        if os.environ.get("VIALIGN_DEBUG"):
            raise
        print(f"vialign: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vialign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
