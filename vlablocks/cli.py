"""The ``vlablocks`` command.

    vlablocks recipes | show RECIPE | check RECIPE           compose and inspect (RECIPE may be a checkpoint directory)
    vlablocks data metaworld --tasks ... --episodes N --out DIR
    vlablocks train RECIPE|CHECKPOINT --data DIR [--steps N] [--out RUN] [key=value ...] [train.finetune=lora ...]
    vlablocks eval RUN --env metaworld --tasks ... --episodes N [--video] [--server ws://H:P] [--strategy S --delay D]
    vlablocks export RUN_OR_CHECKPOINT OUT [--lerobot [DIR]]     a plain (or LeRobot-layout) checkpoint, LoRA merged
    vlablocks convert lerobot DIR_OR_HUB_ID OUT [--tokenizer T]  a LeRobot pi0 / pi0.5 / SmolVLA policy -> vlablocks
    vlablocks report RUN [--data DIR] [--samples N]            loss by flow time, action errors, gradients
    vlablocks bench RECIPE [--device cpu|cuda] [--dtype fp32|bf16] [--compile [step|chunk]] [--batch B] [--steps N]
                   [--prompt-tokens N | --prompts FILE_OR_DATASET] [--fuse] [--quantize int8] [--json FILE]
                                                                 min / median / max timings
    vlablocks serve CHECKPOINT [--host H] [--port P] [--device D] [--compile] [--fuse] [--quantize int8]
                   [--obs-map FILE]                               openpi's websocket protocol
    vlablocks --debug COMMAND ...                                full tracebacks (or VLABLOCKS_DEBUG=1)

RECIPE is a bundled recipe name or a path to a YAML file; ``key.path=value`` arguments override
recipe keys, and ``train.FIELD=value`` overrides a training setting (``vlablocks.train.config.TrainConfig``).

A mistake is answered with one line on stderr, ``vlablocks COMMAND: what, where, what to do``:
exit status 2 for a usage error (an unknown option, a value out of range), 1 for a failure (a
bad recipe, dataset, run directory or file: the types in :data:`USER_ERRORS`). ``--debug`` (or
``VLABLOCKS_DEBUG=1``) re-raises with the traceback; any other exception is a bug and keeps its
traceback, followed by a line asking to report it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from vlablocks.convert.command import add_convert_command
from vlablocks.convert.lerobot import check_new_directory
from vlablocks.convert.common import ConversionError
from vlablocks.convert.lerobot_export import converted_source, export_lerobot
from vlablocks.data import ACTION, STATE, DataSelection
from vlablocks.data.format import VERSIONS
from vlablocks.data.table import EpisodeError
from vlablocks.envs import ENVS
from vlablocks.envs.metaworld.tasks import CAMERAS, STATE_LAYOUTS
from vlablocks.eval.policy import STRATEGIES
from vlablocks.eval.run import evaluate_run, format_results
from vlablocks.io.manifest import CheckpointError
from vlablocks.policy.batch import BatchError
from vlablocks.policy.checks import smoke_check
from vlablocks.policy.vla import RECIPE_FILE, VLA, NonFiniteActionError
from vlablocks.recipes.builder import build, from_pretrained
from vlablocks.recipes.loader import Recipe, RecipeError, bundled_recipes, load_recipe
from vlablocks.serve.client import RemotePredictor
from vlablocks.serve.command import add_serve_command
from vlablocks.tools.bench import format_table, run_bench, write_result
from vlablocks.tools.bench_command import add_bench_command, bench_settings
from vlablocks.tools.report import build_report, format_report, write_report
from vlablocks.train.checkpoint import LatestPointerError
from vlablocks.train.config import TrainConfig, train_config
from vlablocks.train.export import export_checkpoint, merged_policy
from vlablocks.train.groups import apply_finetune
from vlablocks.train.trainer import TrainingDiverged
from vlablocks.train.workflow import init_directory, train_from_recipe

logger = logging.getLogger("vlablocks")

#: ``check`` refuses to run on CPU above this many parameters unless ``--force``.
CHECK_PARAMETER_LIMIT = 300_000_000
#: exit status of ``train`` stopped by SIGTERM after its checkpoint (128 + 15, as a shell reports it).
EXIT_TERMINATED = 143
#: exit status of a usage error (argparse's) and of a failure answered with one line.
EXIT_USAGE, EXIT_FAILURE = 2, 1
#: set to 1 to re-raise errors with their traceback, as ``--debug`` does.
DEBUG_ENV = "VLABLOCKS_DEBUG"
#: errors of the toolkit and of its input, answered with one line (the named ``ValueError``
#: subclasses are listed for the reader: ``ValueError`` covers them).
USER_ERRORS: tuple[type[Exception], ...] = (
    RecipeError, BatchError, CheckpointError, EpisodeError, LatestPointerError, TrainingDiverged, NonFiniteActionError,
    ConversionError,
    FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
    ValueError, TypeError, KeyError,
)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


class UsageError(Exception):
    """A command line argparse (or the CLI) refuses; its message is already one line."""


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line naming the (sub)command, not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {one_line(message)} (see {self.prog} --help)")


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (each stripped, empty ones dropped)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe_error(err: BaseException) -> str:
    """One line for a user error: the message, the file an ``OSError`` names, the key of a ``KeyError``."""
    if isinstance(err, RecipeError):
        return f"recipe error: {one_line(str(err))}"
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err.strerror or ""):
        return one_line(f"{err.filename}: {err.strerror or type(err).__name__}")
    if isinstance(err, KeyError) and len(err.args) == 1:
        key = err.args[0]
        return one_line(key if isinstance(key, str) and " " in key else f"missing key {key!r}")
    return one_line(str(err)) or type(err).__name__


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type=`` for integers ``>= low``: argparse names the option in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def parameter_table(vla: VLA) -> list[tuple[str, int, int]]:
    """``(block, trainable, frozen)`` rows from the policy's declared groups
    (:meth:`~vlablocks.policy.vla.VLA.param_groups`), the base's layers summed as ``backbone.<name>``."""
    base = vla.backbone.experts[0].name
    totals: dict[str, list[int]] = {}
    for group, params in vla.param_groups().items():
        if group.startswith("backbone."):
            group = f"backbone.{base}"
        elif group.startswith("experts."):
            group = "backbone." + group.removeprefix("experts.")
        row = totals.setdefault(group, [0, 0])
        for p in params.values():
            row[0 if p.requires_grad else 1] += p.numel()
    return [(name, trainable, frozen) for name, (trainable, frozen) in totals.items()]


