"""Peak memory of one ES iteration vs one QLoRA backprop step, and the planner's prediction.

Same NF4 model (built from a config with random weights: nothing is downloaded), same
rows and lengths. Providers, each in its own process so that nothing leaks between them:

* ``es``: one ES iteration: ``generate_population`` over ``population x batch`` rows,
  ``rows_per_chunk`` at a time, then ``es_update`` (lowmem_es; fp32 LoRA masters).
* ``qlora``: one QLoRA step: PEFT LoRA on the same targets, forward with labels over
  ``rows_per_chunk`` rows of ``prompt + completion`` tokens, ``loss.backward()``, AdamW step.
* ``qlora_ckpt``: the same with gradient checkpointing (the usual QLoRA recipe).

Measured: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the bytes of live tensor
storages, tracked op by op with a TorchDispatchMode (the CPU analogue of allocated
memory: every op output that is a new storage is counted until it is freed), plus the
process's resident set size (psutil, sampled every 2 ms) for reference. "resident" is the
model's own tensors before the step (weights, quantization state, LoRA masters).
The planner's prediction is for the same rows and lengths with no workspace allowance.

    python bench/bench_memory.py [--device cpu|cuda] [--shape tiny|small|qwen7b|llama8b]
        [--population 8] [--batch 2] [--rows-per-chunk 16] [--prompt 64] [--completion 32]

Defaults: tiny shape on CPU, qwen7b on CUDA. Prints a markdown table and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=768,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000),
    "small": dict(model_type="llama", hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  vocab_size=32000),
    "qwen7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   vocab_size=152064, rope_theta=1e6),
    "llama8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=128256, rope_theta=5e5),
}
for _shape in SHAPES.values():
    _shape.update(max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
GIB = 2**30
MIB = 2**20


class LiveTensors(TorchDispatchMode):
    """Bytes of tensor storages created while active and not yet freed, and their peak.

    An op output whose storage is not one of the op's inputs' is a new allocation; a
    finalizer on the storage (PyTorch keeps one Python object per live storage) takes it
    off when it is freed. Views and in-place results share an input's storage: not new.
    Storages that exist before (the model's) are ``register``ed, so that replacing them
    (bitsandbytes repacks NF4 weights for its CPU kernel at the first forward) is seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in inputs:
                    self._add(storage)
        return out

    def register(self, tensors: list[torch.Tensor]) -> None:
        """Count already existing tensors (once per storage) as live."""
        for tensor in tensors:
            self._add(tensor.untyped_storage())

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


class RssSampler:
    """Peak resident set size of this process while running (sampled every 2 ms)."""

    def __enter__(self) -> RssSampler:
        import psutil

        self._process = psutil.Process()
        self.before = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight causal LM of ``shape`` with every linear but lm_head in NF4.

    Built in ``dtype`` directly on ``device`` and quantized linear by linear with
    bitsandbytes (blocksize 64, double quant), as from_pretrained(load_in_4bit) stores it.
    """
    import bitsandbytes as bnb
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(SHAPES[shape])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    output = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not output:
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                              bias=child.bias is not None, compute_dtype=dtype,
                                              compress_statistics=True, quant_type="nf4",
                                              device="meta")
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True,
                    quant_type="nf4", blocksize=64).to(device)
                if child.bias is not None:
                    quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, quantized)
    model.is_loaded_in_4bit = True  # PEFT then wraps the linears with its bnb LoRA layers
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, config


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and NF4 quantization state of a model."""
    tensors = list(model.parameters()) + list(model.buffers())
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                        if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return tensors


def prompts_for(count: int, length: int, seed: int) -> list[str]:
    """Character prompts of ``length - i % 4`` tokens (uneven, so left padding happens)."""
    from lowmem_es.example import ALPHABET

    generator = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(count):
        index = torch.randint(1, len(ALPHABET), (length - i % 4,), generator=generator)
        texts.append("".join(ALPHABET[j] for j in index.tolist()))
    return texts


def run_es(model: torch.nn.Module, args: argparse.Namespace, device: torch.device
           ) -> dict[str, Any]:
    from lowmem_es import es
    from lowmem_es.es import Member
    from lowmem_es.example import char_tokenizer
    from lowmem_es.generate import generate_population
    from lowmem_es.lora import attach_es_lora

    es_model = attach_es_lora(model, args.targets, args.rank, 2.0 * args.rank, seed=0)
    model.generation_config.min_new_tokens = args.completion  # every row runs full length
    tokenizer = char_tokenizer()
    schedule = es.member_schedule(args.population, True)
    members = [Member(pair, sign) for pair, sign in schedule]
    prompts = prompts_for(args.batch, args.prompt, seed=1)
    rows = [(m, p) for m in range(args.population) for p in range(args.batch)]
    def step() -> None:
        completions = generate_population(
            es_model, tokenizer, prompts, rows, members=members, run_seed=0, iteration=0,
            sigma=0.01, max_prompt_length=args.prompt, max_completion_length=args.completion,
            rows_per_chunk=args.rows_per_chunk, device=device)
        assert all(len(c.ids) == args.completion for c in completions)
        fitness = torch.randn(args.population, generator=torch.Generator().manual_seed(2))
        es.es_update(es_model.parameters(), es_model.tensor_ids(), run_seed=0, iteration=0,
                     shaped_fitness=es.shape_fitness(fitness.tolist()), schedule=schedule,
                     learning_rate=1e-3)

    return measure(step, model_tensors(model), device)


def run_qlora(model: torch.nn.Module, args: argparse.Namespace, device: torch.device,
              checkpointing: bool) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=args.targets,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, model.config.vocab_size,
                              (args.rows_per_chunk, args.prompt + args.completion),
                              generator=generator).to(device)
    def step() -> None:
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, model_tensors(peft_model), device)


