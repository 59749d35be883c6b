"""ESConfig: every knob of a run, validated up front with errors that say how to fix them.

Field names follow TRL where the meaning matches (``learning_rate``, ``num_generations``,
``max_completion_length`` ...). Defaults are the paper's full-parameter values except
``sigma``: LoRA adapters start with B = 0, so a perturbation of 1e-3 barely changes the
output; ~1e-2 is where a CPU probe on SmolLM2-135M learned (../shared/ENVIRONMENT.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FITNESS_SHAPINGS = ("zscore", "centered_rank", "none")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine", "linear")
PROMPT_ASSIGNMENTS = ("shared", "per_pair")
FITNESS_BASELINES = ("none", "pair", "prompt")
NOISE_SCALINGS = ("none", "relative")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
BOOL_FIELDS = ("antithetic", "pass_at_k", "load_in_4bit", "nf4_kernel")
FLOAT_FIELDS = ("sigma", "learning_rate", "weight_decay", "lr_min_ratio", "temperature",
                "sigma_growth", "anchor_decay",
                "pass_at_k_fraction", "correct_threshold", "lora_alpha",
                "distributed_timeout", "max_hours")
# Largest seed: run.toml stores it as a TOML integer, which is a signed 64-bit number
# (noise.member_key and torch.manual_seed would take up to 2**64 - 1).
MAX_SEED = 2**63 - 1

# The smallest sampling temperature: 1 / T must stay finite in float32 (kernels/sampling.py).
MIN_TEMPERATURE = 1e-30

# Device names a run accepts: torch.device would take more ('mps', 'meta', 'cpu:0' ...) that
# loading and the kernels do not support, and raises RuntimeError on a typo such as 'cuda:x'.
DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index such as 0)"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")

# Fields that only change logging or where files go: a resumed run may change them.
# Fields added after runs were first written, with the behaviour they had before: at that
# value a field leaves result_hash as it was, so older runs still resume.
LATER_FIELDS = {"prompt_assignment": "shared", "prompts_per_pair": 0, "fitness_baseline": "none",
                "sigma_growth": 1.0, "anchor_decay": 0.0, "noise_scaling": "none"}
# sigma_growth never takes sigma above this multiple of ESConfig.sigma.
SIGMA_GROWTH_CAP = 16.0
NON_RESULT_FIELDS = frozenset({"output_dir", "save_steps", "save_total_limit", "eval_steps",
                               "logging_steps", "iterations", "max_hours",
                               "distributed_timeout"})


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ESConfig:
    """Configuration of one ES fine-tuning run (see ../shared/DESIGN.md, "The algorithm")."""

    # --- ES ---
    population_size: int = _help("Members per iteration (N); even when antithetic. At a "
                                 "fixed learning_rate the step shrinks as 1/sqrt(N): scale "
                                 "the rate with sqrt(N) when changing N.", 30)
    sigma: float = _help("Perturbation scale; LoRA wants ~1e-2 (B starts at zero).", 1e-2)
    learning_rate: float = _help("Step size, 1/sigma folded in (paper: lr/sigma = 0.5).", 5e-3)
    antithetic: bool = _help("Evaluate +eps and -eps of each noise draw (halves variance).", True)
    fitness_shaping: str = _help("'zscore' (paper), 'centered_rank' or 'none'.", "zscore")
    fitness_baseline: str = _help("Subtracted from each member's fitness before shaping: "
                                  "'none'; 'pair' (its antithetic pair's mean, so only the "
                                  "pair's difference moves the update); 'prompt' (each "
                                  "prompt's mean score over the members that saw it, the ES "
                                  "analogue of GRPO's group baseline).", "none")
    optimizer: str = _help("'sgd' (paper: plain ES step) or 'adam' on the ES estimate.", "sgd")
    weight_decay: float = _help("Decoupled decay of the LoRA weights per step.", 0.0)
    anchor_decay: float = _help("Pull toward the starting adapter per step: theta -= lr * "
                                "anchor_decay * (theta - theta_0) (0: off). Unlike "
                                "weight_decay it keeps the random LoRA A of step 0.", 0.0)
    sigma_growth: float = _help("Remedy for a population that gives no signal (every member "
                                "scores alike): after each such iteration sigma is multiplied "
                                "by this (up to 16x sigma), after each with signal divided by "
                                "it again, down to sigma. 1: off. The sigma used is "
                                "journaled.", 1.0)
    noise_scaling: str = _help("Per-tensor noise scale: 'none' (sigma for every tensor) or "
                               "'relative' (each tensor's noise and step times its RMS in "
                               "the starting adapter; a tensor that starts at zero, LoRA B, "
                               "keeps sigma). 'relative' keeps a member's weight change "
                               "first-order in sigma, so larger sigmas move completions "
                               "without breaking them.", "none")
    lr_schedule: str = _help("'constant' (paper), 'cosine' or 'linear': decay from "
                             "learning_rate to learning_rate * lr_min_ratio over `iterations` "
                             "(extending `iterations` on resume reshapes the rest).", "constant")
    lr_min_ratio: float = _help("Final learning rate as a fraction of learning_rate (decaying "
                                "schedules only).", 0.1)
    iterations: int = _help("ES iterations to run.", 100)
    seed: int = _help("Run seed: noise, LoRA init and data order derive from it.", 0)
    # --- data and generation ---
    batch_size: int = _help("Prompts per iteration, shared by every member "
                            "(prompt_assignment='shared').", 8)
    prompt_assignment: str = _help("'shared': every member sees the same batch_size prompts "
                                   "(paper); 'per_pair': each antithetic pair (each member "
                                   "without antithetic) sees its own prompts_per_pair prompts, "
                                   "both members of a pair the same, so their difference "
                                   "still cancels the prompts' difficulty.", "shared")
    prompts_per_pair: int = _help("Prompts per pair and iteration with "
                                  "prompt_assignment='per_pair' (0: batch_size).", 0)
    num_generations: int = _help("Completions per prompt and member (>1 needs sampling).", 1)
    max_prompt_length: int = _help("Prompts are left-truncated to this many tokens.", 256)
    max_completion_length: int = _help("New tokens generated per completion.", 64)
    temperature: float = _help("0 = greedy (default); > 0 samples.", 0.0)
    rows_per_chunk: int = _help("Max generation rows per forward pass (0 = all at once; "
                                "with a profile, the planner lowers it to what fits).", 0)
    generation_backend: str = _help("'loop' (static-cache decode loop, CUDA graphs on GPU) or "
                                    "'generate' (transformers generate()).", "loop")
    kv_cache_dtype: str = _help("KV cache of the decode loop: 'auto' (compute dtype) or "
                                "'int8' (half the memory, per-vector scales; loop only).",
                                "auto")
    reward_weights: list[float] | None = _help("One weight per reward function.", None)
    pass_at_k: bool = _help("Score a prompt by whether its num_generations samples solve it "
                            "(pass@k, k = num_generations) instead of their mean reward.", False)
    pass_at_k_fraction: float = _help("With pass_at_k: fraction of the k samples that must be "
                                      "correct (0 = any one).", 0.0)
    correct_threshold: float = _help("A completion counts as correct when its total reward "
                                     "is >= this (pass@k and accuracy).", 1.0)
    # --- LoRA ---
    lora_rank: int = _help("LoRA rank r.", 8)
    lora_alpha: float = _help("LoRA scaling numerator: scale = alpha / r.", 16.0)
    lora_target_modules: list[str] = _help("Module name suffixes to adapt.",
                                           factory=lambda: list(DEFAULT_TARGET_MODULES))
    # --- model ---
    load_in_4bit: bool = _help("Quantize the frozen base to NF4 (bitsandbytes).", True)
    compute_dtype: str = _help("'auto' = float32 on CPU, bfloat16 on CUDA.", "auto")
    device: str = _help("'auto', 'cpu' or 'cuda[:i]'.", "auto")
    nf4_kernel: bool = _help("On CUDA, run the frozen NF4 base through lowmem-es' fused "
                             "NF4 matmul (False: bitsandbytes).", True)
    noise_backend: str = _help("CPU noise generator: 'eager' or 'compiled' (torch.compile).",
                               "eager")
    # --- output ---
    output_dir: str = _help("Where adapters, journal and metrics go.", "runs/lowmem-es")
    save_steps: int = _help("Checkpoint every N iterations (0 = only at the end); the "
                            "journal replays the iterations in between on resume.", 25)
    save_total_limit: int = _help("Keep the newest N checkpoints (0 = keep all).", 3)
    eval_steps: int = _help("Evaluate the centre every N iterations (0 = never).", 0)
    logging_steps: int = _help("Print a progress line every N iterations.", 1)
    distributed_timeout: float = _help("Seconds a torchrun rank waits for a dead or stuck "
                                       "peer before failing.", 600.0)
    max_hours: float = _help("Stop cleanly (with a checkpoint) before this many hours "
                             "(0 = no limit).", 0.0)
    profile: str | None = _help("VRAM profile name or path (lowmem-es profiles): sets the "
                                "budget the memory planner fits rows and lengths into.", None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the fix for any bad value."""
        self._validate_values()
        self._validate_combinations()

    def _bad(self, name: str, fix: str) -> ValueError:
        """The error for field ``name``: what it should be (``fix``) and its value."""
        return ValueError(f"`{name}` {fix}, but the value passed is {getattr(self, name)!r}")

    def _validate_values(self) -> None:
        """Check each field on its own (type, range, choices), normalising lists and paths.

        Kept apart from the checks of fields against each other so that the values of one
        source (a config file) can be checked before other sources complete them.
        """
        bad = self._bad
        for item in dataclasses.fields(self):  # numpy / torch scalars become Python numbers
            setattr(self, item.name, _plain_number(getattr(self, item.name)))
        if isinstance(self.reward_weights, tuple):
            self.reward_weights = list(self.reward_weights)
        if isinstance(self.reward_weights, list):
            self.reward_weights = [_plain_number(w) for w in self.reward_weights]
        for name in ("population_size", "iterations", "batch_size", "num_generations",
                     "max_prompt_length", "max_completion_length", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "should be a positive integer")
        for name in ("save_steps", "save_total_limit", "eval_steps", "logging_steps",
                     "rows_per_chunk", "seed", "prompts_per_pair"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, "should be a non-negative integer")
        if self.seed > MAX_SEED:
            raise bad("seed", f"should be at most 2**63 - 1 = {MAX_SEED} (run.toml stores it "
                      "as a TOML integer, which is signed 64-bit), so pick a smaller seed")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "should be true or false (a bool; in a TOML file write "
                          f"`{name} = false` without quotes)")
        if self.population_size < 2:
            raise bad("population_size", "should be at least 2 (ES compares members); use 30 "
                      "as in the paper")
        for name in ("sigma", "learning_rate", "lora_alpha"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise bad(name, "should be a positive number")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "should be >= 0")
        if not _is_number(self.anchor_decay) or not 0 <= self.anchor_decay < math.inf:
            raise bad("anchor_decay", "should be a finite number >= 0 (0 means off)")
        if not _is_number(self.sigma_growth) or not 1 <= self.sigma_growth <= SIGMA_GROWTH_CAP:
            raise bad("sigma_growth", f"should be in [1, {SIGMA_GROWTH_CAP:g}] (1 means off; "
                      "try 2)")
        if not _is_number(self.lr_min_ratio) or not 0 <= self.lr_min_ratio <= 1:
            raise bad("lr_min_ratio", "should be in [0, 1] (1 means no decay)")
        if not _is_number(self.pass_at_k_fraction) or not 0 <= self.pass_at_k_fraction <= 1:
            raise bad("pass_at_k_fraction", "should be in [0, 1] (0 means any sample)")
        if not _is_number(self.distributed_timeout) or not self.distributed_timeout > 0:
            raise bad("distributed_timeout", "should be a positive number of seconds")
        if not _is_number(self.max_hours) or not 0 <= self.max_hours < math.inf:
            raise bad("max_hours", "should be a finite number >= 0 (0 means no limit)")
        if not _is_number(self.correct_threshold):
            raise bad("correct_threshold", "should be a number")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "should be >= 0 (0 means greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:  # sampling divides by it in float32
            raise bad("temperature", f"should be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        for name in FLOAT_FIELDS:  # the checks above let inf through
            if not math.isfinite(getattr(self, name)):
                default = next(f.default for f in dataclasses.fields(self) if f.name == name)
                raise bad(name, f"should be a finite number, not inf or nan (the default is "
                          f"{default!r})")
        choices = {"fitness_shaping": FITNESS_SHAPINGS, "optimizer": OPTIMIZERS,
                   "prompt_assignment": PROMPT_ASSIGNMENTS,
                   "fitness_baseline": FITNESS_BASELINES,
                   "noise_scaling": NOISE_SCALINGS,
                   "lr_schedule": LR_SCHEDULES,
                   "compute_dtype": DTYPES, "noise_backend": ("eager", "compiled"),
                   "generation_backend": ("loop", "generate"),
                   "kv_cache_dtype": ("auto", "int8")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise bad(name, f"should be one of {list(valid)}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        if not isinstance(self.lora_target_modules, list) or not self.lora_target_modules \
                or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise bad("lora_target_modules", "should be a non-empty list of module names "
                      "such as ['q_proj', 'v_proj']")
        if not is_device_name(self.device):
            raise bad("device", f"should be {DEVICE_FORMS}")
        if self.reward_weights is not None and (
                not isinstance(self.reward_weights, list)
                or not all(_is_number(w) and math.isfinite(w) for w in self.reward_weights)):
            raise bad("reward_weights", "should be a list of numbers, one per reward function, "
                      "each finite (not inf or nan)")
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise bad("output_dir", "should be a directory path (a non-empty string) such as "
                      "'runs/lowmem-es'")
        if isinstance(self.profile, os.PathLike):
            self.profile = os.fspath(self.profile)
        if self.profile is not None and (not isinstance(self.profile, str) or not self.profile):
            raise bad("profile", "should be a profile name such as '8gb' (see `lowmem-es "
                      "profiles`), the path of a profile TOML file, or unset for no profile")

    def _validate_combinations(self) -> None:
        """Check the fields that constrain each other (each field already valid alone)."""
        bad = self._bad
        if self.antithetic and self.population_size % 2:
            raise bad("population_size", "should be even when `antithetic=True` (members come "
                      f"in +/- pairs); use {self.population_size + 1} or set antithetic=False")
        if self.fitness_baseline == "pair" and not self.antithetic:
            raise bad("fitness_baseline", "'pair' needs antithetic=True (members in +/- "
                      "pairs); use 'prompt' or 'none', or set antithetic=True")
        if self.prompts_per_pair and self.prompt_assignment != "per_pair":
            raise bad("prompts_per_pair", "applies to prompt_assignment='per_pair' only; set "
                      "prompt_assignment='per_pair' or leave prompts_per_pair at 0")
        if self.num_generations > 1 and self.temperature == 0:
            raise bad("num_generations", "needs sampling to give different completions; set "
                      "temperature > 0 (e.g. 0.7) or num_generations=1")
        if self.kv_cache_dtype != "auto" and self.generation_backend != "loop":
            raise bad("kv_cache_dtype", "needs generation_backend='loop' (generate() keeps its "
                      "own 16-bit cache); set kv_cache_dtype='auto' or "
                      "generation_backend='loop'")

    @property
    def prompts_per_member(self) -> int:
        """Prompts each member generates for per iteration: batch_size with one shared
        batch, prompts_per_pair (0: batch_size) with per-pair prompts. What sizes a
        member's rows, so what the memory planner must plan for."""
        if self.prompt_assignment == "per_pair" and self.prompts_per_pair:
            return self.prompts_per_pair
        return self.batch_size

    # --- serialisation ---
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON/TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every config field, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ESConfig:
        """Build from a dict; unknown keys are an error that lists the valid ones."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown {source} key(s) {unknown}; valid keys are "
                             f"{cls.field_names()}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> ESConfig:
        """Load a TOML run file (top-level keys or an [es] table), then apply overrides."""
        values = read_toml_values(path)
        values.update(overrides or {})
        try:
            return cls.from_dict(values, source=f"config file {str(path)!r}")
        except ValueError as error:  # name the file: run.toml of a resumed run, or --config
            where = f"config file {str(path)!r}"
            if overrides:
                where += f" with overrides of {sorted(overrides)}"
            raise ValueError(f"in {where}: {error}") from error

    def result_hash(self) -> str:
        """Hash of the fields that change results (not logging/output fields)."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in NON_RESULT_FIELDS
                    and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (bool is an int subclass)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain_number(value: Any) -> Any:
    """A numpy or torch scalar (``np.float64`` from ``np.logspace``, ``np.int64``, a 0-d
    tensor, ``np.bool_`` ...) as the Python int, float or bool it stands for (its
    ``.item()``), so that it validates, compares and is written to run.toml as a number
    (repr would write ``np.float64(0.03)``, which no TOML reader reads back); anything
    else unchanged."""
    if type(value) in (bool, int, float):
        return value
    item = getattr(value, "item", None)
    if callable(item) and tuple(getattr(value, "shape", (None,))) == ():
        plain = item()
        if type(plain) in (bool, int, float):
            return plain
    return value


def is_device_name(name: Any) -> bool:
    """Whether ``name`` is a device a run accepts: one of ``DEVICE_FORMS``."""
    return isinstance(name, str) and _DEVICE_NAME.fullmatch(name) is not None


def read_utf8(path: Path, what: str, encoding: str = "utf-8-sig") -> str:
    """The text of ``path``, decoded as UTF-8 (by default with or without a byte-order mark).

    TOML and JSON files are UTF-8; a file saved in another encoding (Latin-1, UTF-16 ...)
    is a ValueError that names it (``what``, e.g. "config file 'run.toml'"), the line of
    the first bad byte and how to fix it, not a bare UnicodeDecodeError. Editors on Windows
    often write a BOM: "utf-8-sig" drops it (tomllib reports it as an invalid statement).
    """
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{what} is not UTF-8 text (byte {data[error.start]:#04x} on line "
                         f"{line} cannot be decoded); save it with UTF-8 encoding") from error


def load_toml(path: Path, what: str) -> dict[str, Any]:
    """The table of the TOML file ``path`` (UTF-8, a BOM allowed), or a ValueError naming
    it (``what``) for a file that is not UTF-8 or not valid TOML."""
    try:
        return tomllib.loads(read_utf8(path, what))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{what} is not valid TOML: {error}") from error


def read_toml_values(path: str | Path) -> dict[str, Any]:
    """The ESConfig keys a TOML run file sets (top level or an [es] table), checked.

    With an [es] table every key must be in it: top-level keys next to it are an error,
    not silently dropped. Each value is checked on its own (ValueError "in config file
    PATH: ..."); the checks of fields against each other run when the ESConfig is built.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; pass an "
                                "existing TOML file to --config")
    data = load_toml(path, f"config file {str(path)!r}")
    if "es" in data:
        table = data["es"]
        if not isinstance(table, dict):
            raise ValueError(f"`es` in config file {str(path)!r} should be a table (an [es] "
                             f"line followed by ESConfig keys), but it is {table!r}; write the "
                             "keys at the top level or under [es]")
        others = sorted(set(data) - {"es"})
        if others:
            raise ValueError(f"config file {str(path)!r} has an [es] table and top-level "
                             f"key(s) {others}, which would be ignored; move them under the "
                             "[es] line (or drop the [es] line to keep every key at the top "
                             "level)")
        values = dict(table)
    else:
        values = dict(data)
    unknown = sorted(set(values) - set(ESConfig.field_names()))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config file {str(path)!r}; valid keys "
                         f"are {ESConfig.field_names()}")
    # Check each value now, while the file it came from is known: the caller merges the
    # values with a profile and flags first, and the merged error could not name the file.
    # (Fields checked against each other wait for the merge: a flag may complete them.)
    probe = ESConfig()
    for key, value in values.items():
        setattr(probe, key, value)
    try:
        probe._validate_values()
    except ValueError as error:
        raise ValueError(f"in config file {str(path)!r}: {error}") from error
    return values


def to_toml(values: dict[str, Any]) -> str:
    """Minimal TOML writer for flat dicts of str/int/float/bool/list/None (None is omitted)."""
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_string(text: str) -> str:
    """A TOML basic string: escape backslash, quote and control characters; keep the rest.

    (json.dumps would write non-BMP characters as UTF-16 surrogate pairs, which TOML rejects.)
    """
    short = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n",
             "\f": "\\f", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in short:
            out.append(short[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
