"""A run's output directory: its layout, its lock, and what may be started in it.

    output_dir/  run.toml  plan.json  journal.jsonl  metrics.jsonl  reward.png
                 checkpoints/step_NNNNNN/  adapter/  .lowmem-es.lock

``check_output_dir`` decides, reading files only, whether a start may go on (a new run,
``--resume`` of the same configuration, model and data, or ``--overwrite``); it is cheap,
so every entry point calls it before loading a model. ``lock_run`` keeps one process per
directory. ``run_identity`` is what a run trained on (recorded in every checkpoint and
compared on resume). The metrics file is a log resume does not need: ``read_metrics``
salvages a damaged one and ``metrics_entry`` rebuilds a lost line from the journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from lowmem_es import checkpoint
from lowmem_es.atomic import rewrite_jsonl
from lowmem_es.config import NON_RESULT_FIELDS, ESConfig
from lowmem_es.errors import CheckpointError
from lowmem_es.journal import is_record, read_journal
from lowmem_es.lora import ESLoraModel
from lowmem_es.rewards.functions import RewardFunc
from lowmem_es.rewards.scoring import reward_path

logger = logging.getLogger("lowmem_es")

JOURNAL = "journal.jsonl"
METRICS = "metrics.jsonl"
RUN_CONFIG = "run.toml"
PLAN = "plan.json"
PLOT = "reward.png"
ADAPTER = "adapter"


def run_identity(model: str | os.PathLike | ESLoraModel, train_dataset: Sequence[dict],
                 reward_funcs: Sequence[RewardFunc] | None = None) -> dict[str, Any]:
    """What a run trains on, recorded in its checkpoints and compared on resume.

    ``base_model``: the model directory (absolute, when it is a local directory) or hub id;
    ``base_model_config_sha256``: sha256 of its config.json (of the loaded config for an
    ``ESLoraModel`` without a local directory; None when neither exists); ``train_rows``
    and ``train_data_sha256``: the number of training rows and the sha256 of their JSON;
    ``reward_functions``: each reward function as ``module:qualified_name`` (the objective;
    its weights are in the configuration). The weights and the functions' code are not
    hashed; the path, config and names stand for them.
    """
    config_text: bytes | None = None
    if isinstance(model, ESLoraModel):
        name = model.base_model_name_or_path
        config = getattr(model.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            config_text = config.to_json_string(use_diff=False).encode()
    else:
        name = str(model)
    if name is not None and Path(name).is_dir():
        config_file = Path(name) / "config.json"
        if config_file.is_file():
            config_text = config_file.read_bytes()
        name = str(Path(name).resolve())
    rows = json.dumps(list(train_dataset), sort_keys=True, default=str).encode()
    return {"base_model": name,
            "base_model_config_sha256": (hashlib.sha256(config_text).hexdigest()
                                         if config_text is not None else None),
            "train_rows": len(train_dataset),
            "train_data_sha256": hashlib.sha256(rows).hexdigest(),
            "reward_functions": [reward_path(func) for func in reward_funcs or ()]}


def check_output_dir(args: ESConfig, resume: bool = False, overwrite: bool = False,
                     force: bool = False, identity: dict[str, Any] | None = None) -> bool:
    """Refuse, reading files only, what training into ``args.output_dir`` would refuse.

    Cheap, so callers run it before any model loading or evaluation (ESTrainer's
    constructor does; the CLI and ``run_default`` also before their own model work): a
    mistake then costs seconds, not a base-model evaluation. Refused: an output_dir that
    holds a run without ``resume`` or ``overwrite``; with ``resume``, a configuration whose
    result-changing fields differ from the run's run.toml, or (``identity``, see
    ``run_identity``) another base model or other training rows than the run's newest
    checkpoint records, unless ``force``. Returns whether output_dir holds a run.
    """
    if resume and overwrite:
        raise ValueError("`resume` and `overwrite` exclude each other: resume continues "
                         "the run in output_dir, overwrite deletes it")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} is a file, not a directory; pass "
                         "--output-dir (output_dir=) a directory to write the run into")
    check_unlocked(out)
    journal = out / JOURNAL
    # A run exists once it has a complete checkpoint or a journaled iteration; a kill
    # while the very first checkpoint was being written leaves neither (only a temp
    # dir), and such a run simply starts again.
    steps = [step for step, _ in checkpoint.list_checkpoints(out)]
    has_run = bool(steps) or (journal.is_file() and journal.stat().st_size > 0)
    if not has_run or overwrite:
        return has_run
    if not resume:
        raise ValueError(f"output_dir {str(out)!r} already holds a run; pass --resume "
                         "(resume=True) to continue it or --overwrite (overwrite=True) to "
                         "start over")
    # Done: the newest checkpoint, or further the journal (resume replays its lines). Its
    # line count bounds its records, so it is parsed only when that bound matters.
    done = max(steps, default=0)
    if journal.is_file() and journal.read_bytes().count(b"\n") + 1 > args.iterations:
        done = max(done, len(read_journal(journal)))
    if args.iterations < done:
        raise ValueError(f"cannot resume {str(out)!r} with iterations={args.iterations}: the "
                         f"run has already done {done} iterations. "
                         "`iterations` is the run's total, not how many more to do: pass "
                         f"at least {done}")
    if force:
        return has_run
    saved_config = out / RUN_CONFIG
    if not saved_config.is_file():
        # run.toml is written after the first checkpoint (or was deleted): compare the
        # result hash every checkpoint records instead.
        saved_hash = (checkpoint.newest_state(out) or {}).get("config_hash")
        if saved_hash is not None and saved_hash != args.result_hash():
            raise ValueError(f"cannot resume {str(out)!r}: it has no run.toml and the "
                             "configuration's fields that change results differ from the "
                             "ones its checkpoints record (config_hash "
                             f"{saved_hash} -> {args.result_hash()}). Restore them, or pass "
                             "--force (force=True) to resume anyway")
    if saved_config.is_file():
        saved = ESConfig.from_toml(saved_config).to_dict()
        current = args.to_dict()
        differing = sorted(k for k in current if k not in NON_RESULT_FIELDS
                           and saved.get(k) != current[k])
        if differing:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}"
                                for k in differing)
            raise ValueError(f"cannot resume {str(out)!r}: the configuration changed in "
                             f"fields that change results ({details}). Restore them, or "
                             "pass --force (force=True) to resume anyway")
    state = checkpoint.newest_state(out) or {}
    saved_identity = state.get(IDENTITY_KEY)
    if identity is not None and isinstance(saved_identity, dict):
        _compare_identity(out, saved_identity, identity)
    return has_run


IDENTITY_KEY = "run_identity"  # the trainer_state.json key run_identity() is saved under


def _compare_identity(out: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise when ``current`` names another base model or other training rows than ``saved``."""
    problems = []
    saved_hash = saved.get("base_model_config_sha256")
    current_hash = current.get("base_model_config_sha256")
    if saved.get("base_model") != current.get("base_model") or (
            saved_hash and current_hash and saved_hash != current_hash):
        problems.append(f"base model {saved.get('base_model')!r} (config.json sha256 "
                        f"{str(saved_hash)[:12]}) -> {current.get('base_model')!r} "
                        f"(config.json sha256 {str(current_hash)[:12]})")
    if saved.get("train_data_sha256") != current.get("train_data_sha256"):
        problems.append(f"training data {saved.get('train_rows')} rows (sha256 "
                        f"{str(saved.get('train_data_sha256'))[:12]}) -> "
                        f"{current.get('train_rows')} rows (sha256 "
                        f"{str(current.get('train_data_sha256'))[:12]})")
    saved_rewards = saved.get("reward_functions")  # absent: an older lowmem-es
    if saved_rewards is not None and saved_rewards != current.get("reward_functions"):
        problems.append(f"reward functions {', '.join(saved_rewards)} -> "
                        f"{', '.join(current.get('reward_functions') or [])}")
    if problems:
        raise ValueError(f"cannot resume {str(out)!r}: it was trained on something else "
                         f"({'; '.join(problems)}). Resume with the run's own --model, "
                         "data and --reward, pass another --output-dir to start a new run, "
                         "or pass --force (force=True) to continue this run on the new ones "
                         "anyway "
                         "(the same applies if the model directory only moved)")


