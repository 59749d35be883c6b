"""Speed and memory of the population LoRA term: plain vs materialised noise vs fused.

One call computes ``out += scale * (x A_m^T) B_m^T`` for ``rows`` rows split evenly over
``members`` population members (contiguous segments, as the evaluator lays them out),
with A_m = A + s sigma eps (r x d_in) and B_m likewise (d_out x r). Providers:

* ``plain``: LoRA with no noise, as ``ESLoraLinear`` computes it at sigma = 0 (fp32
  matmuls, cast back). The floor: what the population term costs without perturbations.
* ``materialised``: ``torch.randn`` into one (r, d_in) and one (d_out, r) buffer per
  antithetic pair (members 2k and 2k+1 share it, as in the noise contract), perturbed
  weights (members, r, d_in) / (members, d_out, r), two ``bmm``. ``torch.randn`` is the
  cheapest generator torch has (it does not follow our seeded contract): the best a
  stored-noise design can do.
* ``fused``: on CUDA the Triton kernels (``lowmem_es.kernels.noisy_lora``, RowPlan
  prebuilt as the layer does); on CPU the torch twin, which regenerates the members'
  perturbed A and B from Philox per call (``noise_batch.perturbed_rows``: the contract's
  generator with the perturbation fused in, each pair's noise drawn once for both
  members; eager backend, ~6x torch.randn per value).
* ``fused_compiled`` (CPU only): the twin with ``noise_backend="compiled"`` (torch.compile'd
  Philox over fixed blocks of tiles, ~1.1x torch.randn per value on one core; one-off
  compiles of a few seconds, not timed).
* ``fused_unpaired`` (CUDA only): the kernels without the antithetic pairing (each
  member's program draws its own noise): what sharing a pair's noise saves.
* ``cached``: the ES-LoRA layer's torch path per decode step once a chunk's
  perturbed weights are built: the two bmm alone.

Times: median wall time per call (CPU), or on CUDA ``triton.testing.do_bench`` of the eager
call (host launch overhead included) and of a CUDA-graph replay (device time only).
Memory: peak above what was allocated before the call (CUDA allocator), or the growth of
peak RSS (Linux VmHWM, reset per call through /proc/self/clear_refs) on CPU.
CPU timings run with glibc's malloc settled (``_settle_allocator``) so that no provider
pays page faults for temporaries that a long-running process would not.

    python bench/bench_noisy_lora.py                  # CPU: a few minutes; GPU: full grid
    python bench/bench_noisy_lora.py --shapes 4096x4096 --ranks 16 --rows 512 --members 32
    python bench/bench_noisy_lora.py --sweep          # GPU: launch-constant sweep, one shape

Prints markdown tables with the machine and the exact command.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median_seconds

from lowmem_es import noise, noise_batch
from lowmem_es.kernels import noisy_lora as knl
from lowmem_es.kernels._runtime import HAS_TRITON, INTERPRETED
from lowmem_es.kernels.row_plan import plan_rows

GPU_DEFAULTS = dict(shapes="3584x3584,4096x4096,4096x14336,14336x4096", ranks="8,16,64",
                    rows="16,128,512", members="8,32,64", dtype="bfloat16")
CPU_DEFAULTS = dict(shapes="4096x4096,4096x14336", ranks="8,64", rows="64", members="8",
                    dtype="float32")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCALE = 2.0
SIGMA = 1e-3


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


class Case:
    """Inputs of one configuration, built once and shared by every provider."""

    def __init__(self, d_in: int, d_out: int, rank: int, rows: int, members: int,
                 dtype: torch.dtype, device: str) -> None:
        generator = torch.Generator().manual_seed(0)
        self.rows, self.members, self.rank = rows, members, rank
        self.x = torch.randn(rows, d_in, generator=generator).to(device, dtype)
        self.out = torch.randn(rows, d_out, generator=generator).to(device, dtype)
        self.a = (torch.randn(rank, d_in, generator=generator) / d_in**0.5).to(device)
        self.b = (0.01 * torch.randn(d_out, rank, generator=generator)).to(device)
        schedule = [(m // 2, 1 if m % 2 == 0 else -1) for m in range(members)]
        ids = (noise.tensor_id("bench.layer", "A"), noise.tensor_id("bench.layer", "B"))
        self.keys_a, self.keys_b = (
            torch.tensor([noise.member_key(0, 0, pair, tid) for pair, _ in schedule],
                         device=device) for tid in ids)
        self.steps = torch.tensor([sign * SIGMA for _, sign in schedule], dtype=torch.float32,
                                  device=device)
        member_index = [m for m in range(members) for _ in range(rows // members)]
        self.plan = plan_rows(member_index, members, 1, device,
                              pairs=[pair for pair, _ in schedule])
        self.plan_unpaired = plan_rows(member_index, members, 1, device)
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def plain(self) -> None:
        lora = (self.x.float() @ self.a.t()) @ self.b.t()
        self.out.add_((lora * SCALE).to(self.out.dtype))

    def materialised(self) -> None:
        m = self.members
        a_t, b_t = (self._perturbed_randn(w).transpose(1, 2) for w in (self.a, self.b))
        grouped = self.x.float().view(m, -1, self.x.shape[1])
        lora = torch.bmm(torch.bmm(grouped, a_t), b_t).view(self.rows, -1)
        self.out.add_((lora * SCALE).to(self.out.dtype))

    def _perturbed_randn(self, weight: torch.Tensor) -> torch.Tensor:
        """(members, *weight.shape): weight + s sigma eps with ``torch.randn`` noise, one
        draw per antithetic pair (members 2k and 2k+1 share it, as in the contract)."""
        m = self.members
        if m % 2:  # an odd population: the last member has no partner; draw per member
            return weight + self.steps[:, None, None] * torch.randn(m, *weight.shape,
                                                                    device=weight.device)
        eps = torch.randn(m // 2, 1, *weight.shape, device=weight.device)
        return (weight + self.steps.view(m // 2, 2, 1, 1) * eps).view(m, *weight.shape)

    def fused(self) -> None:
        fn = knl.noisy_lora_triton if self.x.is_cuda else knl.noisy_lora_torch
        fn(self.x, self.a, self.b, self.keys_a, self.keys_b, self.steps, self.plan, SCALE,
           out=self.out)

    def fused_unpaired(self) -> None:
        """CUDA: the kernels with a RowPlan that does not know the antithetic pairs, so
        every member's program draws its own noise (what pairing saves)."""
        knl.noisy_lora_triton(self.x, self.a, self.b, self.keys_a, self.keys_b, self.steps,
                              self.plan_unpaired, SCALE, out=self.out)

    def fused_compiled(self) -> None:
        """CPU: the twin with the torch.compile'd Philox generator (noise.set_backend)."""
        previous = noise.get_backend()
        noise.set_backend("compiled")
        try:
            self.fused()
        finally:
            noise.set_backend(previous)

    def cached_step(self) -> None:
        if self.cached is None:  # built once per chunk in lora.py; not timed
            steps = self.steps[:, None, None]
            self.cached = tuple(
                (w + steps * noise_batch.noise_batch(keys.tolist(), w.shape, w.device))
                .transpose(1, 2)
                .contiguous() for w, keys in ((self.a, self.keys_a), (self.b, self.keys_b)))
        a_t, b_t = self.cached
        grouped = self.x.float().view(self.members, -1, self.x.shape[1])
        lora = torch.bmm(torch.bmm(grouped, a_t), b_t).view(self.rows, -1)
        self.out.add_((lora * SCALE).to(self.out.dtype))


