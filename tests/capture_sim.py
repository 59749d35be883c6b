"""CUDA graph capture and replay, simulated on CPU, for the decode loop's tests.

A CUDA graph records the kernels a piece of code launches, with their arguments and
buffer addresses, and ``replay()`` runs that recording again: the Python that issued the
kernels is not run. Two things then break a captured decode step, and neither shows up
when the step simply runs eagerly:

* a host sync inside the step (``.item()``, ``bool(tensor)``, ``.tolist()``, ``nonzero``,
  boolean-mask indexing): capture refuses it, and the loop falls back to eager;
* per-step state kept on the Python side (a counter, a slice bound, a cache position read
  into an int): the graph bakes in the value seen at capture and every replay reuses it,
  so the tokens silently go wrong.

``simulated_capture`` stands in for ``torch.cuda.CUDAGraph`` and friends. Capture records
every aten op (through a ``TorchDispatchMode``) and every Triton launch (the interpreter's
``InterpretedFunction.run``) with its arguments, and lists the host syncs it sees.
``replay()`` re-executes that recording on the same external buffers (weights, KV cache,
static inputs) and writes the results into the tensors the capture produced, as a real
replay does in place; no Python of the model, the layers or the launchers runs. During
capture ``torch.cuda.is_current_stream_capturing()`` answers True, so transformers takes
the paths it takes under a real capture.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_aten = torch.ops.aten
# Ops whose result size or value the host must read: a device sync on CUDA.
SYNC_OPS = {_aten._local_scalar_dense, _aten.nonzero, _aten.masked_select, _aten.is_nonzero,
            _aten.equal, _aten.unique_consecutive, _aten._unique2, _aten.unique_dim,
            _aten.repeat_interleave}
# Tensor methods that read values into Python without an aten op on a CPU tensor.
SYNC_METHODS = {"tolist", "numpy", "item"}


def _in_triton() -> bool:
    """Whether the current call comes from inside Triton (its interpreter's own copies)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "/triton/" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if "capture_sim" not in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                       for f in reversed(frames[-4:]))


class SimulatedGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: ``capture()`` records, ``replay()`` re-runs."""

    def __init__(self) -> None:
        self.ops: list[tuple] = []  # (callable, args, kwargs, outputs)
        self.syncs: list[str] = []  # host syncs seen during capture, with where
        self.replays = 0
        self.launches = 0
        self._keep: list[object] = []  # capture-time tensors, kept alive so ids stay unique

    @contextlib.contextmanager
    def capture(self):
        from triton.runtime.interpreter import InterpretedFunction

        graph = self
        original_run = InterpretedFunction.run
        state = {"launching": False}

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                result = func(*args, **kwargs)
                if state["launching"] or _in_triton():
                    return result  # the interpreter moving a launch's data: not the step's
                bool_index = func.overloadpacket is _aten.index and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 else ()) if i is not None)
                if func.overloadpacket in SYNC_OPS or bool_index:
                    graph.syncs.append(f"{func} at {_where()}")
                graph.ops.append((func, args, kwargs, result))
                graph._keep.append((args, kwargs, result))
                return result

        def recording_run(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return original_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            graph.launches += 1

            def launch(*a, **k):
                return original_run(fn_self, *a, grid=grid, warmup=False, **k)

            graph.ops.append((launch, args, kwargs, None))
            graph._keep.append((args, kwargs))
            state["launching"] = True
            hook = sys.getprofile()
            sys.setprofile(None)  # the interpreter's own Python: not the step's, and slow
            try:
                return original_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                sys.setprofile(hook)
                state["launching"] = False

        def profile(frame, event, arg):  # .tolist()/.numpy()/.item() on tensors
            if event == "c_call" and getattr(arg, "__name__", "") in SYNC_METHODS \
                    and isinstance(getattr(arg, "__self__", None), torch.Tensor) \
                    and not state["launching"] and not _in_triton():
                graph.syncs.append(f"Tensor.{arg.__name__} at {frame.f_code.co_filename}"
                                   f":{frame.f_lineno}")

        capturing = torch.cuda.is_current_stream_capturing
        torch.cuda.is_current_stream_capturing = lambda: True
        InterpretedFunction.run = recording_run
        previous_profile = sys.getprofile()
        sys.setprofile(profile)
        try:
            with Recorder():
                yield self
        finally:
            sys.setprofile(previous_profile)
            InterpretedFunction.run = original_run
            torch.cuda.is_current_stream_capturing = capturing

    def replay(self) -> None:
        """Run the recording again: same ops, same scalar arguments, same external
        buffers; results land in the capture's own tensors."""
        self.replays += 1
        now: dict[int, torch.Tensor] = {}  # id of a capture-time tensor -> its replay value

        def swap(value):
            return now.get(id(value), value) if isinstance(value, torch.Tensor) else value

        for fn, args, kwargs, outputs in self.ops:
            result = fn(*tree_map(swap, args), **tree_map(swap, kwargs))
            if outputs is None:
                continue
            old, _ = tree_flatten(outputs)
            new, _ = tree_flatten(result)
            for before, after in zip(old, new, strict=True):
                if isinstance(before, torch.Tensor):
                    now[id(before)] = after
        for *_, outputs in self.ops:  # in place, as a real replay writes
            for before in tree_flatten(outputs)[0] if outputs is not None else ():
                after = now.get(id(before)) if isinstance(before, torch.Tensor) else None
                if after is None or after is before or _same_memory(before, after) \
                        or torch._debug_has_internal_overlap(before) == 1:
                    continue  # in place already, or an expanded view of another output
                before.copy_(after)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride())


@contextlib.contextmanager
def simulated_capture(monkeypatch, decode_module):
    """Make the decode loop capture on CPU with ``SimulatedGraph``; yields the graphs made.

    Streams become no-ops, ``torch.cuda.CUDAGraph`` a ``SimulatedGraph`` and
    ``torch.cuda.graph(g)`` its capture; ``decode_module.capture_supported`` says yes.
    """
    graphs: list[SimulatedGraph] = []

    def new_graph() -> SimulatedGraph:
        graphs.append(SimulatedGraph())
        return graphs[-1]

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kwargs: g.capture())
    monkeypatch.setattr(decode_module, "capture_supported", lambda device: True)
    yield graphs
