"""Scale-out: torchrun runs (gloo, CPU) equal the single-process run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_es import distributed, es
from lowmem_es.cli import main

RUN = ["--example", "tiny", "--iterations", "6", "--population-size", "6", "--batch-size", "2",
       "--max-completion-length", "5", "--save-steps", "2", "--optimizer", "adam",
       "--eval-steps", "3"]


def _torchrun(nproc: int, out: Path, *extra: str, timeout: float = 300) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "lowmem_es.cli", "train",
               "--output-dir", str(out), *RUN, *extra]
    result = subprocess.run(command, cwd=out.parent, capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single(out: Path, *extra: str) -> None:
    assert main(["train", "--output-dir", str(out), *RUN, *extra]) == 0


def _journal(out: Path) -> list[dict]:
    # tokens: every rank's completions, so the same total as one process generates.
    keep = ("iteration", "members", "prompt_indices", "fitness", "shaped_fitness", "tokens")
    lines = (out / "journal.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in keep} for line in lines]


def _evaluations(out: Path) -> list[dict]:
    """The periodic evaluations in metrics.jsonl (sharded over the ranks under torchrun)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in entry.items() if k.startswith("eval_")}
            for entry in lines if "eval_reward" in entry]


def _same_adapter(first: Path, second: Path) -> None:
    a = load_file(str(first / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(second / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _single(out)
    return out


def test_shard_members_splits_whole_pairs():
    schedule = es.member_schedule(6, antithetic=True)  # pairs 0, 1, 2
    assert [distributed.shard_members(schedule, 2, r) for r in range(2)] == [[0, 1],
                                                                            [2, 3, 4, 5]]
    shards = [distributed.shard_members(schedule, 3, r) for r in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5]]
    many = [distributed.shard_members(schedule, 5, r) for r in range(5)]
    assert sorted(m for shard in many for m in shard) == list(range(6))
    assert [] in many  # more ranks than pairs: some ranks idle
    plain = es.member_schedule(5, antithetic=False)
    assert sorted(m for r in range(2) for m in distributed.shard_members(plain, 2, r)) == list(
        range(5))


def test_single_process_helpers():
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_members({1: (0.5, 7.0), 0: (0.25, 3.0)}, 2, 2) == [
        [0.25, 0.5], [3.0, 7.0]]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.total(7) == 7


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_matches_single_process(single_run, tmp_path, nproc):
    out = tmp_path / "run"
    _torchrun(nproc, out)
    assert _journal(out) == _journal(single_run)
    evaluations = _evaluations(single_run)
    assert len(evaluations) == 2 and len(evaluations[0]) > 1  # total and per function
    assert _evaluations(out) == evaluations  # every row once, averaged in row order
    _same_adapter(out, single_run)
    assert not (out / "replay").exists()


def test_resume_with_another_world_size(single_run, tmp_path):
    """2 ranks for 3 iterations, then 1 process; and 1 process, then 2 ranks."""
    two_then_one = tmp_path / "a"
    _torchrun(2, two_then_one, "--iterations", "3")
    _single(two_then_one, "--resume")
    one_then_two = tmp_path / "b"
    _single(one_then_two, "--iterations", "3")
    _torchrun(2, one_then_two, "--resume")
    for out in (two_then_one, one_then_two):
        assert _journal(out) == _journal(single_run)
        _same_adapter(out, single_run)


def test_dead_rank_stops_the_job_with_a_clear_error(tmp_path):
    """SIGKILL one rank mid-run: rank 0 exits non-zero with a message, within the timeout."""
    out = tmp_path / "run"
    out.mkdir()
    port = _free_port()
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "lowmem_es.cli", "train", "--output-dir",
                   str(out / "out"), *RUN, "--iterations", "400", "--distributed-timeout", "30"]
        processes.append(subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    journal = out / "out" / "journal.jsonl"
    deadline = time.monotonic() + 240
    while not (journal.is_file() and journal.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and processes[0].poll() is None, (
            processes[0].stderr.read() if processes[0].poll() is not None else "no progress")
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    processes[1].wait()
    killed_at = time.monotonic()
    code = processes[0].wait(timeout=120)
    stderr = processes[0].stderr.read()
    assert code != 0
    assert time.monotonic() - killed_at < 60
    assert "collective failed" in stderr and "--resume" in stderr, stderr[-2000:]


def test_stop_votes_live_where_the_backend_reduces(monkeypatch):
    """NCCL reduces CUDA tensors only: any_rank's vote must go to the GPU under NCCL (a CPU
    tensor there fails at the first stop decision), and stay on CPU under gloo."""
    seen = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_reduce",
                        lambda tensor, op=None: seen.append(tensor.device.type))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    assert distributed.collective_device().type == "cpu"
    assert distributed.any_rank(True) is True and seen == ["cpu"]
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank of test_gather_rows_over_gloo: ranks 0-2 hold rows r and r + 3 of 5, with
    None, NaN and an infinity among the values; rank 3 holds no row."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank,
                                         world_size=world)
    try:
        values = [0.5, None, float("nan"), float("inf"), -7.25]
        rows = list(range(rank, 5, 3)) if rank < 3 else []
        merged = distributed.gather_rows(rows, [[values[r] for r in rows],
                                                [float(r) for r in rows]], 5)
        # Samples: texts of any length (none on rank 3), non-ASCII, NaN and None.
        texts = distributed.gather_json([[r, "é€" * r + "\n\"x", values[r]] for r in rows])
        Path(out, f"rank{rank}.json").write_text(json.dumps([*merged, texts]))
    finally:
        torch.distributed.destroy_process_group()


def test_gather_rows_over_gloo(tmp_path):
    """Every rank gets every row's values exactly, in row order, None kept, from four
    gloo processes, one of them holding no rows (more ranks than eval rows); the same for
    gather_json's texts, in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(4, f"file://{tmp_path / 'store'}", str(tmp_path)),
             nprocs=4)
    for rank in range(4):
        values, rows, texts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert values[0] == 0.5 and values[1] is None and values[2] != values[2]  # NaN
        assert values[3] == float("inf") and values[4] == -7.25
        assert [t[0] for t in texts] == [0, 3, 1, 4, 2]  # rank order
        assert all(t[1] == "é€" * t[0] + "\n\"x" for t in texts)
        assert texts[1][2] == float("inf") and texts[2][2] is None and texts[4][2] != texts[4][2]
        assert rows == [0.0, 1.0, 2.0, 3.0, 4.0]


PER_PAIR = ["--prompt-assignment", "per_pair", "--prompts-per-pair", "2",
            "--noise-scaling", "relative", "--anchor-decay", "0.5", "--sigma-growth", "2",
            "--fitness-baseline", "prompt", "--iterations", "3"]


def test_torchrun_matches_single_process_with_prompts_per_pair(tmp_path):
    """Each pair its own prompts and a per-prompt baseline, with relative noise scaling,
    anchored decay and sigma growth on: 2 ranks (pairs 0-1 and 2) give one process's
    journal, centred fitness included, and adapter."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _single(tmp_path / "one" / "run", *PER_PAIR)
    _torchrun(2, tmp_path / "two" / "run", *PER_PAIR)
    lines = [[json.loads(line) for line in (tmp_path / name / "run" / "journal.jsonl")
              .read_text().splitlines()] for name in ("one", "two")]
    keep = ("prompt_indices", "fitness", "centred_fitness", "shaped_fitness", "tokens")
    assert [[r[k] for k in keep] for r in lines[0]] == [[r[k] for k in keep] for r in lines[1]]
    assert all(len(r["prompt_indices"]) == 3 for r in lines[0])  # one group per pair
    assert all(r["noise_scaling"] == "relative" and r["anchor_decay"] == 0.5 for r in lines[1])
    _same_adapter(tmp_path / "one" / "run", tmp_path / "two" / "run")
