"""Population-evaluation throughput: mixed-member batches vs plain inference vs member by member.

The same NF4 model, prompts, prompt length and number of new tokens per row, in one
process, three (four) ways:

* ``mixed``: lowmem-es' population evaluation, ``generate_population`` over
  ``population x batch`` rows (members ``Member(pair, sign)``, sigma > 0), the rows of
  several members in one forward pass (``--rows-per-chunk``, default all rows);
* ``plain``: the ceiling: the same rows in the same chunks through the same decode loop
  (``lowmem_es.decode.decode``) on the bare 4-bit model, no ES-LoRA layer in the way (the
  ES-LoRA layers are swapped back to their frozen base layers for these runs);
* ``lora`` (``--lora``): the adapted model served the ordinary way: the same ES-LoRA
  layers with no population active (one adapter, ``x W^T + s (x A^T) B^T`` accumulated in
  place), same rows, chunks and decode loop: what LoRA inference itself costs, so that
  ``mixed / lora`` is the price of the population alone;
* ``member``: member by member: the same rows, one member's ``batch`` rows per forward
  pass (``rows_per_chunk = batch``), as an ES implementation without per-row members does;
* ``hf_generate`` (reference, ``--hf-generate``): ``model.generate()`` on the bare model,
  same chunks, greedy, ``min_new_tokens = max_new_tokens``.

Every row generates exactly ``--completion`` tokens: the tokenizer is wrapped so that it
reports no EOS token (the decode loop then never stops a row early), and the output
shapes are checked. Throughput = generated tokens (rows x completion) / wall time of the
whole call (prefill included). One warm-up run of every variant, then ``--repeats``
rounds, the variants interleaved within a round so that load from other processes
spreads evenly; medians, and ratios of medians (mixed / plain, mixed / member).
``--profile-ops`` adds a torch.profiler table of one mixed call and the time spent
building the members' perturbed LoRA weights (the CPU path's noise).

    python bench/bench_population.py [--device cpu|cuda] [--shape tiny|small|qwen7b|llama8b]
        [--model DIR|default] [--population 8] [--batch 4] [--prompt 32] [--completion 10]
        [--rank 8] [--rows-per-chunk 0] [--repeats 3] [--threads N] [--json-out FILE]

Prints a markdown table with the machine, versions and the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_memory, when run as a script
from _common import cpu_model

VARIANTS = ("plain", "mixed", "member", "hf_generate")
TARGET_MIXED_OVER_PLAIN = 0.90  # issue 4: mixed >= 90% of plain tokens/s at equal rows


class NoEosTokenizer:
    """A tokenizer proxy that reports no EOS token, so that every row runs full length.

    ``generate_population`` reads ``eos_token_id`` to stop rows; with ``None`` the decode
    loop never marks a row finished. Everything else (calls, attribute reads and writes
    such as ``padding_side``) goes to the wrapped tokenizer.
    """

    eos_token_id = None

    def __init__(self, tokenizer: object) -> None:
        object.__setattr__(self, "_tokenizer", tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tokenizer, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)


def population_rows(population: int, batch: int) -> list[tuple[int, int]]:
    """Rows (member, prompt) of one ES iteration: members in order, a member's rows contiguous."""
    return [(member, prompt) for member in range(population) for prompt in range(batch)]