# ----------------------------------------------------------------------------- measuring

_libc = None


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _settle_allocator() -> None:
    """glibc malloc as a warm, long-running process has it (Linux + glibc; else no-op).

    Blocks below 32 MiB come from the heap (glibc's dynamic mmap ceiling) and freed heap
    memory up to 64 MiB stays mapped (the trim threshold glibc's dynamic rule pairs with
    that ceiling). Setting the mmap threshold alone freezes the trim threshold at its
    128 KiB default, and then every temporary above that is handed back to the OS when
    freed and page-faulted in again on the next call: that charged each provider for
    its allocation pattern rather than its work (materialised's temporaries, the eager
    twin's up to 3x).
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except OSError:
        pass


def _cpu_peak_bytes(fn: Callable[[], None]) -> float:
    """Growth of peak RSS over one call (Linux + glibc only; NaN elsewhere).

    Free heap pages are first returned (malloc_trim) and during the call glibc serves
    every block >= 64 KiB by mmap, so the peak counts every page touched; afterwards the
    allocator is settled again (``_settle_allocator``), because page-faulting every
    temporary would make the timed calls several times slower.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        _libc.malloc_trim(0)  # free heap pages leave RSS: reusing them counts again

        def status(field: str) -> int:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
            raise OSError(field)

        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS:")
        fn()
        return float(status("VmHWM:") - base)
    except OSError:
        return float("nan")
    finally:
        if _libc is not None:
            _settle_allocator()