@contextlib.contextmanager
def write_failure(path: Path, iteration: int) -> Iterator[None]:
    """Turn a failed append (a full disk, a lost mount) into an error that says what
    failed and that the run can go on: a torn last line is dropped on resume."""
    try:
        yield
    except OSError as error:
        raise OSError(f"could not append iteration {iteration + 1} to {str(path)!r} "
                      f"({error.strerror or error}); the checkpoints and the journal up to "
                      f"iteration {iteration} are intact: free space there (or fix the "
                      "directory) and continue with --resume") from error


def metrics_entry(record: dict[str, Any]) -> dict[str, Any]:
    """An iteration's metrics line from its journal record (which holds every one)."""
    return {k: record[k] for k in METRIC_KEYS if k in record}


METRIC_KEYS = ("iteration", "reward_mean", "reward_max", "fitness_std", "identical_members",
               "identical_pairs", "sigma",
               "no_signal", "update_norm", "param_norm", "iteration_s", "tokens_per_s",
               "peak_memory_mb", "predicted_peak_mb", "oom_events", "skipped")


def read_metrics(out: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of ``out/metrics.jsonl``. The metrics are a log that resume does not
    need, so damage (a bad line in the middle) does not stop a run: with ``repair`` the
    damaged file is kept as ``metrics.jsonl.damaged-<time>`` and its readable records go on
    in metrics.jsonl, with a warning; without, the readable records are returned."""
    path = out / METRICS
    try:
        return read_journal(path, repair=repair, what="metrics")
    except CheckpointError as damage:
        error = damage
    # Salvage every readable record that names its iteration.
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if is_record(record):
            records.append(record)
    if repair:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, aside)
        rewrite_jsonl(path, records)
        logger.warning("%s; kept the damaged file as %s and its %d readable records",
                       error, aside, len(records))
    return records


LOCK_FILE = ".lowmem-es.lock"  # in output_dir: held (flock) by the process training there

_HELD_LOCKS: dict[Path, IO[str]] = {}


def lock_run(output_dir: Path) -> bool:
    """Hold an exclusive lock on ``output_dir`` until ``unlock_run`` (or this process
    ends: the kernel drops the lock of a killed process, so none goes stale).

    Two processes training in one directory (a requeued job while the old one still
    runs) would interleave their journals and delete each other's checkpoint
    temporaries, leaving a run that cannot be resumed; the second one is refused. On a
    filesystem without locks (some network mounts) it warns and goes on. Returns whether
    this call took the lock (False: this process held it already, or no lock exists here).
    """
    path = Path(output_dir).resolve()
    if path in _HELD_LOCKS:
        return False
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return False
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK_FILE, "a+")
    for attempt in range(20):  # another process's check_unlocked probe holds it a moment
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt < 19:
                time.sleep(0.05)
                continue
            handle.seek(0)
            owner = handle.read().strip()
            handle.close()
            raise ValueError(_locked_message(output_dir, owner)) from None
        except OSError as error:
            handle.close()
            logger.warning("could not lock %s (%s); make sure no other process trains there",
                           output_dir, error)
            return False
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _HELD_LOCKS[path] = handle
    return True


def unlock_run(output_dir: Path) -> None:
    """Release ``lock_run``'s lock (nothing if this process does not hold it)."""
    handle = _HELD_LOCKS.pop(Path(output_dir).resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases its flock


def check_unlocked(output_dir: Path) -> None:
    """Refuse, as ``lock_run`` would, when another process holds ``output_dir``'s lock (a
    cheap probe for checks that run before any model work). It takes a shared lock for a
    moment: probes never refuse each other (the ranks of one job probe at once), only an
    exclusive holder refuses them. Ranks other than 0 of a launcher's job do not probe:
    their rank 0 locks for them."""
    path = Path(output_dir).resolve()
    if path in _HELD_LOCKS or not (path / LOCK_FILE).is_file() \
            or os.environ.get("RANK", "0") != "0":
        return
    try:
        import fcntl
    except ImportError:
        return
    try:
        with open(path / LOCK_FILE) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(_locked_message(output_dir, handle.read().strip())) from None
    except OSError:  # unreadable or no locks here: lock_run decides
        return


def _locked_message(output_dir: Path, owner: str) -> str:
    return (f"another lowmem-es process ({owner or 'owner unknown'}) is training in "
            f"{str(output_dir)!r}; two runs in one output_dir would interleave their "
            "journals. Wait for it to finish, or stop it (Ctrl-C or SIGTERM: it "
            "checkpoints) and then --resume, or pass another --output-dir")


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete the temporaries a kill in the middle of a write left: checkpoint
    directories, and the files and directories of atomic writes in output_dir itself
    (run.toml, plan.json, reward.png, adapter/). Call it holding ``lock_run``'s lock, when
    no other process can be writing them."""
    for root in (Path(output_dir) / checkpoint.CHECKPOINTS, Path(output_dir)):
        if not root.is_dir():
            continue
        for child in root.iterdir():
            if not (child.name.startswith(".") and ".tmp-" in child.name):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            elif child.is_file():
                child.unlink(missing_ok=True)


def clear_run(out: Path) -> None:
    """Delete the run in ``out`` (``--overwrite``): its journal, metrics, configuration,
    plot, checkpoints and adapter; anything else there is left alone."""
    for name in (JOURNAL, METRICS, RUN_CONFIG, PLOT):
        (out / name).unlink(missing_ok=True)
    for name in (checkpoint.CHECKPOINTS, ADAPTER):
        shutil.rmtree(out / name, ignore_errors=True)


def resumed_metrics(out: Path, records: Sequence[dict[str, Any]], repair: bool = False
                    ) -> list[dict[str, Any]]:
    """The metrics lines of a run resumed after ``records`` (its journal), one per
    iteration. A kill between an iteration's journal line and its metrics line loses the
    latter: it is rebuilt from the journal, which holds every training metric (a
    periodic evaluation of that iteration is lost, and the line says so). With
    ``repair`` (the writing rank), metrics.jsonl is rewritten to match."""
    done = len(records)
    metrics = [m for m in read_metrics(out, repair=repair) if m["iteration"] < done]
    logged = {m["iteration"] for m in metrics}
    rebuilt = [dict(metrics_entry(r), rebuilt_from_journal=True)
               for r in records if r["iteration"] not in logged]
    if rebuilt:
        metrics = sorted(metrics + rebuilt, key=lambda m: m["iteration"])
        logger.info("metrics.jsonl lacked iteration(s) %s (a kill before they were "
                    "written): rebuilt from the journal",
                    ", ".join(str(m["iteration"] + 1) for m in rebuilt))
    if repair:
        rewrite_jsonl(out / METRICS, metrics)
    return metrics
