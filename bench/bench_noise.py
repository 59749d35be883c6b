"""Speed of regenerating ES noise, against ``torch.randn`` of the same size.

Providers: the eager pure-torch twin, the torch.compile'd twin (compile time reported on
its own), and on CUDA the Triton kernel (and the eager twin on CUDA). ``torch.randn`` is
the yardstick: it draws from the global generator, so it cannot give our contract's
seeded, per-element values, but it is what an implementation that stores nothing would
cost with PyTorch's own generator.

    python bench/bench_noise.py [--numel 10000000] [--repeats 5] [--chunk 65536]

Prints a markdown table with the machine and the exact command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median_seconds

from lowmem_es import noise, noise_batch
from lowmem_es.kernels import noise as knoise
from lowmem_es.kernels._runtime import HAS_TRITON, INTERPRETED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=10_000_000, help="elements per draw")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--chunk", type=int, default=noise.DEFAULT_CHUNK,
                        help="elements per pass of the eager twin (to sweep DEFAULT_CHUNK)")
    args = parser.parse_args()
    numel, repeats, chunk = args.numel, args.repeats, args.chunk
    key = noise.member_key(1234, 10, 3, noise.tensor_id("model.layers.0.self_attn.q_proj", "A"))
    shape = (numel,)

    rows: list[tuple[str, str, float, float]] = []  # provider, device, seconds, baseline
    notes: list[str] = []

    cpu_randn = median_seconds(lambda: torch.randn(numel), repeats, "cpu")
    rows.append(("torch.randn", "cpu", cpu_randn, cpu_randn))
    eager = median_seconds(lambda: noise_batch.noise(key, shape, chunk=chunk, backend="eager"),
                           repeats, "cpu")
    rows.append((f"twin, eager (chunk {chunk})", "cpu", eager, cpu_randn))

    start = time.perf_counter()
    backend = noise.set_backend("compiled")
    compile_seconds = time.perf_counter() - start
    if backend == "compiled":
        compiled = median_seconds(lambda: noise_batch.noise(key, shape, backend="compiled"),
                                  repeats, "cpu")
        rows.append(("twin, torch.compile", "cpu", compiled, cpu_randn))
        notes.append(f"- torch.compile of the twin, first call (compile + probe): "
                     f"{compile_seconds:.1f} s (inductor caches it on disk; a cold cache is "
                     "slower)")
    else:
        notes.append("- torch.compile unusable here: compiled twin not measured")
    noise.set_backend("eager")

    if torch.cuda.is_available():
        cuda_randn = median_seconds(lambda: torch.randn(numel, device="cuda"), repeats, "cuda")
        rows.append(("torch.randn", "cuda", cuda_randn, cuda_randn))
        if HAS_TRITON and not INTERPRETED:
            torch.cuda.reset_peak_memory_stats()
            kernel = median_seconds(lambda: knoise.noise_triton(key, shape, device="cuda"),
                                    repeats, "cuda")
            rows.append(("Triton kernel (flat range)", "cuda", kernel, cuda_randn))
            peak = torch.cuda.max_memory_allocated() / 2**20
            notes.append(f"- Triton kernel peak CUDA memory: {peak:.1f} MiB "
                         f"(output alone {numel * 4 / 2**20:.1f} MiB)")
            offsets = torch.arange(numel, device="cuda")
            given = median_seconds(lambda: knoise.randn_triton(key, offsets), repeats, "cuda")
            rows.append(("Triton kernel (given int64 offsets)", "cuda", given, cuda_randn))
        else:
            notes.append("- Triton kernel not measured: triton absent or interpreted")
        twin_cuda = median_seconds(lambda: noise_batch.noise(key, shape, device="cuda",
                                                             backend="eager"), repeats, "cuda")
        rows.append(("twin, eager", "cuda", twin_cuda, cuda_randn))
    else:
        notes.append("- no CUDA device: Triton kernel not measured")

    print(f"### Noise generation, {numel:,} float32 elements, median of {repeats}\n")
    print(f"Command: `{command_line()}`\n")
    print("\n".join(machine_info()) + "\n")
    print("| provider | device | median ms | ns / element | x torch.randn (same device) |")
    print("|---|---|---:|---:|---:|")
    for provider, device, seconds, baseline in rows:
        print(f"| {provider} | {device} | {seconds * 1e3:.1f} | {seconds / numel * 1e9:.2f} "
              f"| {seconds / baseline:.2f} |")
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