def _cuda_peak_bytes(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


def _cuda_graph_time(fn: Callable[[], None], replays: int = 50) -> float:
    """Device time of one call: replay of a CUDA graph holding ``replays`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * replays)


def measure(case: Case, provider: str, repeats: int) -> dict[str, float]:
    fn = getattr(case, "cached_step" if provider == "cached" else provider)
    if case.x.is_cuda:
        import triton.testing

        result = {"eager": triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3,
                  "peak": _cuda_peak_bytes(fn)}
        try:
            result["graph"] = _cuda_graph_time(fn)
        except Exception as error:  # capture can fail (e.g. an op that syncs)
            print(f"<!-- {provider}: CUDA graph capture failed: {error!r} -->")
            result["graph"] = float("nan")
        return result
    return {"eager": median_seconds(fn, repeats), "peak": _cpu_peak_bytes(fn)}


# ----------------------------------------------------------------------------- tables


def run_grid(args: argparse.Namespace, device: str) -> None:
    dtype = DTYPES[args.dtype]
    providers = ["plain", "materialised", "fused"]
    if device == "cpu":
        start = time.perf_counter()
        compiled = noise.set_backend("compiled") == "compiled"
        noise.set_backend("eager")
        if compiled:
            providers.append("fused_compiled")
            print(f"<!-- torch.compile of the noise twin: {time.perf_counter() - start:.1f} s "
                  "-->\n")
    else:
        providers.append("fused_unpaired")
    providers.append("cached")  # on CUDA too: issue 3's question, fused vs cached per step
    cuda = device == "cuda"
    time_cols = "eager ms | graph ms" if cuda else "ms"
    print(f"| d_in x d_out | r | rows | members | provider | {time_cols} | x plain | "
          "peak extra MiB | noise elems (M) |")
    print("|---|---:|---:|---:|---|" + ("---:|" * (2 if cuda else 1)) + "---:|---:|---:|")
    for d_in, d_out in _shapes(args.shapes):
        for rank in _ints(args.ranks):
            for rows in _ints(args.rows):
                for members in _ints(args.members):
                    if members > rows or rows % members:
                        continue
                    case = Case(d_in, d_out, rank, rows, members, dtype, device)
                    results = {p: measure(case, p, args.repeats) for p in providers}
                    key = "graph" if cuda else "eager"
                    base = results["plain"][key]
                    elems = members * rank * (d_in + d_out) / 1e6
                    for provider in providers:
                        res = results[provider]
                        times = (f"{res['eager'] * 1e3:.3f} | {res['graph'] * 1e3:.3f}" if cuda
                                 else f"{res['eager'] * 1e3:.1f}")
                        print(f"| {d_in}x{d_out} | {rank} | {rows} | {members} | {provider} | "
                              f"{times} | {res[key] / base:.2f} | {res['peak'] / 2**20:.1f} | "
                              f"{elems:.2f} |", flush=True)
                    del case


def run_sweep(args: argparse.Namespace) -> None:
    """Fused kernel under several launch constants, one configuration (CUDA only)."""
    d_in, d_out = _shapes(args.shapes)[0]
    rank, rows, members = _ints(args.ranks)[0], _ints(args.rows)[-1], _ints(args.members)[0]
    case = Case(d_in, d_out, rank, rows, members, DTYPES[args.dtype], "cuda")
    print(f"### Launch sweep: {d_in}x{d_out}, r={rank}, rows={rows}, members={members}\n")
    print("| overrides | graph ms |")
    print("|---|---:|")
    variants = [{}]
    for tile in (32, 64, 128):
        for warps in (4, 8):
            variants.append({"block_k": tile, "block_n": tile, "num_warps": warps})
    for splits in (1, 4, 8, 16):
        variants.append({"splits": splits, "groups": splits})
    for variant in variants:
        knl.LAUNCH_OVERRIDES.clear()
        knl.LAUNCH_OVERRIDES.update(variant)
        try:
            seconds = _cuda_graph_time(case.fused)
            print(f"| {variant or 'default'} | {seconds * 1e3:.3f} |", flush=True)
        except Exception as error:
            print(f"| {variant} | failed: {type(error).__name__} |", flush=True)
    knl.LAUNCH_OVERRIDES.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available() and HAS_TRITON and not INTERPRETED
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    parser.add_argument("--shapes", default=defaults["shapes"], help="d_inxd_out list")
    parser.add_argument("--ranks", default=defaults["ranks"])
    parser.add_argument("--rows", default=defaults["rows"], help="rows (tokens) per call")
    parser.add_argument("--members", default=defaults["members"])
    parser.add_argument("--dtype", default=defaults["dtype"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed calls (median)")
    parser.add_argument("--sweep", action="store_true", help="GPU: sweep launch constants")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cpu":
        torch.manual_seed(0)
        _settle_allocator()
    print(f"### Noisy LoRA term, {args.dtype} activations, fp32 LoRA masters, "
          f"sigma={SIGMA}, on {args.device}\n")
    print(f"Command: `{command_line()}`\n")
    print("\n".join(machine_info()) + "\n")
    if args.sweep:
        if args.device != "cuda":
            raise SystemExit("--sweep needs CUDA and compiled Triton")
        run_sweep(args)
        return
    run_grid(args, args.device)
    if args.device == "cpu":
        print("\nCPU: `fused` is the torch twin (members' perturbed A, B regenerated from "
              "Philox per call, eager backend), `fused_compiled` the same with the compiled "
              "generator; `cached` is lora.py's CPU path per decode step after its one-off "
              "per-chunk build. Peak = growth of peak RSS during one call; malloc settled "
              "(mmap threshold 32 MiB, trim threshold 64 MiB).")
    else:
        print("\n`x plain` uses graph (device) times; eager times include host launch "
              "overhead. Peak = CUDA allocator peak above what was allocated before the call.")


if __name__ == "__main__":
    main()
