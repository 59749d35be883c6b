"""``lowmem-es train``: the embedded default, the tiny example, or a run on your model.

With no ``--model`` it runs the embedded default (``default_model.run_default``);
``--example tiny`` the tiny built-in example; otherwise ``--model`` with ``--task`` or
``--dataset``. The output_dir is checked and locked before any model work, so a clash
costs seconds; a run stopped early prints the command that resumes it (a torchrun one
under torchrun).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from lowmem_es.cli.common import add_config_flags, resolve_config
from lowmem_es.config import ESConfig

logger = logging.getLogger("lowmem_es")


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``train`` sub-command's parser: model and data flags plus every ESConfig field."""
    train = subparsers.add_parser("train", help="fine-tune a LoRA adapter with ES")
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
    return train


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
            from lowmem_es import run_dir

            run_dir.unlock_run(_CLI_LOCKS.pop())


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
        from lowmem_es.rewards.functions import target_fraction

        config = resolve_config(ns, defaults=dict(example.EXAMPLE_CONFIG,
                                                  output_dir="runs/tiny-example"))
        logger.info("no --model given: running the tiny built-in example (random tiny Llama "
                    "learns to emit %r) in %s", example.TARGET, config.output_dir)
        _claim_output_dir(config, ns)  # before writing base-model/ into it
        base = Path(config.output_dir) / "base-model"
        distributed.setup(config.distributed_timeout, resolve_device(config.device))
        if distributed.is_main():  # under torchrun one rank writes, the others wait
            example.ensure_tiny_model(base)
        distributed.barrier()
        data = example.tiny_dataset()
        trainer = ESTrainer(str(base), [target_fraction], train_dataset=data,
                            eval_dataset=data, args=config, **_run_flags(ns))
    else:
        from lowmem_es.data import fit_prompts
        from lowmem_es.tasks import get_task
        from lowmem_es.tasks.jsonl import check_dataset_splits, dataset_task

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


def _claim_output_dir(config: ESConfig, ns: argparse.Namespace) -> None:
    """Before any model work: refuse what training into output_dir would refuse
    (``check_output_dir``), then take its lock (on rank 0 of a launcher's job, by its
    RANK: before the process group exists), so that a second start is refused at once,
    not after its model load and first evaluation; held until ``cmd_train`` returns
    (``train()`` finds it held)."""
    from lowmem_es import run_dir
    from lowmem_es.run_dir import check_output_dir

    check_output_dir(config, **_run_flags(ns))
    if os.environ.get("RANK", "0") == "0" and run_dir.lock_run(Path(config.output_dir)):
        _CLI_LOCKS.append(Path(config.output_dir))


_CLI_LOCKS: list[Path] = []  # the output_dir lock cmd_train took (released on return)


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

