"""Model loading: a frozen causal LM, NF4-quantized by bitsandbytes, and its tokenizer.

Only safetensors weights are accepted (``use_safetensors=True``: no pickle), and remote
code runs only when the caller asks for it. Errors name the path and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda:0 when available else cpu; explicit cuda requests must be satisfiable."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {name!r} but no CUDA device is available; use "
                         "device='cpu' or 'auto'")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype: fp32 on CPU (bf16 is ~5x slower there), bf16 on CUDA, unless told."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def _check_model_path(path: str) -> None:
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or (os.sep in path and local.exists())
    if looks_local and not local.exists():
        raise FileNotFoundError(f"model path {path!r} does not exist; pass a directory with "
                                "config.json and *.safetensors weights, or a hub id")
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path!r} has no config.json; pass the "
                                "directory that save_pretrained wrote")


def load_model(path: str | os.PathLike, *, load_in_4bit: bool = True,
               compute_dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False) -> tuple[nn.Module, object, torch.device]:
    """Load (model, tokenizer, device): frozen, eval mode, NF4 + double quant when asked.

    The tokenizer pads on the left (generation appends on the right) and falls back to
    EOS as its pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = str(path)
    _check_model_path(path)
    target = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, target)
    kwargs: dict = {"dtype": dtype, "use_safetensors": True,
                    "trust_remote_code": trust_remote_code,
                    "device_map": {"": str(target) if target.type == "cuda" else "cpu"}}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise FileNotFoundError(
            f"could not load model {path!r}: {error}. Pass a local directory with "
            "config.json and *.safetensors weights (no download happens if the machine is "
            "offline)") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"could not load a tokenizer from {path!r}: {error}. Save the "
                                "tokenizer next to the model (tokenizer.save_pretrained)"
                                ) from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {path!r} has neither a pad nor an EOS token; set "
                             "tokenizer.pad_token before training")
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer, target
