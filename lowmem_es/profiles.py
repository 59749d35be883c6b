"""VRAM profiles: the memory budget of one card and the knobs the memory planner needs.

A profile is a flat, commented TOML file. The shipped ones (``8gb``, ``12gb``, ``16gb``,
``24gb``, ``cpu``) live in ``lowmem_es/profiles/`` and are installed as package data, so
``--profile 8gb`` works from any install; ``--profile path/to/card.toml`` loads your own.
A profile sets ESConfig defaults (``Profile.es_overrides``) and tells the planner
(lowmem_es.planner) how much memory a run may use. Precedence of a run's settings:
ESConfig defaults < profile < config file < flags (``resolve_es_values``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lowmem_es.config import load_toml

DEVICES = ("cuda", "cpu")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", *COMPUTE_DTYPES, "int8")
GIB = 2**30
MIB = 2**20


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Profile:
    """One card's memory budget and the limits runs under it respect (see the TOML files)."""

    name: str = _help("Profile name: the file's stem (8gb, cpu ...) or the path given.")
    memory_budget_gib: float = _help("Total memory of the device, GiB (RAM for cpu).")
    reserve_gib: float = _help("Never available to tensors: CUDA context, handles, allocator "
                               "fragmentation (on CPU: interpreter and libraries).")
    workspace_mib: float = _help("Allocated but not modelled term by term: cuBLAS workspace, "
                                 "small temporaries.")
    headroom_fraction: float = _help("Plan this fraction below the usable memory so a small "
                                     "planner error still fits.")
    compute_dtype: str = _help("Activations and unquantized weights: float32, float16 or "
                               "bfloat16.")
    max_rows_in_flight: int = _help("Most generation rows in one forward pass.")
    max_prompt_length: int = _help("Default max_prompt_length of runs under this profile.")
    max_completion_length: int = _help("Default max_completion_length of runs under this "
                                       "profile.")
    device: str = _help("Which device the budget describes: 'cuda' or 'cpu'.", "cuda")
    kv_cache_dtype: str = _help("KV-cache dtype; 'auto' = compute_dtype.", "auto")
    embedding_on_cpu: bool = _help("Keep the input embedding in CPU memory (cuda only).", False)
    description: str = _help("One line on what the profile is for.", "")
    source: str = _help("The file it was read from (not a TOML key).", "")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key, its value and the fix for any bad value."""
        def bad(key: str, fix: str) -> ValueError:
            where = f" in profile {self.source or self.name!r}"
            return ValueError(f"`{key}`{where} {fix}, but the value is {getattr(self, key)!r}")

        for key in ("memory_budget_gib", "reserve_gib", "workspace_mib", "headroom_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad(key, "should be a non-negative number")
            if not math.isfinite(value):
                raise bad(key, "should be a finite number (inf and nan are not allowed)")
        if not self.memory_budget_gib > 0:
            raise bad("memory_budget_gib", "should be > 0 (GiB of the card)")
        if self.reserve_gib >= self.memory_budget_gib:
            raise bad("reserve_gib", f"should be below memory_budget_gib "
                      f"({self.memory_budget_gib}); the reserve is carved out of the budget")
        if not self.headroom_fraction < 0.5:
            raise bad("headroom_fraction", "should be in [0, 0.5) (e.g. 0.05)")
        for key in ("max_rows_in_flight", "max_prompt_length", "max_completion_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "should be a positive integer")
        if self.device not in DEVICES:
            raise bad("device", f"should be one of {list(DEVICES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", f"should be one of {list(COMPUTE_DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"should be one of {list(KV_CACHE_DTYPES)}")
        if self.kv_cache_dtype not in ("auto", self.compute_dtype, "int8"):
            raise bad("kv_cache_dtype", "must be \"auto\" (= compute_dtype), the compute_dtype "
                      "itself or \"int8\" (lowmem_es.kv_cache); a 16-bit cache in another "
                      "dtype than the activations is not supported")
        if not isinstance(self.embedding_on_cpu, bool):
            raise bad("embedding_on_cpu", "should be true or false")
        if self.embedding_on_cpu and self.device == "cpu":
            raise bad("embedding_on_cpu", "only applies to cuda profiles (on cpu everything "
                      "is in CPU memory); set embedding_on_cpu = false")
        if not isinstance(self.description, str):
            raise bad("description", "should be a string")

    # --- derived values ---
    @property
    def kv_dtype(self) -> str:
        """The KV-cache dtype with 'auto' resolved."""
        return self.compute_dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def run_kv_cache_dtype(self) -> str:
        """What a run under this profile sets ``ESConfig.kv_cache_dtype`` to: "int8" or
        "auto" (a 16-bit cache in the compute dtype, however the profile spells it)."""
        return "int8" if self.kv_cache_dtype == "int8" else "auto"

    @property
    def usable_bytes(self) -> int:
        """Memory tensors may take: the budget less the reserve."""
        return int((self.memory_budget_gib - self.reserve_gib) * GIB)

    @property
    def target_bytes(self) -> int:
        """What the planner plans to: usable memory less the headroom."""
        return int(self.usable_bytes * (1.0 - self.headroom_fraction))

    def es_overrides(self) -> dict[str, Any]:
        """ESConfig fields this profile sets (applied above ESConfig's own defaults).

        ``rows_per_chunk`` is the profile's cap; the planner lowers it to what fits for a
        given model. ``device`` pins the device the budget was written for.
        """
        return {"profile": self.name, "device": self.device,
                "compute_dtype": self.compute_dtype,
                "max_prompt_length": self.max_prompt_length,
                "max_completion_length": self.max_completion_length,
                "rows_per_chunk": self.max_rows_in_flight,
                "kv_cache_dtype": self.run_kv_cache_dtype}

    def to_dict(self) -> dict[str, Any]:
        """Every field, TOML/JSON friendly."""
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        """Keys a profile TOML file may set (``name`` and ``source`` come from the file)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "source")]

    @classmethod
    def required_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.name not in ("name", "source")]


