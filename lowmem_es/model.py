"""Model loading: a frozen causal LM, NF4-quantized by bitsandbytes, and its tokenizer.

Only safetensors weights are accepted (``use_safetensors=True``: no pickle), and remote
code runs only when the caller asks for it. Errors name the path and what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from lowmem_es.config import DEVICE_FORMS, is_device_name

logger = logging.getLogger("lowmem_es")


def prepare_tokenizer(tokenizer: object, what: str = "the tokenizer") -> object:
    """Make ``tokenizer`` fit for batched generation, in place: left padding (completions
    are appended on the right) and a pad token (its EOS token when it has none; ``what``
    names it in the error when it has neither). Returns it."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{what} has neither a pad nor an EOS token; set "
                             "tokenizer.pad_token before training")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device a run computes on.

    'auto': this process's GPU when CUDA is available, else the CPU. 'cuda' without an
    index: this process's GPU. This process's GPU is ``cuda:LOCAL_RANK`` under torchrun
    (each rank its own card; a fixed index would put every rank's model on one card),
    else the current CUDA device. An explicit 'cuda:N' must exist. Any other name (a typo
    such as 'cuda:x', or a device lowmem-es does not run on such as 'tpu' or 'mps') is a
    ValueError listing the accepted forms, raised before torch.device sees it.
    """
    if not is_device_name(name):
        raise ValueError(f"`device` should be {DEVICE_FORMS}, but the value passed is "
                         f"{name!r}")
    if name == "auto":
        return torch.device("cuda", _own_gpu()) if torch.cuda.is_available() \
            else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"`device` is {name!r} but no CUDA device is available; use "
                         "device='cpu' or 'auto'")
    if name == "cuda":
        return torch.device("cuda", _own_gpu())
    # The index is compared before torch.device sees it: torch cannot parse one past 2**31
    # and wraps one past 127 into another device.
    index, count = int(name.partition(":")[2]), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"`device` is {name!r} but this machine has {count} CUDA "
                         f"device(s) (cuda:0..cuda:{count - 1}); use 'cuda' or 'auto'")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
            and index != int(os.environ.get("LOCAL_RANK", index)):
        logger.warning("`device` is %r under torchrun: every rank then uses that one card; "
                       "give device='cuda' or 'auto' so that each rank takes "
                       "cuda:LOCAL_RANK", name)
    return torch.device("cuda", index)


def _own_gpu() -> int:
    """This process's CUDA device index: LOCAL_RANK under torchrun, else the current one."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.cuda.current_device()
    index, count = int(local), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"LOCAL_RANK={index} but this machine has {count} CUDA device(s): "
                         "start torchrun with --nproc_per_node at most the number of GPUs")
    return index


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
               trust_remote_code: bool = False, embedding_on_cpu: bool = False
               ) -> tuple[nn.Module, object, torch.device]:
    """Load (model, tokenizer, device): frozen, eval mode, NF4 + double quant when asked.

    The tokenizer pads on the left (generation appends on the right) and falls back to
    EOS as its pad token. ``embedding_on_cpu`` (a profile knob) moves the input embedding
    to CPU memory after loading (``offload_input_embedding``); ignored on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = str(path)
    _check_model_path(path)
    if Path(path).expanduser().exists():  # from_pretrained does not expand "~"
        path = str(Path(path).expanduser())
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
    prepare_tokenizer(tokenizer, f"tokenizer of {path!r}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if embedding_on_cpu and target.type == "cuda":
        offload_input_embedding(model, target)
    return model, tokenizer, target


class OffloadedEmbedding(nn.Module):
    """The input embedding held in CPU memory: token ids gather on the host, rows go over.

    For a 7B model the embedding is vocab x hidden in 16 bits (~1 GiB for Qwen2.5-7B and
    Llama-3.1-8B), a sixth of what an 8 GB card can give to tensors, while a lookup touches
    rows x hidden values: moving it to host memory frees that VRAM for the KV cache at the
    cost of one small device-to-host copy of the ids and one host-to-device copy of the
    embedded rows per forward.

    The wrapped module (the model's own, so scaled embeddings and the like keep their
    behaviour) is deliberately not a registered submodule: its weight is invisible to
    ``parameters()``, ``state_dict()`` and ``model.to()``, so ``model.device`` still names
    the GPU and nothing moves the weight back by accident.
    """

    def __init__(self, embedding: nn.Module, device: torch.device) -> None:
        super().__init__()
        object.__setattr__(self, "inner", embedding)  # not registered, on purpose
        self.device = torch.device(device)

    @property
    def weight(self) -> torch.Tensor:
        """The host-memory weight (vocab, hidden), for code that inspects the embedding."""
        return self.inner.weight

    @property
    def num_embeddings(self) -> int:
        return int(self.inner.weight.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.inner.weight.shape[1])

    def host_lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedded rows, still in host memory (the decode loop copies them itself)."""
        return self.inner(input_ids.to("cpu"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.host_lookup(input_ids).to(self.device, non_blocking=False)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, in CPU memory -> "
                f"{self.device}")


def offload_input_embedding(model: nn.Module, device: torch.device | str) -> bool:
    """Keep ``model``'s input embedding in CPU memory (see ``OffloadedEmbedding``).

    Returns False, with a log line, when that cannot help: the embedding is tied to the
    output head (lm_head needs the same weight on the GPU every step), or is already
    offloaded. On CUDA the host copy is pinned (faster transfers) when memory allows, and
    the freed VRAM goes back to the driver.
    """
    embedding = model.get_input_embeddings()
    if isinstance(embedding, OffloadedEmbedding):
        return False
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        logger.info("embedding_on_cpu has no effect for %s: its input embedding is tied to "
                    "lm_head, which must stay on the GPU", type(model).__name__)
        return False
    device = torch.device(device)
    weight = embedding.weight.detach().to("cpu")
    if device.type == "cuda":
        try:
            weight = weight.pin_memory()
        except RuntimeError:  # pinning can fail under memory limits: pageable still works
            pass
    embedding.weight = nn.Parameter(weight, requires_grad=False)
    model.set_input_embeddings(OffloadedEmbedding(embedding, device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return True


def restore_input_embedding(model: nn.Module) -> bool:
    """Undo ``offload_input_embedding``: the weight back on its device (False if not
    offloaded). For tools that try several profiles on one loaded model."""
    embedding = offloaded_embedding(model)
    if embedding is None:
        return False
    inner = embedding.inner
    inner.weight = nn.Parameter(inner.weight.detach().to(embedding.device), requires_grad=False)
    model.set_input_embeddings(inner)
    return True


def offloaded_embedding(model: nn.Module) -> OffloadedEmbedding | None:
    """The model's ``OffloadedEmbedding``, or None when its embedding is on the device."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    return embedding if isinstance(embedding, OffloadedEmbedding) else None
