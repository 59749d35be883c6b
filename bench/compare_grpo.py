"""Head to head: lowmem-es (ES on LoRA) against TRL's GRPOTrainer (QLoRA), same budget (issue 10).

Both sides fine-tune the same base model (SmolLM2-135M-Instruct, NF4 with double quant,
LoRA r=8 / alpha 16 on q/k/v/o, dropout 0) on the same task and train split (the
embedded default's ``arithmetic`` level 1, ``default_model.default_datasets(seed)``), with
the same reward functions (``get_task("arithmetic").reward_funcs``, passed unchanged to
both trainers: they follow TRL's contract), the same max completion length for training
(10 tokens) and the same number of generated completions:

- ES: ``population_size x batch_size`` completions per iteration (8 x 16 = 128, greedy);
- GRPO: ``num_generations x prompts`` per optimizer step (8 x 16 = 128, sampled at
  temperature 1.0, since GRPO needs diverse samples within a group); one generation round
  per optimizer step (``per_device_train_batch_size`` 16 x ``gradient_accumulation_steps``
  8), so both sides also make the same number of updates.

Both sides are evaluated by the same code (``lowmem_es.evaluate.evaluate_rows``: greedy, 32
tokens, accuracy / accuracy among well-formed / well-formed fraction), on adapters each
side saved at evenly spaced points of its budget, which gives held-out accuracy against
completions generated. Every training run is its own subprocess, so its peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (GPU) is its own; evaluation runs in a separate
subprocess and is not counted in training wall time or memory.

Results accumulate in ``OUT_DIR/results.json`` (a rerun replaces the runs it repeats);
``--report`` re-renders the table and plot from it without training. TRL is a bench-only
dependency: ``pip install -c constraints.txt -e '.[bench]'``. Run from the repo root:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        python bench/compare_grpo.py --budget 1024 --threads 1

On the 2-core CPU box one GRPO step (128 completions) costs ~85 s on one thread against
~10 s for an ES iteration, so the default budget is 1024 completions (8 steps per side):
the whole 6-run sweep takes ~50 minutes there.

(``python bench/compare_grpo.py --help`` lists every option.) The script lives in bench/
so that ``sys.path[0]`` is bench/, never the repo root, whose ``kernels/`` would shadow
the PyPI package that transformers and bitsandbytes probe.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIDES = ("es", "grpo")
TRL_MISSING = ("TRL is not installed: pip install -c constraints.txt -e '.[bench]' "
               "(or pip install -c constraints.txt trl==1.16.0)")
# The shared model/LoRA shape: lowmem_es.default_model.DEFAULT_CONFIG's, repeated here so
# that a reader sees what both sides get without opening that module.
LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAIN_COMPLETION_LENGTH = 10
EVAL_COMPLETION_LENGTH = 32
MAX_PROMPT_LENGTH = 64
# ES: population 8, 16 prompts per iteration, greedy (the embedded default).
ES_POPULATION = 8
ES_BATCH = 16
ES_SIGMA = 0.02
# GRPO: 16 prompts x 8 generations per optimizer step (TRL's default num_generations).
GRPO_PROMPTS = 16
GRPO_GENERATIONS = 8
GRPO_MICRO_BATCH = 16
GRPO_TEMPERATURE = 1.0
DEFAULT_ES_LRS = (0.005, 0.01, 0.02)
DEFAULT_GRPO_LRS = (1e-5, 5e-5, 2e-4)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_DISABLED": "true", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false", "LOWMEM_ES_NOISE_BACKEND": "eager",
               "PYTHONUNBUFFERED": "1"}


# --- budget accounting (pure) -------------------------------------------------------------

def completions_per_step(side: str) -> int:
    """Completions one ES iteration / one GRPO optimizer step generates."""
    if side == "es":
        return ES_POPULATION * ES_BATCH
    if side == "grpo":
        return GRPO_PROMPTS * GRPO_GENERATIONS
    raise ValueError(f"unknown side {side!r}; expected one of {list(SIDES)}")


def steps_for_budget(budget: int, per_step: int) -> int:
    """Whole steps that fit ``budget`` completions (at least one, else an error).

    The budget is rounded down to whole steps; ``per_step * steps`` is what a run reports
    as completions generated, so both sides are compared on what they really generated.
    """
    if per_step <= 0:
        raise ValueError(f"completions per step must be positive, got {per_step}")
    steps = budget // per_step
    if steps < 1:
        raise ValueError(f"--budget {budget} is smaller than one step ({per_step} "
                         "completions); raise it")
    return steps


def checkpoint_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps in 1..steps, always ending at ``steps`` (no repeats)."""
    if steps < 1 or points < 1:
        raise ValueError(f"need steps >= 1 and points >= 1, got {steps} and {points}")
    return sorted({max(1, round(steps * k / points)) for k in range(1, points + 1)})


