"""PEFT adapter directories on disk: what lowmem-es writes, reads and refuses.

An adapter directory is ``adapter_config.json`` + ``adapter_model.safetensors`` under
PEFT's key names (``base_model.model.<module>.lora_A.weight``), so
``peft.PeftModel.from_pretrained`` loads what we save, and we load what PEFT saves, as
long as ES-LoRA layers compute the same output (one rank and alpha, no rsLoRA, no
biases: ``check_adapter_scaling``). Safetensors only, never pickle; every directory is
written through ``atomic.atomic_directory``. The model-free half (``adapter_params``,
``param_tensor_ids``, ``write_adapter_tensors``) serves journal replay, which rebuilds
masters without loading a model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lowmem_es.atomic import atomic_directory
from lowmem_es.errors import CheckpointError
from lowmem_es.noise import tensor_id

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM's adapter tensors


class AdapterModel(Protocol):
    """What adapter I/O reads of a model: ``lowmem_es.lora.ESLoraModel`` (a protocol, so
    this module needs no import of the layers, which call it)."""

    rank: int
    alpha: float
    target_modules: list[str]
    base_model_name_or_path: str | None
    layers: dict[str, Any]  # canonical name -> ESLoraLinear (qualified_name, lora_A, lora_B)

    def state_dict_peft(self) -> dict[str, torch.Tensor]: ...


def check_adapter_destination(path: Path) -> None:
    """Refuse to write an adapter where ``atomic_directory`` would destroy something: the
    directory is replaced as a whole, so it must be new, empty, or an adapter directory
    (only adapter files). Everything that writes an adapter directory calls this."""
    path = Path(path)
    if not path.exists():
        return
    held = ([p.name for p in path.iterdir() if p.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)]
            if path.is_dir() else [path.name])
    if held:
        raise ValueError(f"cannot write an adapter to {str(path)!r}: it holds "
                         f"{sorted(held)[:5]}, and writing replaces the whole directory; "
                         "choose a new or empty directory")


def check_adapter_scaling(path: Path, config: dict, alpha: float) -> None:
    """Refuse a PEFT adapter whose output this layer would compute differently.

    ES-LoRA layers compute ``scale * (x A^T) B^T`` with ``scale = alpha / r`` for every
    layer and no LoRA bias. An adapter saved with another ``lora_alpha``, rsLoRA scaling
    (alpha / sqrt(r)), per-layer ``rank_pattern``/``alpha_pattern`` or trained biases
    would load without complaint and then give other outputs than PEFT: an evaluation
    would silently score a different model.
    """
    where = f"adapter {str(path)!r}"
    saved = config.get("lora_alpha", alpha)
    if saved is not None and float(saved) != float(alpha):
        raise ValueError(f"{where} has lora_alpha={saved} but this run uses lora_alpha="
                         f"{alpha}; set lora_alpha={saved} (the LoRA scale is alpha / r)")
    if config.get("use_rslora"):
        raise ValueError(f"{where} uses rsLoRA scaling (use_rslora=true: alpha / sqrt(r)), "
                         "which ES-LoRA layers do not compute; merge or re-save it without "
                         "rsLoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{where} sets per-layer `{key}` {config[key]}, which "
                             "ES-LoRA layers do not follow (one rank and alpha for every "
                             "layer)")
    if config.get("bias", "none") not in (None, "none"):
        raise ValueError(f"{where} trains LoRA biases (bias={config['bias']!r}), which "
                         "ES-LoRA layers do not have; use an adapter saved with "
                         "bias='none'")


def adapter_params(path: Path) -> dict[str, torch.Tensor]:
    """fp32 masters of a PEFT adapter dir keyed like ESLoraModel.parameters()."""
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    params = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise CheckpointError(f"adapter {str(path)!r}: unexpected tensor {key!r}")
        params[name[: -len(".weight")]] = value.to(torch.float32).contiguous()
    return params


def param_tensor_ids(params: Iterable[str]) -> dict[str, int]:
    """Noise-contract tensor id of each ``<module>.lora_A|B`` name (as lowmem_es.lora does)."""
    ids = {}
    for name in params:
        module, _, matrix = name.rpartition(".lora_")
        ids[name] = tensor_id(module, matrix)
    return ids


def write_adapter_tensors(params: dict[str, torch.Tensor], config_source: Path,
                          destination: Path) -> Path:
    """Write replayed masters as a PEFT adapter dir, copying adapter_config.json."""
    check_adapter_destination(Path(destination))
    with atomic_directory(Path(destination)) as tmp:
        tensors = {f"{PEFT_PREFIX}{name}.weight": t.contiguous() for name, t in params.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "producer": "lowmem-es replay"})
        shutil.copyfile(Path(config_source) / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
    return Path(destination)


def adapter_settings(adapter: str | os.PathLike) -> dict[str, Any]:
    """(rank, alpha, target modules, base model) of a PEFT adapter directory."""
    path = Path(adapter)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"adapter directory {str(path)!r} has no adapter_config.json; "
                                "pass the directory written by save_adapter (e.g. "
                                "runs/NAME/adapter)")
    where = f"adapter config {str(config_file)!r}"
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON ({error}); pass the directory written "
                         "by save_adapter or PEFT, or re-save the adapter") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} is a JSON {type(config).__name__}, not an object")
    targets = config.get("target_modules")
    if isinstance(targets, str):  # PEFT also allows a regex string; we need names
        raise ValueError(f"adapter {str(path)!r} gives target_modules as the pattern "
                         f"{targets!r}; only lists of module names are supported")
    if not (isinstance(targets, list) and targets
            and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"{where} has target_modules={targets!r}; it must be a non-empty "
                         "list of module names such as [\"q_proj\", \"v_proj\"]")
    numbers = {}
    for key, kind in (("r", int), ("lora_alpha", float)):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{where} has {key}={value!r}; it must be a positive number "
                             "(the LoRA rank r and scale lora_alpha / r)")
        numbers[key] = kind(value)
    if numbers["r"] != config["r"]:
        raise ValueError(f"{where} has r={config['r']!r}; the rank must be a whole number")
    return {"rank": numbers["r"], "alpha": numbers["lora_alpha"], "target_modules": targets,
            "base_model": config.get("base_model_name_or_path")}


def save_adapter(model: AdapterModel, path: str | os.PathLike) -> Path:
    """Write a standard PEFT adapter directory atomically; returns its path.

    The directory is replaced as a whole, so an existing ``path`` must be empty or an
    adapter directory (only adapter files): anything else is refused, not deleted.
    """
    path = Path(path)
    check_adapter_destination(path)
    with atomic_directory(path) as tmp:
        write_adapter(model, tmp)
    return path


def write_adapter(model: AdapterModel, directory: Path) -> None:
    """Write the PEFT adapter files (weights + adapter_config.json) into ``directory``."""
    from peft import LoraConfig

    config = LoraConfig(r=model.rank, lora_alpha=model.alpha,
                        target_modules=sorted(model.target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=model.base_model_name_or_path)
    save_file(model.state_dict_peft(), str(Path(directory) / ADAPTER_WEIGHTS),
              metadata={"format": "pt", "producer": "lowmem-es"})
    config.save_pretrained(str(directory))


def load_adapter(model: AdapterModel, path: str | os.PathLike) -> None:
    """Load master weights from a PEFT adapter directory (safetensors only, no pickle)."""
    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter directory {str(path)!r}; "
                                "pass a directory written by save_adapter or PEFT")
    config = json.loads((path / ADAPTER_CONFIG).read_text()) if (
        path / ADAPTER_CONFIG).is_file() else {}
    if config.get("r", model.rank) != model.rank:
        raise ValueError(f"adapter {str(path)!r} has rank r={config['r']} but this run uses "
                         f"lora_rank={model.rank}; set lora_rank={config['r']}")
    check_adapter_scaling(path, config, model.alpha)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as error:  # truncated, not safetensors, unreadable
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file ({error}); "
                         "the adapter is damaged or was not written completely: write it "
                         "again (a run's checkpoints/step_* hold earlier copies, and "
                         "`lowmem-es replay` rebuilds any step from the journal)") from None
    values = []
    used = set()
    for layer in model.layers.values():
        for matrix, target in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            key = f"{PEFT_PREFIX}{layer.qualified_name}.{matrix}.weight"
            alt = key.replace(".weight", ".default.weight")
            found = key if key in tensors else alt
            value = tensors.get(found)
            if value is None:
                raise ValueError(f"adapter {str(path)!r} has no tensor {key!r}; was it "
                                 "trained for the same model and target modules?")
            if value.shape != target.shape:
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            used.add(found)
            values.append((target, value))
    extra = sorted(set(tensors) - used)
    if extra:  # e.g. layers this model does not have: the adapter is for another model
        raise ValueError(f"adapter {str(path)!r} has {len(extra)} tensor(s) this model has "
                         f"no LoRA layer for, e.g. {extra[0]!r}; it was trained for "
                         "another model or other target modules")
    for target, value in values:  # only once all of it fits: no half-loaded adapter
        target.data.copy_(value.to(torch.float32))