def chunks(count: int, size: int) -> list[range]:
    """Consecutive row ranges of at most ``size`` rows (``size`` <= 0: one range of all)."""
    size = size if size > 0 else count
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def encode(tokenizer: object, prompts: Sequence[str], max_prompt_length: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, exactly as ``generate_population`` encodes them."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_length, add_special_tokens=False)
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


class BaseSwitch:
    """Swap a model's ES-LoRA layers for their frozen base layers and back.

    ``bare()`` is the model with no ES-LoRA attached (the plain-inference ceiling); with
    ``wrap`` (CUDA) the base layers are wrapped so that they run through lowmem-es' NF4
    matmul as the ES-LoRA layers do, making the LoRA term the only difference.
    """

    def __init__(self, es_model: Any) -> None:
        self.model: nn.Module = es_model.model
        self.slots = []
        for layer in es_model.layers.values():
            parent_name, _, attr = layer.qualified_name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            if getattr(parent, attr) is not layer:
                raise RuntimeError(f"ES-LoRA layer {layer.qualified_name} is not where its "
                                   "name says; cannot swap it")
            self.slots.append((parent, attr, layer))

    @contextlib.contextmanager
    def bare(self, wrap: Callable[[nn.Module], nn.Module] | None = None) -> Iterator[nn.Module]:
        """The model with every ES-LoRA layer replaced by its base layer (restored after)."""
        try:
            for parent, attr, layer in self.slots:
                setattr(parent, attr, wrap(layer.base_layer) if wrap else layer.base_layer)
            yield self.model
        finally:
            for parent, attr, layer in self.slots:
                setattr(parent, attr, layer)


class NF4KernelBase(nn.Module):
    """A frozen NF4 base layer run through lowmem-es' NF4 matmul on CUDA, as ESLoraLinear does."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from lowmem_es.kernels.nf4_matmul import nf4_linear

            return nf4_linear(x, self.base_layer)
        return self.base_layer(x)


def median_summary(seconds: Sequence[float], tokens: int) -> dict[str, Any]:
    """Median wall time and generated tokens per second of repeated runs."""
    if not seconds:
        raise ValueError("no timed runs: --repeats must be >= 1")
    median = statistics.median(seconds)
    return {"seconds": list(seconds), "median_s": median, "min_s": min(seconds),
            "tokens": tokens, "tokens_per_s": tokens / median}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """tokens/s ratios of mixed over the others (medians of the same run)."""
    out = {}
    mixed = results.get("mixed", {}).get("tokens_per_s")
    for other in ("plain", "lora", "plain_nf4_kernel", "member", "hf_generate"):
        value = results.get(other, {}).get("tokens_per_s")
        if mixed and value:
            out[f"mixed/{other}"] = mixed / value
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU name and library versions."""
    import importlib.metadata as metadata

    cpu = cpu_model()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "bitsandbytes", "triton", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "versions": versions}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, description): a real model directory or a random-weight shape."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.model:
        from lowmem_es.model import load_model

        path = args.model
        if path == "default":
            from lowmem_es.default_model import ensure_default_model

            path = str(ensure_default_model())
        model, tokenizer, _ = load_model(path, device=str(device))
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {path} has no pad token and no EOS to use "
                             "as one; save one with the model")
        return model, tokenizer, f"{type(model).__name__} from {path}"
    from bench_memory import build_model

    from lowmem_es.example import char_tokenizer

    model, _ = build_model(args.shape, device, dtype)
    return model, char_tokenizer(), f"random-weight NF4 `{args.shape}` shape"


def make_prompts(tokenizer: object, count: int, length: int, seed: int = 1) -> list[str]:
    """``count`` prompts of about ``length`` tokens (random words of the tokenizer's vocab).

    Random token ids decoded to text, re-encoded and cut to ``length`` tokens, so the
    prompts are the same for every variant; lengths differ by up to 3 tokens (i % 4) so
    that left padding happens, as in a real batch.
    """
    generator = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    prompts = []
    for i in range(count):
        want = max(1, length - i % 4)
        ids: list[int] = []
        while len(ids) < want:
            draw = torch.randint(0, vocab, (want,), generator=generator).tolist()
            ids += [t for t in draw if t not in special]
        text = tokenizer.decode(ids[:want], skip_special_tokens=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:want]
        prompts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return prompts


