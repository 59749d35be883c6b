"""Cost per decode step of the per-row keyed sampling noise, by source.

Sampling keys every row's noise by (row key, step), so completions do not depend on the
chunking. Sources, each giving ``logits / T + Gumbel`` for all rows of one step:

* ``generator``: one seeded ``torch.Generator`` per row (the CPU default; the CUDA default
  before lowmem_es.kernels.sampling): a Python iteration, a reseed and a launch per row;
* ``philox_twin``: the counter-based Philox twin (``gumbel_scores_torch``), vectorised;
* ``philox_kernel`` (CUDA): the Triton kernel, one launch for all rows (the CUDA default).

Times are per step (median), with the ratio to ``generator`` measured in the same run.

    python bench/bench_sampling.py [--rows 8 32 128] [--vocab 49152 151936] [--repeats 5]

Prints a markdown table with the machine and the exact command.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, median_seconds

from lowmem_es.generate import _sampler
from lowmem_es.kernels import sampling
from lowmem_es.noise import member_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    from lowmem_es import backends

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    print(f"# sampling noise per decode step ({name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n\n`{command_line()}`\n")
    providers = ["generator", "philox_twin"] + (["philox_kernel"] if device.type == "cuda"
                                                 else [])
    print("| rows | vocab | " + " | ".join(f"{p} ms" for p in providers)
          + " | " + " | ".join(f"{p} / generator" for p in providers[1:]) + " |")
    print("|---:|---:|" + "---:|" * (2 * len(providers) - 1))
    for vocab in args.vocab:
        for rows in args.rows:
            keys = [member_key(1, 2, row, 3) for row in range(rows)]
            logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16
                                 if device.type == "cuda" else torch.float32)
            ids = torch.zeros(rows, 5, dtype=torch.long, device=device)
            key_tensor = torch.tensor(keys, device=device)
            times = {}
            for provider in providers:
                if provider == "generator":
                    backends.set_sampler("generator")
                    processor = _sampler(keys, prompt_len=3, temperature=0.7)

                    def run(processor=processor, ids=ids, logits=logits):
                        return processor(ids, logits)
                else:
                    force = "kernel" if provider == "philox_kernel" else "torch"

                    def run(force=force, logits=logits, keys=key_tensor):
                        return sampling.gumbel_scores(logits, keys, 2, 0.7, force=force)
                times[provider] = median_seconds(run, args.repeats, device.type)
            backends.set_sampler(None)
            cells = [f"{times[p] * 1e3:.3f}" for p in providers]
            ratios = [f"{times[p] / times['generator']:.2f}" for p in providers[1:]]
            print(f"| {rows} | {vocab} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