def profile_dir() -> Path:
    """The folder of the shipped profiles (package data of lowmem_es)."""
    return Path(str(resources.files("lowmem_es") / "profiles"))


def list_profiles() -> list[str]:
    """Names of the shipped profiles: CUDA ones by budget, then cpu."""
    names = [path.stem for path in profile_dir().glob("*.toml")]
    profiles = [load_profile(name) for name in names]
    profiles.sort(key=lambda p: (p.device == "cpu", p.memory_budget_gib, p.name))
    return [p.name for p in profiles]


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (``"8gb"``) or a profile TOML file by path, validated."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"`profile` should be a profile name ({', '.join(_shipped_names())}) "
                         f"or the path of a TOML file, but the value is {name_or_path!r}")
    text = str(name_or_path)
    shipped = profile_dir() / f"{text}.toml"
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    if not looks_like_path and shipped.is_file():
        return _read(shipped, name=text)
    if looks_like_path or Path(text).is_file():
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"profile file {text!r} does not exist; pass a profile "
                                    f"name ({', '.join(_shipped_names())}) or the path of "
                                    "a TOML file")
        return _read(path, name=text)
    raise ValueError(f"unknown profile {text!r}; available profiles are "
                     f"{_shipped_names()}, or pass the path of a TOML file")


def _shipped_names() -> list[str]:
    return sorted(path.stem for path in profile_dir().glob("*.toml"))


def _read(path: Path, name: str) -> Profile:
    """The profile in the TOML file ``path`` (UTF-8, a BOM allowed), its keys checked."""
    data = load_toml(path, f"profile {str(path)!r}")
    unknown = sorted(set(data) - set(Profile.keys()))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in profile {str(path)!r}; valid keys "
                         f"are {Profile.keys()}")
    missing = [key for key in Profile.required_keys() if key not in data]
    if missing:
        raise ValueError(f"profile {str(path)!r} is missing key(s) {missing}; every profile "
                         f"sets {Profile.required_keys()}")
    return Profile(name=name, source=str(path), **data)


def resolve_es_values(profile: Profile | None, config_values: dict[str, Any] | None = None,
                      flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """ESConfig keyword values by precedence: profile < config file < flags.

    (ESConfig's own defaults sit below all three: they fill whatever is left unset.)
    ``flag_values`` entries that are None mean "flag not given" and are skipped.
    """
    values: dict[str, Any] = dict(profile.es_overrides()) if profile is not None else {}
    values.update(config_values or {})
    values.update({k: v for k, v in (flag_values or {}).items() if v is not None})
    return values