def _load_checked(args: argparse.Namespace) -> tuple[Recipe, TrainConfig, Path | None]:
    """The recipe with its overrides, its training settings (validated here: ``vlablocks train``
    would refuse them later) and, for a checkpoint directory given as the recipe, that directory
    (its recipe's relative paths, e.g. ``tokenizer``, are inside it)."""
    directory = init_directory(args.recipe)
    source = args.recipe if directory is None else directory / RECIPE_FILE
    recipe = load_recipe(source, [o for o in args.overrides if not o.startswith("train.")])
    return recipe, train_config(recipe, [o for o in args.overrides if o.startswith("train.")]), directory


def cmd_recipes(_: argparse.Namespace) -> int:
    for name, path in bundled_recipes().items():
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        _out(f"{name:32s} {str(description).strip().splitlines()[0] if description else ''}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    recipe, config, directory = _load_checked(args)
    _out(f"# recipe {recipe.name} (resolved)")
    _out(yaml.safe_dump(recipe.data, sort_keys=False).rstrip())
    vla = build(recipe, load_weights=False, device="meta", base_dir=directory)
    groups = apply_finetune(vla, config)  # LoRA adapters are built on the meta device too
    if args.tree:
        _out("\n# modules")
        _out(str(vla))
    table = parameter_table(vla)
    trainable, total = sum(row[1] for row in table), sum(row[1] + row[2] for row in table)
    _out(f"\n# fine-tuning: {config.finetune} (trainable parameters by optimizer group)")
    for group in groups:
        _out(f"{group.name:28s} {sum(p.numel() for p in group.params.values()):16,d}   lr {group.lr:.3g}")
    _out(f"{'trainable':28s} {trainable:16,d}   ({trainable / max(1, total):.2%} of {total:,})")
    _out("\n# parameters")
    _out(f"{'block':28s} {'trainable':>16s} {'frozen':>16s}")
    for name, block_trainable, frozen in table:
        _out(f"{name:28s} {block_trainable:16,d} {frozen:16,d}")
    _out(f"{'total':28s} {trainable:16,d} {total - trainable:16,d}   ({total / 1e9:.3f} B)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    recipe, _, directory = _load_checked(args)
    meta = build(recipe, load_weights=False, device="meta", base_dir=directory)
    count = sum(p.numel() for p in meta.parameters())
    if count > CHECK_PARAMETER_LIMIT and not args.force:
        _out(f"{recipe.name} has {count:,} parameters: too many for a CPU check (limit {CHECK_PARAMETER_LIMIT:,}); "
             f"check its tiny_ sibling, or pass --force")
        return 2
    vla = build(recipe, base_dir=directory) if directory is None else from_pretrained(directory)
    report = smoke_check(vla, batch_size=args.batch)
    _out(f"recipe          {recipe.name} ({count:,} parameters)")
    _out(f"prefix tokens   {report.prefix_length}")
    _out(f"loss            {report.loss:.4f}   vel_cosine {report.vel_cosine:.3f}")
    _out(f"forward         {report.forward_ms:.1f} ms   backward {report.backward_ms:.1f} ms (batch {args.batch})")
    _out(f"predict_action  {list(report.action_shape)} in {report.predict_ms:.1f} ms")
    if report.parameters_without_grad:
        _out(f"note: {len(report.parameters_without_grad)} trainable tensors get no gradient from the action loss "
             f"(e.g. {report.parameters_without_grad[0]}): weights of the prefix or state streams above the last layer the action expert reads")
    _out("ok")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from vlablocks.envs.metaworld.demos import generate_demos  # optional: the sim extra (metaworld, mujoco)

    out = generate_demos(
        [t.strip() for t in args.tasks.split(",") if t.strip()], args.episodes, args.out, image_size=args.image_size,
        camera=args.camera, depth=args.depth, seed=args.seed, overwrite=args.overwrite, workers=args.workers,
        state=args.state, video=args.video, version=args.format,
    )
    _out(f"dataset written to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    run = train_from_recipe(
        args.recipe, args.data, out=args.out, overrides=args.overrides, steps=args.steps, resume=args.resume,
        skip_bad_episodes=args.skip_bad_episodes, move_aside=args.move_aside,
        selection=DataSelection(cameras=None if args.cameras is None else tuple(c.strip() for c in args.cameras.split(",")),
                                state_key=args.state_key, action_key=args.action_key,
                                recompute_stats=args.recompute_stats),
    )
    _out(f"run directory: {run.out_dir}")
    if run.interrupted:
        _out(f"stopped by SIGTERM at step {int(run.metrics.get('step', 0))}; checkpoint: {run.checkpoint}; "
             "continue with the same command and --resume")
        return EXIT_TERMINATED
    _out(f"final loss {run.metrics.get('loss', float('nan')):.4f}; curves: {run.out_dir / 'curves.png'}; "
         f"checkpoint: {run.checkpoint}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    remote = None if args.server is None else RemotePredictor(args.server)
    results = evaluate_run(
        args.run, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], episodes=args.episodes,
        execute_steps=args.execute_steps, video=args.video, use_ema=args.ema, seed=args.seed, verify=args.verify,
        workers=args.workers, env=args.env, predictor=remote, predictor_name=args.server or "in-process",
        strategy=args.strategy, delay=args.delay,
    )
    _out(format_results(results))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.lerobot is None:
        out = export_checkpoint(args.checkpoint, args.out, use_ema=args.ema, verify=args.verify)
        _out(f"exported to {out} (a plain vlablocks checkpoint: model.safetensors, recipe.yaml, manifest.json)")
        return 0
    check_new_directory(args.out)  # before loading the policy
    vla, source = merged_policy(args.checkpoint, use_ema=args.ema, verify=args.verify)
    converted = converted_source(source) if args.lerobot == "" else args.lerobot
    out = export_lerobot(vla, converted, args.out)
    _out(f"exported to {out} in LeRobot's layout (config.json, model.safetensors, processors; from {converted})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report = build_report(args.run, data=args.data, samples=args.samples, batch_size=args.batch,
                          t_bins=args.t_bins, use_ema=args.ema, seed=args.seed, verify=args.verify)
    out = write_report(report, args.out)
    _out(format_report(report))
    _out(f"written to {out}/ (report.md, report.json, report.png)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        settings = bench_settings(args)
    except ValueError as err:  # the settings are checked before anything runs: a usage error
        _err(f"vlablocks bench: {one_line(str(err))} (see vlablocks bench --help)")
        return EXIT_USAGE
    result = run_bench(args.recipe, args.overrides, settings, progress=lambda m: sys.stderr.write(f"bench: {m}\n"))
    _out(format_table(result))
    if args.json:
        write_result(result, args.json)
        _out(f"\nwritten to {args.json}")
    return 0


def _add_inspect_commands(sub: Any) -> None:
    """``recipes``, ``show``, ``check``."""
    sub.add_parser("recipes", help="list the bundled recipes").set_defaults(fn=cmd_recipes)
    show = sub.add_parser("show", help="resolved recipe, module tree and parameters per block")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*", help="key.path=value")
    show.add_argument("--no-tree", dest="tree", action="store_false", help="omit the module tree")
    show.set_defaults(fn=cmd_show)
    check = sub.add_parser("check", help="build, one loss + backward + predict_action on random inputs")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*", help="key.path=value")
    check.add_argument("--batch", type=positive_int, default=2)
    check.add_argument("--force", action="store_true", help=f"run even above {CHECK_PARAMETER_LIMIT:,} parameters")
    check.set_defaults(fn=cmd_check)


def _add_data_commands(sub: Any) -> None:
    """``data metaworld``."""
    data = sub.add_parser("data", help="generate a dataset")
    data_sub = data.add_subparsers(dest="source", required=True)
    mw = data_sub.add_parser("metaworld", help="Meta-World scripted-expert demos in the LeRobot layout")
    mw.add_argument("--tasks", required=True, help="comma-separated Meta-World v3 task names")
    mw.add_argument("--episodes", type=positive_int, required=True, help="successful episodes per task (layouts 0..N-1)")
    mw.add_argument("--out", required=True)
    mw.add_argument("--image-size", type=positive_int, default=128)
    mw.add_argument("--camera", default="corner", choices=list(CAMERAS))
    mw.add_argument("--depth", action="store_true", help="also record depth (with intrinsics and pose)")
    mw.add_argument("--state", default="proprio", choices=list(STATE_LAYOUTS),
                    help="the state vector: hand xyz + gripper opening, or that + the goal xyz "
                         "(as Meta-World's MT benchmarks observe it)")
    mw.add_argument("--video", action="store_true",
                    help="store the camera frames as AV1 mp4 (LeRobot's default; smaller, decoded when read) instead of PNG")
    mw.add_argument("--format", default="v3.0", choices=list(VERSIONS),
                    help="LeRobot dataset format: v3.0 (LeRobot 0.4+, the default) or v2.1 (LeRobot 0.3)")
    mw.add_argument("--seed", type=int, default=0)
    mw.add_argument("--overwrite", action="store_true",
                    help="replace the dataset in --out once the new one is complete (a directory that is not one is refused)")
    mw.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                    help="simulator processes (default: one per CPU; the dataset does not depend on it)")
    mw.set_defaults(fn=cmd_data)


def _add_train_command(sub: Any) -> None:
    """``train``."""
    train = sub.add_parser(
        "train", help="train a recipe on a LeRobot-layout dataset",
        description="Train a recipe. On SIGTERM the current step finishes, a checkpoint is written and the "
                    f"command exits with status {EXIT_TERMINATED}; rerun it with --resume to continue.")
    train.add_argument("recipe", help="a bundled recipe name, a recipe file, or a checkpoint directory to start from")
    train.add_argument("overrides", nargs="*", help="key.path=value (recipe) or train.FIELD=value (training)")
    train.add_argument("--data", required=True,
                       help="a LeRobot dataset (v3.0 or v2.1) directory, or a Hub dataset id such as lerobot/pusht")
    train.add_argument("--cameras", default=None,
                       help="comma-separated cameras to read (front or observation.images.front; default: all)")
    train.add_argument("--state-key", default=STATE, help=f"the feature read as the state (default {STATE})")
    train.add_argument("--action-key", default=ACTION, help=f"the feature read as the actions (default {ACTION})")
    train.add_argument("--recompute-stats", action="store_true",
                       help="compute the state and action statistics from the frames instead of meta/stats")
    train.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (overrides train.steps)")
    train.add_argument("--out", default=None, help="run directory (default runs/<recipe>)")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument("--move-aside", action="store_true",
                       help="rename a run already in --out to OUT.old-<timestamp> (nothing is deleted) and start a new one")
    train.add_argument("--skip-bad-episodes", action="store_true",
                       help="leave out episodes that cannot be read (missing, truncated, NaN) instead of stopping; "
                            "they are logged and listed in data.json")
    train.set_defaults(fn=cmd_train)


def _add_eval_command(sub: Any) -> None:
    """``eval``, ``export``."""
    evaluate = sub.add_parser("eval", help="closed-loop evaluation of a trained run")
    evaluate.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint directory")
    evaluate.add_argument("--env", choices=sorted(ENVS), default="metaworld")
    evaluate.add_argument("--tasks", required=True)
    evaluate.add_argument("--episodes", type=positive_int, default=10)
    evaluate.add_argument("--execute-steps", type=positive_int, default=None,
                          help="actions executed per predicted chunk (default: 8, or the policy's horizon if shorter)")
    evaluate.add_argument("--video", action="store_true", help="write one video per episode")
    evaluate.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    evaluate.add_argument("--no-verify", dest="verify", action="store_false",
                        help="load a checkpoint that has no manifest.json, without checking its files (logged)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--server", default=None, metavar="ws://HOST:PORT",
                          help="take the actions from a policy server (vlablocks serve) instead of RUN's policy")
    evaluate.add_argument("--strategy", choices=sorted(STRATEGIES), default="sync",
                          help="how chunks execute (docs/deployment.md): sync, async, rtc (real-time chunking), ensemble")
    evaluate.add_argument("--delay", type=int_at_least(0), default=0, help="simulated inference delay, control steps")
    evaluate.add_argument("--workers", type=positive_int, default=1,
                          help="rollout processes, each with a copy of the policy (results do not depend on it)")
    evaluate.set_defaults(fn=cmd_eval)

    export = sub.add_parser("export", help="a plain vlablocks checkpoint from a run or checkpoint (LoRA adapters merged)")
    export.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint directory")
    export.add_argument("out", help="a new directory (or an earlier export, which is replaced)")
    export.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights, not the EMA")
    export.add_argument("--no-verify", dest="verify", action="store_false",
                        help="load a checkpoint that has no manifest.json, without checking its files (logged)")
    export.add_argument("--lerobot", nargs="?", const="", default=None, metavar="CONVERTED",
                        help="write LeRobot's layout (config.json, model.safetensors, processors) for a policy converted "
                             "from LeRobot; CONVERTED is the directory `vlablocks convert lerobot` wrote (default: the "
                             "checkpoint itself or its run's starting directory)")
    export.set_defaults(fn=cmd_export)


def _add_tool_commands(sub: Any) -> None:
    """``report``, ``bench``."""
    report = sub.add_parser("report", help="why a run's loss is where it is: loss by flow time, action errors")
    report.add_argument("run", help="a training run directory")
    report.add_argument("--data", default=None, help="dataset (default: the one the run trained on)")
    report.add_argument("--samples", type=positive_int, default=256, help="dataset items to evaluate")
    report.add_argument("--batch", type=positive_int, default=32)
    report.add_argument("--t-bins", type=positive_int, default=10, help="flow-time bins")
    report.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    report.add_argument("--no-verify", dest="verify", action="store_false",
                        help="load a checkpoint that has no manifest.json, without checking its files (logged)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--out", default=None, help="output folder (default RUN/report)")
    report.set_defaults(fn=cmd_report)

    add_bench_command(sub, handler=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``vlablocks`` parser with every subcommand."""
    parser = _Parser(prog="vlablocks", description="Compose, inspect, train, evaluate and measure VLA recipes.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_inspect_commands, _add_data_commands, _add_train_command, _add_eval_command, _add_tool_commands,
                add_serve_command, add_convert_command):
        add(sub)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments; ``key=value`` overrides may also come after options (``train R --data D
    k=v``): argparse leaves those over. UsageError for anything it cannot place."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        prog = f"vlablocks {args.command}" + (f" {args.source}" if getattr(args, "source", None) else "")
        if not hasattr(args, "overrides") or not all("=" in item and not item.startswith("-") for item in extra):
            raise UsageError(f"{prog}: unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring for errors)."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        args = parse_args(argv)
    except UsageError as err:
        _err(str(err))
        return EXIT_USAGE
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    debug = debug or args.debug
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = " ".join(["vlablocks", args.command, *([args.source] if getattr(args, "source", None) else [])])
    try:
        return args.fn(args)
    except USER_ERRORS as err:
        if debug:
            raise
        _err(f"{command}: {describe_error(err)}")
        return EXIT_FAILURE
    except Exception as err:
        if debug:
            raise
        traceback.print_exc()
        _err(f"{command}: internal error ({type(err).__name__}: {one_line(str(err))}): this is a bug; "
             "please report it with the traceback above")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