def run_name(side: str, learning_rate: float, lr_schedule: str = "constant") -> str:
    """Directory / key name of one run, e.g. ``es_lr0.01``, ``es_lr0.02_cosine`` or
    ``grpo_lr5e-05`` (an ES run's lr schedule is named unless constant; GRPO always uses
    TRL's linear decay)."""
    suffix = f"_{lr_schedule}" if side == "es" and lr_schedule != "constant" else ""
    return f"{side}_lr{learning_rate:g}{suffix}"


# --- argument parsing ---------------------------------------------------------------------

def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}"
                                         ) from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive numbers, got {text!r}")
    return values


def _sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise argparse.ArgumentTypeError(f"--sides takes a comma-separated subset of "
                                         f"{list(SIDES)}, got {text!r}")
    return sides


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` documents every option)."""
    parser = argparse.ArgumentParser(
        prog="compare_grpo.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lowmem-es (ES on LoRA) vs TRL GRPOTrainer (QLoRA) on the same model, "
                    "task, split, completion length and budget of generated completions.",
        epilog="Run with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE on a "
               "shared CPU box. Results accumulate in OUT_DIR/results.json.")
    parser.add_argument("--sides", type=_sides, default=list(SIDES),
                        help="which trainers to run: es, grpo or es,grpo (default both)")
    parser.add_argument("--es-schedule", choices=("constant", "cosine", "linear"),
                        default="constant",
                        help="ES lr schedule (ESConfig.lr_schedule; decays to 0.1x over the "
                             "run; default constant, the paper's)")
    parser.add_argument("--es-lr", type=_float_list, default=list(DEFAULT_ES_LRS),
                        help="ES learning rates to sweep, comma-separated (default "
                             f"{','.join(map(str, DEFAULT_ES_LRS))}; sigma {ES_SIGMA})")
    parser.add_argument("--grpo-lr", type=_float_list, default=list(DEFAULT_GRPO_LRS),
                        help="GRPO (AdamW) learning rates to sweep, comma-separated (default "
                             f"{','.join(map(str, DEFAULT_GRPO_LRS))})")
    parser.add_argument("--budget", type=int, default=1024,
                        help="generated completions per training run, both sides (rounded "
                             "down to whole steps of 128; default 1024 = 8 steps)")
    parser.add_argument("--grpo-micro-batch", type=int, default=GRPO_MICRO_BATCH,
                        help="GRPO per_device_train_batch_size (completions per backward "
                             f"pass; must divide {GRPO_PROMPTS * GRPO_GENERATIONS}; default "
                             f"{GRPO_MICRO_BATCH}). Gradient accumulation makes up the rest, so "
                             "an optimizer step always sees 16 prompts x 8 generations")
    parser.add_argument("--no-grpo-gradient-checkpointing", dest="grpo_gradient_checkpointing",
                        action="store_false",
                        help="turn off TRL's default gradient checkpointing (more memory)")
    parser.add_argument("--points", type=int, default=4,
                        help="evaluation points per run along the budget (default 4)")
    parser.add_argument("--transfer-every-point", action="store_true",
                        help="evaluate the transfer split at every point, not only the last")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="cap rows per evaluation split (default: all; for smoke tests)")
    parser.add_argument("--seed", type=int, default=0,
                        help="split seed and run seed of both sides (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every worker, both sides (default 1)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to train and evaluate (default auto: cuda if available)")
    parser.add_argument("--model", default=None,
                        help="model directory (default: the embedded SmolLM2-135M-Instruct, "
                             "converted once by lowmem_es.default_model)")
    parser.add_argument("--random-model", action="store_true",
                        help="use a random-init model with SmolLM2-135M's shapes (built in "
                             "OUT_DIR; for speed and memory only: its accuracy means nothing)")
    parser.add_argument("--out-dir", default="runs/compare_grpo",
                        help="runs, adapters and results.json go here "
                             "(default runs/compare_grpo)")
    parser.add_argument("--plot", default="bench/compare_grpo.png",
                        help="where to write the accuracy-vs-completions plot "
                             "(default bench/compare_grpo.png; '' for none)")
    parser.add_argument("--report", action="store_true",
                        help="only print the table and write the plot from results.json")
    parser.add_argument("--collect", action="store_true",
                        help="rebuild results.json from the run directories (train.json, "
                             "eval.json), then report; trains nothing")
    parser.add_argument("--keep-adapters", action="store_true",
                        help="keep the intermediate adapters after evaluation")
    parser.add_argument("--worker", choices=("train", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; errors name the option and the fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if not args.spec:
            parser.error("--worker needs --spec")
        return args
    if args.budget < 1:
        parser.error(f"--budget must be a positive number of completions, got {args.budget}")
    group = GRPO_PROMPTS * GRPO_GENERATIONS
    if args.grpo_micro_batch < 1 or group % args.grpo_micro_batch:
        parser.error(f"--grpo-micro-batch must divide {group}, got {args.grpo_micro_batch}")
    if args.points < 1:
        parser.error(f"--points must be >= 1, got {args.points}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.random_model and args.model:
        parser.error("--random-model and --model exclude each other")
    if args.eval_limit is not None and args.eval_limit < 1:
        parser.error(f"--eval-limit must be >= 1, got {args.eval_limit}")
    if not args.report:
        for side in args.sides:
            try:
                steps_for_budget(args.budget, completions_per_step(side))
            except ValueError as error:
                parser.error(str(error))
    return args


# --- results and the table (pure) ---------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of the table: a run's final numbers."""

    name: str
    side: str
    learning_rate: float
    completions: int
    eval_accuracy: float | None
    eval_accuracy_well_formed: float | None
    eval_well_formed: float | None
    transfer_accuracy: float | None
    train_seconds: float | None
    train_cpu_seconds: float | None
    completions_per_second: float | None
    peak_rss_mb: float | None
    peak_cuda_mb: float | None


def table_rows(results: dict[str, Any]) -> list[Row]:
    """The table's rows from results.json's content, ES runs first, then by learning rate."""
    rows = []
    for name, run in results.get("runs", {}).items():
        final = run.get("final") or {}
        ev, tr = final.get("eval") or {}, final.get("transfer") or {}
        rows.append(Row(name, run["side"], float(run["learning_rate"]),
                        int(run.get("completions", 0)), ev.get("accuracy"),
                        ev.get("accuracy_well_formed"), ev.get("well_formed"),
                        tr.get("accuracy"), run.get("train_seconds"),
                        run.get("train_cpu_seconds"), run.get("completions_per_second"),
                        run.get("peak_rss_mb"), run.get("peak_cuda_mb")))
    rows.sort(key=lambda r: (SIDES.index(r.side) if r.side in SIDES else 9, r.learning_rate))
    return rows


def best_per_side(rows: Sequence[Row]) -> dict[str, Row]:
    """The best run of each side by final eval accuracy (ties: the earlier-listed run)."""
    best: dict[str, Row] = {}
    for row in rows:
        if row.eval_accuracy is None:
            continue
        current = best.get(row.side)
        if current is None or row.eval_accuracy > current.eval_accuracy:
            best[row.side] = row
    return best


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """A markdown table: one line per run (best of each side in bold), base model first."""
    rows = table_rows(results)
    best = {r.name for r in best_per_side(rows).values()}
    lines = ["| run | side | lr | completions | eval acc | eval acc well-formed | "
             "eval well-formed | transfer acc | train wall s | train CPU s | completions/s | "
             "peak RSS MiB | peak CUDA MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = results.get("base") or {}
    if base:
        ev, tr = base.get("eval") or {}, base.get("transfer") or {}
        lines.append(f"| base model | - | - | 0 | {_cell(ev.get('accuracy'))} | "
                     f"{_cell(ev.get('accuracy_well_formed'))} | {_cell(ev.get('well_formed'))}"
                     f" | {_cell(tr.get('accuracy'))} | - | - | - | - | - |")
    for r in rows:
        mark = "**" if r.name in best else ""
        lines.append(
            f"| {mark}{r.name}{mark} | {r.side} | {r.learning_rate:g} | {r.completions} | "
            f"{mark}{_cell(r.eval_accuracy)}{mark} | {_cell(r.eval_accuracy_well_formed)} | "
            f"{_cell(r.eval_well_formed)} | {_cell(r.transfer_accuracy)} | "
            f"{_cell(r.train_seconds, 0)} | {_cell(r.train_cpu_seconds, 0)} | "
            f"{_cell(r.completions_per_second, 2)} | "
            f"{_cell(r.peak_rss_mb, 0)} | {_cell(r.peak_cuda_mb, 0)} |")
    return "\n".join(lines)


def format_curves(results: dict[str, Any]) -> str:
    """Held-out (eval split) accuracy at each evaluation point, one line per run."""
    base_acc = ((results.get("base") or {}).get("eval") or {}).get("accuracy")
    lines = []
    for row in table_rows(results):
        points = results["runs"][row.name].get("curve", [])
        text = ", ".join(f"{p['completions']}: {p['eval']['accuracy']:.3f}" for p in points)
        start = f"0: {base_acc:.3f}, " if base_acc is not None else ""
        lines.append(f"- {row.name}: {start}{text}")
    return "\n".join(lines)


def load_results(path: Path) -> dict[str, Any]:
    """results.json's content, or an empty result set when it does not exist yet."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write results.json atomically (a kill never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def plot_curves(results: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Eval-split accuracy against completions generated, every run; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    base_acc = ((results.get("base") or {}).get("eval") or {}).get("accuracy")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"es": "-", "grpo": "--"}
    rows = table_rows(results)
    # One colour family per side (ES blues, GRPO oranges), darker for larger lr.
    shades: dict[str, list[Any]] = {}
    for side, cmap in (("es", plt.cm.Blues), ("grpo", plt.cm.Oranges)):
        count = sum(r.side == side for r in rows)
        shades[side] = [cmap(0.45 + 0.5 * i / max(1, count - 1)) for i in range(count)]
    for row in rows:
        run = results["runs"][row.name]
        xs = [p["completions"] for p in run.get("curve", [])]
        ys = [p["eval"]["accuracy"] for p in run.get("curve", [])]
        if base_acc is not None:
            xs, ys = [0, *xs], [base_acc, *ys]
        label = f"{'lowmem-es' if row.side == 'es' else 'TRL GRPO'} lr {row.learning_rate:g}"
        if row.side == "es":
            label += row.name[len(run_name("es", row.learning_rate)):].replace("_", " ")
        color = shades[row.side].pop(0) if shades.get(row.side) else None
        ax.plot(xs, ys, styles.get(row.side, ":"), marker="o", label=label, color=color)
    ax.set_xlabel("completions generated")
    ax.set_ylabel("held-out accuracy (eval split, greedy, 32 tokens)")
    count = ((results.get("base") or {}).get("eval") or {}).get("count")
    noise = f" ({count} rows: 1 s.e. ~{math.sqrt(0.3 * 0.7 / count):.3f})" if count else ""
    ax.set_title(f"SmolLM2-135M NF4 + LoRA r=8, arithmetic level 1{noise}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- a random model with SmolLM2-135M's shapes (for machines without the real one) ---------

SMOLLM2_SHAPES = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                  "head_dim": 64, "tie_word_embeddings": True}
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def build_random_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random-init Llama with SmolLM2-135M's shapes and a character tokenizer.

    The GPU machine cannot hold the real weights (they do not travel), but speed and memory
    depend on shapes, not values: same layers, widths and 49,152-row tied embedding. The
    tokenizer maps printable characters to ids and fills the rest of the vocabulary with
    placeholder tokens, and has a chat template, so the task's chat prompts work. Accuracy
    of such a model is meaningless; only wall time, completions/s and memory are.
    """
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}  # SmolLM2's special ids
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    for index in range(len(vocab), SMOLLM2_SHAPES["vocab_size"]):
        vocab[f"<t{index}>"] = index
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(**SMOLLM2_SHAPES, max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.float16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


# --- worker helpers -----------------------------------------------------------------------

def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any parallel work
        torch.set_num_interop_threads(1)


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: write 5 to /proc/self/clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    """Peak resident set since start or since the last reset (Linux VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _maxrss_mb() -> float:
    """Peak RSS of this whole process (getrusage; never reset), in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _datasets(seed: int) -> dict[str, list[dict]]:
    from lowmem_es.default_model import default_datasets

    return default_datasets(seed)


def grpo_config_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """GRPOConfig arguments of one run (pure, so tests can check them without TRL).

    One generation round of 16 prompts x 8 generations per optimizer step (the micro batch
    times gradient accumulation is 128 completions), sampling at temperature 1.0, TRL's
    defaults otherwise (beta 0, loss "dapo", epsilon 0.2, num_iterations 1, AdamW, linear
    decay, gradient checkpointing on); no hub, no trackers, no checkpoints of its own.
    """
    device, micro = spec["device"], spec["micro_batch"]
    group = GRPO_PROMPTS * GRPO_GENERATIONS
    if micro < 1 or group % micro:
        raise ValueError(f"micro batch {micro} must divide {group}")
    return dict(
        output_dir=str(Path(spec["run_dir"]) / "grpo"), learning_rate=spec["learning_rate"],
        max_steps=spec["steps"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=group // micro,
        gradient_checkpointing=spec["gradient_checkpointing"],
        num_generations=GRPO_GENERATIONS, max_completion_length=TRAIN_COMPLETION_LENGTH,
        temperature=GRPO_TEMPERATURE, seed=spec["seed"], data_seed=spec["seed"],
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=device == "cpu",
        bf16=device != "cpu", dataloader_num_workers=0, disable_tqdm=True)


# --- the training workers -----------------------------------------------------------------

def train_es(spec: dict[str, Any]) -> dict[str, Any]:
    """One lowmem-es run: the embedded default's config with ``spec``'s lr and budget."""
    import torch

    from lowmem_es.default_model import default_run_config
    from lowmem_es.tasks import get_task
    from lowmem_es.trainer import ESTrainer

    out = Path(spec["run_dir"])
    steps, saves = spec["steps"], set(spec["save_steps"])
    task = get_task("arithmetic")
    data = _datasets(spec["seed"])
    config = default_run_config(
        output_dir=str(out / "es"), learning_rate=spec["learning_rate"],
        lr_schedule=spec.get("lr_schedule", "constant"), lr_min_ratio=0.1, sigma=ES_SIGMA,
        population_size=ES_POPULATION, batch_size=ES_BATCH, iterations=steps,
        max_completion_length=TRAIN_COMPLETION_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
        seed=spec["seed"], save_steps=0, eval_steps=0, logging_steps=max(1, steps // 8),
        device=spec["device"])
    trainer = ESTrainer(spec["model"], list(task.reward_funcs), train_dataset=data["train"],
                        args=config, overwrite=True)
    device = trainer.device
    rss_loaded = _rss_mb()
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    checkpoints: list[dict[str, Any]] = []
    saving = {"wall": 0.0, "cpu": 0.0}

    def on_iteration(entry: dict[str, Any]) -> None:
        step = trainer.iteration
        if step in saves:
            wall, cpu = time.perf_counter(), time.process_time()
            path = out / f"adapter_step{step:04d}"
            trainer.save_adapter(path)
            checkpoints.append({"step": step, "completions": step * completions_per_step("es"),
                                "adapter": str(path)})
            saving["wall"] += time.perf_counter() - wall
            saving["cpu"] += time.process_time() - cpu

    started, cpu_started = time.perf_counter(), time.process_time()
    history = trainer.train(callback=on_iteration)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - started - saving["wall"]
    cpu = time.process_time() - cpu_started - saving["cpu"]
    peak_cuda = None
    if device.type == "cuda":  # ESTrainer resets the peak every iteration: take the max
        peak_cuda = max([torch.cuda.max_memory_allocated(device) / 2**20]
                        + [e.get("peak_memory_mb") or 0.0 for e in history])
    return {"checkpoints": checkpoints, "train_seconds": wall, "train_cpu_seconds": cpu,
            "rss_after_load_mb": rss_loaded,
            "peak_rss_train_mb": _vm_hwm_mb() if reset else None, "peak_cuda_mb": peak_cuda,
            "train_log": [{k: e.get(k) for k in ("iteration", "reward_mean", "reward_max")}
                          for e in history]}


def train_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    """One TRL GRPOTrainer run: QLoRA of the same shape, ``spec``'s lr and budget."""
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as error:
        raise SystemExit(f"{TRL_MISSING} ({error})") from None
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )

    from lowmem_es.tasks import get_task

    out = Path(spec["run_dir"])
    saves = set(spec["save_steps"])
    device = spec["device"]
    task = get_task("arithmetic")
    data = _datasets(spec["seed"])
    # Same quantisation as lowmem_es.model.load_model: NF4, double quant, fp32 compute on
    # CPU (bf16 is ~5x slower there), bf16 on CUDA.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], quantization_config=quant, dtype=dtype, use_safetensors=True,
        device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=list(LORA_TARGETS), bias="none",
                             task_type="CAUSAL_LM")
    args = GRPOConfig(**grpo_config_kwargs(spec))
    checkpoints: list[dict[str, Any]] = []
    saving = {"wall": 0.0, "cpu": 0.0}

    class SaveAdapters(TrainerCallback):
        """Save the PEFT adapter at the planned steps (the same points as the ES side)."""

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                        **kwargs: Any) -> None:
            if state.global_step in saves and not any(
                    c["step"] == state.global_step for c in checkpoints):
                wall, cpu = time.perf_counter(), time.process_time()
                path = out / f"adapter_step{state.global_step:04d}"
                model.save_pretrained(str(path))
                checkpoints.append({"step": state.global_step,
                                    "completions": state.global_step
                                    * completions_per_step("grpo"), "adapter": str(path)})
                saving["wall"] += time.perf_counter() - wall
                saving["cpu"] += time.process_time() - cpu

    trainer = GRPOTrainer(model=model, reward_funcs=list(task.reward_funcs), args=args,
                          train_dataset=Dataset.from_list(data["train"]),
                          processing_class=tokenizer, peft_config=peft_config,
                          callbacks=[SaveAdapters()])
    rss_loaded = _rss_mb()
    reset = _reset_peak_rss()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started - saving["wall"]
    cpu = time.process_time() - cpu_started - saving["cpu"]
    keys = ("step", "reward", "reward_std", "loss", "completions/mean_length",
            "completions/clipped_ratio", "grad_norm", "frac_reward_zero_std")
    log = [{k: e[k] for k in keys if k in e} for e in trainer.state.log_history
           if "reward" in e]
    return {"checkpoints": checkpoints, "train_seconds": wall, "train_cpu_seconds": cpu,
            "rss_after_load_mb": rss_loaded,
            "peak_rss_train_mb": _vm_hwm_mb() if reset else None,
            "peak_cuda_mb": (torch.cuda.max_memory_allocated() / 2**20
                             if device == "cuda" else None),
            "train_log": log}


# --- the evaluation worker ----------------------------------------------------------------

def evaluate_adapters(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy held-out metrics of the base model and/or saved adapters, one model load.

    Every adapter (either side's, PEFT format) is loaded into the same lowmem-es ES-LoRA
    model and scored by ``evaluate_rows`` with the task's rewards, threshold and
    well-formed test: the numbers of both sides come from the same code.
    """
    from lowmem_es.evaluate import evaluate_rows, make_scorer
    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model
    from lowmem_es.tasks import get_task

    task = get_task("arithmetic")
    data = _datasets(spec["seed"])
    limit = spec.get("eval_limit")
    rows = {name: data[name][:limit] if limit else data[name] for name in ("eval", "transfer")}
    base, tokenizer, _ = load_model(spec["model"], device=spec["device"])
    es_model = attach_es_lora(base, list(LORA_TARGETS), LORA_RANK, LORA_ALPHA,
                              base_model_name_or_path=str(spec["model"]))
    scorer = make_scorer(tokenizer, rows["eval"] + rows["transfer"],
                         list(task.reward_funcs), max_prompt_length=MAX_PROMPT_LENGTH)

    def measure(split: str) -> dict[str, Any]:
        result = evaluate_rows(es_model, tokenizer, rows[split], scorer=scorer,
                               well_formed=task.well_formed,
                               correct_threshold=task.correct_threshold,
                               max_prompt_length=MAX_PROMPT_LENGTH,
                               max_completion_length=EVAL_COMPLETION_LENGTH, samples=3)
        return result

    out: dict[str, Any] = {"points": []}
    if spec.get("base"):  # before any adapter is loaded: B = 0 is exactly the base model
        out["base"] = {split: measure(split) for split in ("eval", "transfer")}
    for item in spec.get("adapters", []):
        es_model.load_adapter(item["adapter"])
        point = {"step": item["step"], "completions": item["completions"],
                 "eval": measure("eval")}
        if item.get("transfer"):
            point["transfer"] = measure("transfer")
        out["points"].append(point)
        print(f"  {item['completions']:>6} completions: eval accuracy "
              f"{point['eval']['accuracy']:.3f}", flush=True)
    return out


def worker_main(kind: str, spec_path: str) -> int:
    """Entry point of a worker subprocess: read the spec, do the work, write the result."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    _set_threads(spec["threads"])
    if kind == "train":
        result = train_es(spec) if spec["side"] == "es" else train_grpo(spec)
        result["peak_rss_mb"] = _maxrss_mb()
    else:
        result = evaluate_adapters(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# --- the driver ---------------------------------------------------------------------------

def _run_worker(kind: str, spec: dict[str, Any], spec_path: Path, log_path: Path) -> dict:
    """Run a worker in a fresh interpreter (its own peak RSS), log to ``log_path``."""
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    env = dict(os.environ, **OFFLINE_ENV)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
               "--spec", str(spec_path)]
    with open(log_path, "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"{kind} worker failed (exit {done.returncode}); log "
                           f"{log_path}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


def _environment() -> dict[str, Any]:
    """Versions and machine facts recorded with the results."""
    import platform
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate",
                 "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "versions": versions,
            "threads_env": {k: os.environ.get(k) for k in
                            ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}}


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Train every (side, lr) in its own subprocess, evaluate it, accumulate results.json."""
    if "grpo" in args.sides:
        import importlib.util
        if importlib.util.find_spec("trl") is None:
            raise SystemExit(TRL_MISSING)
    out = Path(args.out_dir).resolve()
    if args.model:
        model = str(Path(args.model).resolve())
    elif args.random_model:
        print("random-init model with SmolLM2-135M's shapes: accuracy is meaningless here, "
              "only speed and memory are", flush=True)
        model = str(build_random_model(out / "random-smollm2-shapes", args.seed))
    else:
        from lowmem_es.default_model import ensure_default_model
        model = str(ensure_default_model())
    results_path = out / "results.json"
    results = load_results(results_path)
    device = _resolve_device(args.device)
    settings = {"model": model, "seed": args.seed, "threads": args.threads, "device": device,
                "budget": args.budget, "points": args.points, "eval_limit": args.eval_limit,
                "grpo_micro_batch": args.grpo_micro_batch,
                "grpo_gradient_checkpointing": args.grpo_gradient_checkpointing}
    if results.get("settings") and {k: results["settings"].get(k) for k in settings} != settings:
        print(f"note: {results_path} holds runs made with other settings "
              f"({results['settings']}); they are replaced by this sweep's", flush=True)
        results = {"runs": {}}
    results["settings"] = settings
    results["environment"] = _environment()
    common = {"model": model, "seed": args.seed, "threads": args.threads, "device": device}
    if not results.get("base"):
        print("evaluating the base model (eval + transfer)", flush=True)
        spec = dict(common, base=True, adapters=[], eval_limit=args.eval_limit,
                    result=str(out / "base" / "eval.json"))
        evaluated = _run_worker("eval", spec, out / "base" / "eval_spec.json",
                                out / "base" / "eval.log")
        results["base"] = evaluated["base"]
        save_results(results_path, results)
    plan = [(side, lr) for side in args.sides
            for lr in (args.es_lr if side == "es" else args.grpo_lr)]
    for side, lr in plan:
        schedule = args.es_schedule if side == "es" else "linear"
        name = run_name(side, lr, schedule)
        run_dir = out / name
        per_step = completions_per_step(side)
        steps = steps_for_budget(args.budget, per_step)
        saves = checkpoint_steps(steps, args.points)
        print(f"[{name}] training: {steps} steps x {per_step} completions = "
              f"{steps * per_step}, adapters at steps {saves}", flush=True)
        spec = dict(common, side=side, learning_rate=lr, lr_schedule=schedule, steps=steps,
                    save_steps=saves,
                    micro_batch=args.grpo_micro_batch,
                    gradient_checkpointing=args.grpo_gradient_checkpointing,
                    run_dir=str(run_dir), result=str(run_dir / "train.json"))
        trained = _run_worker("train", spec, run_dir / "train_spec.json", run_dir / "train.log")
        print(f"[{name}] trained in {trained['train_seconds']:.0f} s, peak RSS "
              f"{trained['peak_rss_mb']:.0f} MiB; evaluating {len(trained['checkpoints'])} "
              "adapters", flush=True)
        last = max(c["step"] for c in trained["checkpoints"])
        adapters = [dict(c, transfer=args.transfer_every_point or c["step"] == last)
                    for c in trained["checkpoints"]]
        spec = dict(common, base=False, adapters=adapters, eval_limit=args.eval_limit,
                    result=str(run_dir / "eval.json"))
        evaluated = _run_worker("eval", spec, run_dir / "eval_spec.json", run_dir / "eval.log")
        results["runs"][name] = run_entry(side, lr, steps * per_step, trained, evaluated,
                                          schedule)
        save_results(results_path, results)
        final = evaluated["points"][-1]
        acc = final["eval"]["accuracy"]
        tr = (final.get("transfer") or {}).get("accuracy")
        print(f"[{name}] eval accuracy {acc:.3f}, transfer "
              f"{'-' if tr is None else f'{tr:.3f}'}", flush=True)
        if not args.keep_adapters:  # keep only the final adapter of each run
            import shutil
            for c in trained["checkpoints"]:
                if c["step"] != last:
                    shutil.rmtree(c["adapter"], ignore_errors=True)
    return results


def run_entry(side: str, learning_rate: float, completions: int, trained: dict[str, Any],
              evaluated: dict[str, Any], lr_schedule: str = "constant") -> dict[str, Any]:
    """results.json's record of one run, from its train worker's and eval worker's output."""
    def rounded(value: float | None, digits: int = 1) -> float | None:
        return None if value is None else round(value, digits)

    final = evaluated["points"][-1]
    return {
        "side": side, "learning_rate": learning_rate, "lr_schedule": lr_schedule,
        "steps": completions // completions_per_step(side), "completions": completions,
        "train_seconds": rounded(trained["train_seconds"]),
        "train_cpu_seconds": rounded(trained.get("train_cpu_seconds")),
        "completions_per_second": round(completions / trained["train_seconds"], 3),
        "peak_rss_mb": rounded(trained["peak_rss_mb"]),
        "peak_rss_train_mb": rounded(trained.get("peak_rss_train_mb")),
        "rss_after_load_mb": rounded(trained["rss_after_load_mb"]),
        "peak_cuda_mb": rounded(trained.get("peak_cuda_mb")),
        "curve": [{k: p[k] for k in ("step", "completions", "eval") if k in p}
                  for p in evaluated["points"]],
        "final": {"eval": final["eval"], "transfer": final.get("transfer")},
        "train_log": trained.get("train_log"),
    }


def collect(out_dir: Path) -> dict[str, Any]:
    """Rebuild results.json's runs from the run directories' train.json and eval.json.

    For runs finished by an older copy of this script, or to recover after an interrupted
    sweep: nothing is trained or evaluated.
    """
    results_path = out_dir / "results.json"
    results = load_results(results_path)
    for train_file in sorted(out_dir.glob("*/train.json")):
        run_dir = train_file.parent
        eval_file = run_dir / "eval.json"
        spec_file = run_dir / "train_spec.json"
        if not eval_file.is_file() or not spec_file.is_file():
            print(f"skipping {run_dir.name}: not evaluated yet", file=sys.stderr)
            continue
        spec = json.loads(spec_file.read_text())
        completions = spec["steps"] * completions_per_step(spec["side"])
        schedule = spec.get("lr_schedule", "constant" if spec["side"] == "es" else "linear")
        results["runs"][run_name(spec["side"], spec["learning_rate"], schedule)] = run_entry(
            spec["side"], spec["learning_rate"], completions,
            json.loads(train_file.read_text()), json.loads(eval_file.read_text()), schedule)
    save_results(results_path, results)
    return results


def report(results: dict[str, Any], plot: str) -> None:
    """Print the table, the curves and the best run per side; write the plot."""
    print(format_table(results))
    print()
    print("held-out (eval) accuracy by completions generated:")
    print(format_curves(results))
    for side, row in best_per_side(table_rows(results)).items():
        print(f"best {side}: {row.name}: eval {_cell(row.eval_accuracy)}, transfer "
              f"{_cell(row.transfer_accuracy)}")
    if plot:
        written = plot_curves(results, plot)
        if written:
            print(f"plot: {written}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec)
    results_path = Path(args.out_dir) / "results.json"
    if args.report or args.collect:
        if not results_path.is_file():
            raise SystemExit(f"no results at {results_path}; run the sweep first")
        results = collect(Path(args.out_dir)) if args.collect else load_results(results_path)
        report(results, args.plot)
        return 0
    results = run_sweep(args)
    report(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
