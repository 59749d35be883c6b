"""``lowmem-es replay``: rebuild an adapter from the initial adapter and the journal, and
verify it against the run's checkpoint (``journal.replay_journal``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowmem_es.config import ESConfig


def add_replay_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``replay`` sub-command's parser."""
    replay = subparsers.add_parser("replay", help="rebuild an adapter from the initial "
                                   "adapter and the journal, and verify it against the "
                                   "checkpoint")
    replay.add_argument("output_dir", help="a run's output directory")
    replay.add_argument("--step", type=int, default=None,
                        help="iterations to replay (default: the whole journal)")
    replay.add_argument("--from", dest="start", choices=("initial", "nearest"),
                        default="initial", help="replay from step 0 (default, checks the "
                        "whole journal) or from the nearest valid checkpoint")
    replay.add_argument("--out", default=None,
                        help="write the rebuilt adapter here (default: OUTPUT_DIR/replay/"
                        "step_NNNNNN)")
    return replay


def cmd_replay(ns: argparse.Namespace) -> int:
    from lowmem_es import adapter_io, checkpoint, journal

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
    result = journal.replay_journal(out, ns.step, start=ns.start,
                                       noise_backend=noise_backend)
    if destination is None:
        destination = out / "replay" / f"step_{result.step:06d}"
    source = checkpoint.step_dir(out, result.start_step)
    adapter_io.write_adapter_tensors(result.params, source, destination)
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
    written (``adapter_io.check_adapter_destination``)."""
    from lowmem_es.adapter_io import check_adapter_destination

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