class Bench:
    """The variants as callables over one model, prompts and row layout."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        from lowmem_es import es
        from lowmem_es.es import Member
        from lowmem_es.lora import attach_es_lora

        self.args, self.device = args, device
        model, tokenizer, self.description = load(args, device)
        self.tokenizer = NoEosTokenizer(tokenizer)
        self.es_model = attach_es_lora(model, args.targets, args.rank, 2.0 * args.rank, seed=0)
        # LoRA B starts at zero; give it the size a trained adapter has, so the LoRA term
        # is not a multiplication by zero (it costs the same either way, but outputs differ).
        generator = torch.Generator().manual_seed(5)
        for name, tensor in self.es_model.parameters().items():
            if name.endswith("lora_B"):
                tensor.copy_(0.01 * torch.randn(tensor.shape, generator=generator))
        self.switch = BaseSwitch(self.es_model)
        self.members = [Member(pair, sign)
                        for pair, sign in es.member_schedule(args.population, True)]
        self.rows = population_rows(args.population, args.batch)
        self.prompts = make_prompts(tokenizer, args.batch, args.prompt)
        self.input_ids, self.attention = encode(self.tokenizer, self.prompts, args.prompt,
                                                device)
        self.chunk = args.rows_per_chunk or len(self.rows)
        self.tokens = len(self.rows) * args.completion
        self.last: dict[str, list[list[int]]] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mixed(self, rows_per_chunk: int | None = None) -> list[list[int]]:
        """lowmem-es population evaluation (``generate_population``)."""
        from lowmem_es.generate import generate_population

        args = self.args
        completions = generate_population(
            self.es_model, self.tokenizer, self.prompts, self.rows, members=self.members,
            run_seed=0, iteration=0, sigma=args.sigma, max_prompt_length=args.prompt,
            max_completion_length=args.completion,
            rows_per_chunk=self.chunk if rows_per_chunk is None else rows_per_chunk,
            device=self.device)
        self._sync()
        return [c.ids for c in completions]

    def member(self) -> list[list[int]]:
        """One member's rows per forward pass."""
        return self.mixed(rows_per_chunk=self.args.batch)

    def plain(self, wrap: Callable[[nn.Module], nn.Module] | None = None, bare: bool = True
              ) -> list[list[int]]:
        """The bare 4-bit model (``bare=False``: with its adapter), same rows, chunks and
        decode loop."""
        from lowmem_es.decode import decode

        out = []
        pad = self.tokenizer.pad_token_id
        context = self.switch.bare(wrap) if bare else contextlib.nullcontext(self.switch.model)
        with context as model:
            for part in chunks(len(self.rows), self.chunk):
                index = torch.tensor([self.rows[i][1] for i in part], device=self.device)
                new = decode(model, self.input_ids[index], self.attention[index],
                             self.args.completion, [], pad)
                if new.shape != (len(part), self.args.completion):
                    raise RuntimeError(f"decode returned {tuple(new.shape)} tokens, expected "
                                       f"{(len(part), self.args.completion)}")
                for row in new.tolist():  # the host work generate_population also does
                    self.tokenizer.decode(row, skip_special_tokens=True)
                    out.append(row)
        self._sync()
        return out

    def lora(self) -> list[list[int]]:
        """The adapted model with no population: one adapter, same rows and chunks."""
        return self.plain(wrap=None, bare=False)

    def plain_nf4_kernel(self) -> list[list[int]]:
        """Plain, with the adapted linears' base through lowmem-es' NF4 matmul (CUDA)."""
        return self.plain(wrap=NF4KernelBase)

    def hf_generate(self) -> list[list[int]]:
        """``model.generate()`` on the bare model, fixed length, same chunks."""
        out = []
        prompt_len = self.input_ids.shape[1]
        with self.switch.bare() as model:
            for part in chunks(len(self.rows), self.chunk):
                index = torch.tensor([self.rows[i][1] for i in part], device=self.device)
                ids = model.generate(input_ids=self.input_ids[index],
                                     attention_mask=self.attention[index],
                                     max_new_tokens=self.args.completion,
                                     min_new_tokens=self.args.completion, do_sample=False,
                                     temperature=None, top_p=None, top_k=None,
                                     pad_token_id=self.tokenizer.pad_token_id)
                new = ids[:, prompt_len:]
                if new.shape != (len(part), self.args.completion):
                    raise RuntimeError(f"generate() returned {tuple(new.shape)} new tokens")
                out += new.tolist()
        self._sync()
        return out

    def variants(self) -> dict[str, Callable[[], list[list[int]]]]:
        names = ["plain", "mixed", "member"]
        if self.device.type == "cuda":
            names.insert(1, "plain_nf4_kernel")
        if self.args.lora:
            names.insert(1, "lora")
        if self.args.hf_generate:
            names.append("hf_generate")
        return {name: getattr(self, name) for name in names}

    def run(self) -> dict[str, dict[str, Any]]:
        """Warm-up, then interleaved timed rounds; per-variant median summary."""
        variants = self.variants()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, call in variants.items():  # warm-up (lazy init, repacking, compile)
            out = call()
            self._check(name, out)
            self.last[name] = out
        for _ in range(self.args.repeats):
            for name, call in variants.items():
                started = time.perf_counter()
                out = call()
                times[name].append(time.perf_counter() - started)
                self._check(name, out)
        return {name: median_summary(seconds, self.tokens) for name, seconds in times.items()}

    def _check(self, name: str, out: list[list[int]]) -> None:
        """Every row must have generated exactly ``completion`` tokens.

        ``generate_population`` drops trailing pad tokens from a completion, so its rows may
        look shorter when the model emitted the pad id last; the decode loop still ran every
        step (no EOS), so the work done is the same.
        """
        want = self.args.completion
        if len(out) != len(self.rows):
            raise RuntimeError(f"{name}: {len(out)} completions for {len(self.rows)} rows")
        lengths = sorted({len(ids) for ids in out})
        trimmed_ok = name in ("mixed", "member") and self.tokenizer.pad_token_id is not None
        if lengths[-1] > want or (lengths[0] < want and not trimmed_ok):
            raise RuntimeError(f"{name}: completion lengths {lengths}, expected {want}")

    def noise_build_seconds(self) -> float:
        """Time to build every layer's perturbed A and B for one call's chunks (CPU path)."""
        from lowmem_es.lora import Population

        started = time.perf_counter()
        version = 10**9
        for part in chunks(len(self.rows), self.chunk):
            members = list(dict.fromkeys(self.rows[i][0] for i in part))
            version += 1
            population = Population(0, 0, self.args.sigma, [self.members[m] for m in members],
                                    [(i, self.args.batch) for i in range(len(members))],
                                    version=version)
            for layer in self.es_model.layers.values():
                layer.perturbed_weights(population)
        for layer in self.es_model.layers.values():
            layer.clear_cache()
        self._sync()
        return time.perf_counter() - started

    def profile_ops(self, top: int = 12) -> str:
        """torch.profiler table (self CPU / CUDA time) of one mixed call."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            self.mixed()
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=top)


def report(args: argparse.Namespace, bench: Bench, results: dict[str, dict[str, Any]],
           machine: dict[str, Any], extra: dict[str, Any]) -> str:
    """The markdown report: machine, versions, command, table, ratios vs targets."""
    rows = len(bench.rows)
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads "
        f"{machine['torch_threads']}" + (f", GPU {machine['gpu']} (CUDA {machine['cuda']})"
                                         if "gpu" in machine else "")
        + (f", load average at start {machine['load_average'][0]:.2f}"
           if machine.get("load_average") else ""),
        "versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        "command: " + shlex.join([Path(sys.executable).name, "bench/bench_population.py",
                                  *sys.argv[1:]]),
        f"model: {bench.description}; LoRA r={args.rank} on {args.targets}, sigma {args.sigma}"
        f", noise backend {args.noise_backend}",
        f"rows: population {args.population} x {args.batch} prompts = {rows} rows, "
        f"{bench.chunk} per chunk for mixed/plain, {args.batch} for member-by-member; prompt "
        f"{bench.input_ids.shape[1]} tokens (left-padded), {args.completion} new tokens per "
        f"row (no EOS); {args.repeats} timed rounds after a warm-up, medians",
        "",
        "| variant | rows per forward | median s | min s | generated tokens | tokens/s "
        "| mixed / this |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratio = ratios(results)
    per_forward = {"member": args.batch}
    for name, r in results.items():
        rel = "" if name == "mixed" else f"{ratio.get(f'mixed/{name}', float('nan')):.3f}"
        lines.append(f"| {name} | {per_forward.get(name, bench.chunk)} | {r['median_s']:.3f} | "
                     f"{r['min_s']:.3f} | {r['tokens']} | {r['tokens_per_s']:.1f} | {rel} |")
    lines.append("")
    mp = ratio.get("mixed/plain")
    mm = ratio.get("mixed/member")
    if mp is not None:
        verdict = "meets" if mp >= TARGET_MIXED_OVER_PLAIN else "misses"
        lines.append(f"mixed / plain = {mp:.3f} ({verdict} the >= {TARGET_MIXED_OVER_PLAIN:.2f} "
                     "target)")
    if "mixed/plain_nf4_kernel" in ratio:
        lines.append(f"mixed / plain (NF4 kernel base) = {ratio['mixed/plain_nf4_kernel']:.3f}")
    if "mixed/lora" in ratio:
        lines.append(f"mixed / lora (one adapter, no population) = {ratio['mixed/lora']:.3f}")
    if mm is not None:
        lines.append(f"mixed / member-by-member = {mm:.3f} "
                     f"({'faster' if mm > 1 else 'not faster'})")
    if "noise_build_s" in extra:
        lines.append(f"perturbed-LoRA build (noise) per mixed call: {extra['noise_build_s']:.3f}"
                     f" s = {extra['noise_build_s'] / results['mixed']['median_s']:.1%} of the "
                     "mixed median")
    lines.append(f"mixed completions == member-by-member completions: "
                 f"{extra.get('mixed_equals_member')}")
    if "profile" in extra:
        lines += ["", "torch.profiler, one mixed call:", "```", extra["profile"], "```"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from bench_memory import SHAPES

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the model runs")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="random-weight NF4 model built from this config (bench_memory)")
    parser.add_argument("--model", default=None,
                        help="a real model directory instead of --shape ('default' = the "
                             "embedded SmolLM2-135M, converted once)")
    parser.add_argument("--population", type=int, default=8,
                        help="members (even: antithetic pairs)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per member")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=10,
                        help="new tokens per row (forced: no early EOS)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                        help="LoRA target modules")
    parser.add_argument("--sigma", type=float, default=0.01, help="perturbation scale (> 0)")
    parser.add_argument("--rows-per-chunk", type=int, default=0,
                        help="rows per forward pass for mixed and plain (0 = all rows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--noise-backend", default="eager", choices=("eager", "compiled"),
                        help="CPU noise generator of the ES-LoRA layers (ESConfig.noise_backend;"
                             " 'compiled' = torch.compile, compiled during the warm-up)")
    parser.add_argument("--hf-generate", action="store_true",
                        help="also time model.generate() on the bare model (reference)")
    parser.add_argument("--lora", action="store_true",
                        help="also time the adapted model with no population (one adapter)")
    parser.add_argument("--profile-ops", action="store_true",
                        help="add a torch.profiler table of one mixed call")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON here")
    return parser


def validate(args: argparse.Namespace) -> None:
    """Raise ValueError naming the option for values the benchmark cannot run with."""
    if args.population < 2 or args.population % 2:
        raise ValueError(f"--population must be even and >= 2 (antithetic pairs), got "
                         f"{args.population}")
    for name in ("batch", "prompt", "completion", "rank", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.sigma <= 0:
        raise ValueError(f"--sigma must be > 0 (perturbed members), got {args.sigma}")
    if args.rows_per_chunk < 0:
        raise ValueError(f"--rows-per-chunk must be >= 0, got {args.rows_per_chunk}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the markdown report; return (and optionally write) the JSON."""
    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except ValueError as error:
        raise SystemExit(f"bench_population: {error}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from lowmem_es import noise

    noise.set_backend(args.noise_backend)
    machine = machine_info(device)
    started = time.perf_counter()
    bench = Bench(args, device)
    load_s = time.perf_counter() - started
    results = bench.run()
    extra: dict[str, Any] = {"load_s": load_s,
                             "mixed_equals_member": bench.last["mixed"] == bench.last["member"]}
    if device.type == "cpu":
        extra["noise_build_s"] = bench.noise_build_seconds()
    if args.profile_ops:
        extra["profile"] = bench.profile_ops()
    text = report(args, bench, results, machine, extra)
    print(text)
    payload = {"args": vars(args), "machine": machine, "results": results,
               "ratios": ratios(results), "extra": extra, "report": text}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=2, default=str))
    return payload


if __name__ == "__main__":
    main()