def measure(step: Any, resident: list[torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Run ``step`` once: peak memory, and what the ``resident`` tensors held before it."""
    import resource

    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with RssSampler() as rss:
            step()
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        tracker = LiveTensors()
        tracker.register(resident)
        before = tracker.current
        with RssSampler() as rss, tracker:
            step()
        peak = tracker.peak
    return {"resident_bytes": before, "step_peak_bytes": peak - before,
            "peak_bytes": peak, "rss_before": rss.before,
            "rss_peak": rss.peak, "ru_maxrss": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": time.perf_counter() - started}


def predict(args: argparse.Namespace, device: torch.device, dtype: torch.dtype
            ) -> dict[str, Any]:
    """The planner's prediction for the ES iteration at the same rows and lengths."""
    from lowmem_es.planner import predict
    from lowmem_es.profiles import Profile

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    profile = Profile(name="bench", device=device.type, memory_budget_gib=4096.0,
                      reserve_gib=0.0, workspace_mib=0.0, headroom_fraction=0.0,
                      compute_dtype=names[dtype], max_rows_in_flight=args.rows_per_chunk,
                      max_prompt_length=args.prompt, max_completion_length=args.completion)
    return predict(dict(SHAPES[args.shape]), profile, args.rank, args.targets,
                   args.population, args.batch, rows_per_chunk=args.rows_per_chunk,
                   max_prompt_length=args.prompt,
                   max_completion_length=args.completion).to_dict()


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, _ = build_model(args.shape, device, dtype)
    if args.worker == "es":
        result = run_es(model, args, device)
    else:
        result = run_qlora(model, args, device, checkpointing=args.worker == "qlora_ckpt")
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="prompts per member")
    parser.add_argument("--rows-per-chunk", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=32, help="completion tokens")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+",
                        default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--providers", nargs="+", default=["es", "qlora", "qlora_ckpt"])
    parser.add_argument("--json-out", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("tiny" if args.device == "cpu" else "qwen7b")
    if args.worker:
        worker(args)
        return
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    prediction = predict(args, torch.device(args.device), dtype)
    results: dict[str, Any] = {}
    for provider in args.providers:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", provider,
                   "--shape", args.shape, "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            results[provider] = {"error": done.stderr[-2000:]}
            print(f"{provider} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[provider] = json.loads(lines[-1][len("RESULT "):])
    report(args, prediction, results)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "prediction": prediction, "results": results},
                      handle, indent=2)


def report(args: argparse.Namespace, prediction: dict[str, Any],
           results: dict[str, Any]) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f"{', ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}")
    print("command: python bench/bench_memory.py " + shlex.join(sys.argv[1:]))
    rows, tokens = args.rows_per_chunk, args.prompt + args.completion
    print(f"shape {args.shape}: population {args.population} x {args.batch} prompts = "
          f"{args.population * args.batch} rows, {rows} per chunk/batch, {args.prompt} + "
          f"{args.completion} = {tokens} tokens, LoRA r={args.rank} on {args.targets}\n")
    es_peak = results.get("es", {}).get("peak_bytes")
    print("| provider | resident MiB | step peak MiB | peak MiB | x ES peak | RSS before MiB "
          "| RSS peak MiB | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for provider, r in results.items():
        if "error" in r:
            print(f"| {provider} | failed | | | | | | |")
            continue
        ratio = f"{r['peak_bytes'] / es_peak:.2f}" if es_peak else ""
        print(f"| {provider} | {r['resident_bytes'] / MIB:.1f} | {r['step_peak_bytes'] / MIB:.1f}"
              f" | {r['peak_bytes'] / MIB:.1f} | {ratio} | {r['rss_before'] / MIB:.0f} | "
              f"{r['rss_peak'] / MIB:.0f} | {r['seconds']:.1f} |")
    # Resident = what exists before the step (member copies are built during it).
    static = sum(v for k, v in prediction["static"].items()
                 if k not in ("workspace", "lora_member_copies"))
    peak = prediction["predicted_peak_bytes"]
    print(f"| planner (ES) | {static / MIB:.1f} | {(peak - static) / MIB:.1f} | "
          f"{peak / MIB:.1f} | | | | |")
    if es_peak:
        print(f"\nplanner error on the ES peak: {(peak - es_peak) / es_peak:+.1%} "
              f"(predicted {peak / MIB:.1f} MiB, measured {es_peak / MIB:.1f} MiB; peak phase "
              f"{prediction['peak_phase']}: " + ", ".join(
                  f"{k} {v / MIB:.1f}" for k, v in prediction["breakdown"].items()) + " MiB)")
        for name in ("qlora", "qlora_ckpt"):
            if "peak_bytes" in results.get(name, {}):
                print(f"ES peak / {name} peak = {es_peak / results[name]['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
