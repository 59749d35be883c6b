"""Population generation: chunking invariance, centre rows, EOS handling, prompt rendering."""

from __future__ import annotations

import pytest
import torch

from lowmem_es.es import Member
from lowmem_es.generate import _cut, _segments, generate_population
from lowmem_es.lora import attach_es_lora
from lowmem_es.model import load_model


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    model, tokenizer, _ = load_model(tiny_llama_dir)
    es_model = attach_es_lora(model, ["q_proj", "o_proj"], rank=4, alpha=8.0, seed=0)
    generator = torch.Generator().manual_seed(4)
    for tensor in es_model.parameters().values():
        tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return es_model, tokenizer


@pytest.fixture(params=["generator", "philox", "philox-kernel"])
def sampler(request, monkeypatch):
    """Each sampling noise source: per-row torch.Generator (CPU default), counter-based
    Philox (the CUDA default) by its torch twin, and by its kernel in the interpreter."""
    from lowmem_es import backends
    from lowmem_es.kernels._runtime import INTERPRETED

    if request.param.endswith("kernel") and not INTERPRETED:
        pytest.skip("the kernel on CPU tensors needs TRITON_INTERPRET=1")
    backends.set_sampler(request.param.split("-")[0])
    backends.set_force(backends.SAMPLING, "kernel" if request.param.endswith("kernel")
                       else "torch")
    return request.param


PROMPTS = ["sun 1:", "a much longer prompt here 2:", "x"]
MEMBERS = [Member(0, 1), Member(0, -1), Member(1, 1), Member(1, -1)]
ROWS = [(m, p) for m in range(4) for p in range(3)]


def _generate(model, tokenizer, rows=ROWS, **kwargs):
    options = dict(members=MEMBERS, run_seed=1, iteration=2, sigma=0.2,
                   max_completion_length=6)
    options.update(kwargs)
    return generate_population(model, tokenizer, PROMPTS, rows, **options)


def test_completions_do_not_depend_on_chunking(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    reference = _generate(model, tokenizer)
    assert len(reference) == len(ROWS)
    for chunk in (1, 5):
        assert [c.ids for c in _generate(model, tokenizer, rows_per_chunk=chunk)] == [
            c.ids for c in reference]
    # Members really are perturbed differently.
    assert len({tuple(c.ids) for c in reference}) > 3


def test_callers_tokenizer_keeps_its_padding_and_truncation_sides(model_and_tokenizer):
    """Decoding needs left padding/truncation; the caller's settings are put back, and a
    right-padding tokenizer still gives the left-padded completions."""
    model, tokenizer = model_and_tokenizer
    reference = _generate(model, tokenizer)
    sides = (tokenizer.padding_side, tokenizer.truncation_side)
    tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
    try:
        again = _generate(model, tokenizer)
        assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "right")
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    assert [c.ids for c in again] == [c.ids for c in reference]


def test_member_rows_match_their_own_generation(model_and_tokenizer):
    """A member's completions equal those generated for it alone (rows unsorted too)."""
    model, tokenizer = model_and_tokenizer
    everything = _generate(model, tokenizer)
    rows = [(2, 1), (2, 0)]
    alone = _generate(model, tokenizer, rows=rows)
    assert [c.ids for c in alone] == [everything[2 * 3 + 1].ids, everything[2 * 3 + 0].ids]


def test_centre_rows_use_no_perturbation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    centre = _generate(model, tokenizer, rows=[(None, 0), (None, 1)])
    zero_sigma = _generate(model, tokenizer, rows=[(0, 0), (0, 1)], sigma=0.0)
    assert [c.ids for c in centre] == [c.ids for c in zero_sigma]
    with pytest.raises(ValueError, match="mixes centre rows"):
        _generate(model, tokenizer, rows=[(None, 0), (0, 1)])


def test_sampling_is_reproducible(model_and_tokenizer, sampler):
    model, tokenizer = model_and_tokenizer
    state = torch.random.get_rng_state()
    first = _generate(model, tokenizer, temperature=1.0)
    second = _generate(model, tokenizer, temperature=1.0)
    other = _generate(model, tokenizer, temperature=1.0, iteration=3)
    assert [c.ids for c in first] == [c.ids for c in second]
    assert [c.ids for c in first] != [c.ids for c in other]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_cut_and_segments():
    assert _cut([5, 6, 2, 7, 0], [2], 0) == [5, 6, 2]
    assert _cut([5, 6, 0, 0], [2], 0) == [5, 6]
    assert _cut([5, 6], [], None) == [5, 6]
    assert _segments([0, 0, 1, 1, 1, 0]) == [(0, 2), (1, 3), (0, 1)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_loop_and_generate_backends_agree(model_and_tokenizer, temperature, sampler):
    model, tokenizer = model_and_tokenizer
    loop = _generate(model, tokenizer, temperature=temperature, backend="loop")
    plain = _generate(model, tokenizer, temperature=temperature, backend="generate")
    assert [c.ids for c in loop] == [c.ids for c in plain]
    with pytest.raises(ValueError, match="generation_backend"):
        _generate(model, tokenizer, backend="vllm")


@pytest.mark.parametrize("backend", ["loop", "generate"])
def test_chunked_prefill_gives_the_same_completions(model_and_tokenizer, backend):
    """The plan's prefill_chunk bounds activations without changing the completions."""
    model, tokenizer = model_and_tokenizer
    whole = _generate(model, tokenizer, backend=backend, rows_per_chunk=5)
    widths = []
    inner = model.model.model  # the decoder stack: sees exactly the tokens of each pass
    hook = inner.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True)
    try:
        pieces = _generate(model, tokenizer, backend=backend, rows_per_chunk=5,
                           prefill_chunk=2)
    finally:
        hook.remove()
    assert [c.ids for c in pieces] == [c.ids for c in whole]
    assert max(widths) == 2  # the prompts (up to 7 tokens) really went in pieces


# --- chunk-invariant sampling, member lists per chunk, out-of-memory backoff ---

def test_sampling_does_not_depend_on_chunking(model_and_tokenizer, sampler):
    """Per-row sampling keys: the same samples whatever the chunk size or row subset."""
    model, tokenizer = model_and_tokenizer
    reference = _generate(model, tokenizer, temperature=1.0)
    for chunk in (1, 5):
        assert [c.ids for c in _generate(model, tokenizer, temperature=1.0,
                                         rows_per_chunk=chunk)] == [c.ids for c in reference]
    alone = _generate(model, tokenizer, rows=[(3, 2)], temperature=1.0)
    assert alone[0].ids == reference[3 * 3 + 2].ids
    greedy = _generate(model, tokenizer)
    assert [c.ids for c in reference] != [c.ids for c in greedy]  # it really samples


def test_repeated_rows_sample_different_completions(model_and_tokenizer):
    """num_generations > 1: the k-th repeat of a (member, prompt) row has its own key."""
    model, tokenizer = model_and_tokenizer
    rows = [(0, 0)] * 6
    texts = [c.ids for c in _generate(model, tokenizer, rows=rows, temperature=2.0)]
    assert len({tuple(t) for t in texts}) > 1


def test_sampler_defaults_and_switches(model_and_tokenizer, monkeypatch):
    """CPU default: the per-row generators; forcing the sampling kernel alone selects the
    Philox source (as on CUDA); an unknown sampler is named."""
    from lowmem_es import backends
    from lowmem_es.kernels._runtime import INTERPRETED

    model, tokenizer = model_and_tokenizer

    def ids(sampler, force):
        backends.set_sampler(sampler)
        backends.set_force(backends.SAMPLING, force)
        return [c.ids for c in _generate(model, tokenizer, temperature=1.0)]

    default = ids(None, None)
    assert default == ids("generator", None)
    philox = ids("philox", "torch")
    assert philox != default
    if INTERPRETED:
        assert ids(None, "kernel") == philox
    with pytest.raises(ValueError, match="sampler must be one of"):
        backends.set_sampler("numpy")


@pytest.mark.parametrize("sampler", ["generator", "philox"], indirect=True)  # kernel = twin
def test_gumbel_sampler_draws_from_softmax(sampler):
    """argmax(logits / T + Gumbel) has the softmax(logits / T) distribution."""
    from lowmem_es.generate import _sampler

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    rows = 4000
    processor = _sampler(list(range(1, rows + 1)), prompt_len=3, temperature=0.5)
    scores = processor(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1).clone())
    frequencies = torch.bincount(scores.argmax(-1), minlength=5).float() / rows
    expected = torch.softmax(logits / 0.5, dim=0)
    torch.testing.assert_close(frequencies, expected, atol=0.02, rtol=0)
    # The next step (one more input token) draws fresh noise.
    again = processor(torch.zeros(rows, 4, dtype=torch.long), logits.expand(rows, -1).clone())
    assert not torch.equal(again.argmax(-1), scores.argmax(-1))


def test_each_chunk_lists_only_its_members(model_and_tokenizer, monkeypatch):
    """The ES-LoRA layers cache a perturbed adapter per listed member: list only the chunk's."""
    model, tokenizer = model_and_tokenizer
    listed = []
    original = model.population

    def spy(run_seed, iteration, sigma, members, segments):
        listed.append((list(members), list(segments)))
        return original(run_seed, iteration, sigma, members, segments)

    monkeypatch.setattr(model, "population", spy)
    _generate(model, tokenizer, rows_per_chunk=4)
    assert [len(members) for members, _ in listed] == [2, 2, 2]
    assert listed[1] == ([MEMBERS[1], MEMBERS[2]], [(0, 2), (1, 2)])


def _fail_once_above(model, monkeypatch, rows_limit):
    """Make generation raise CUDA OOM once for a batch of more than ``rows_limit`` rows
    (whichever backend runs it: the decode loop or generate())."""
    import lowmem_es.generate as generation

    original = generation._run_model
    calls = []

    def run(net, kwargs, backend):
        rows = kwargs["input_ids"].shape[0]
        calls.append(rows)
        if rows > rows_limit and calls.count(rows) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(net, kwargs, backend)

    monkeypatch.setattr(generation, "_run_model", run)
    return calls


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_out_of_memory_halves_the_chunk_and_loses_nothing(model_and_tokenizer, monkeypatch,
                                                          temperature):
    model, tokenizer = model_and_tokenizer
    reference = _generate(model, tokenizer, temperature=temperature)
    calls = _fail_once_above(model, monkeypatch, rows_limit=6)
    events = []
    result = _generate(model, tokenizer, temperature=temperature, events=events)
    assert [c.ids for c in result] == [c.ids for c in reference]
    assert calls == [12, 6, 6]  # all 12 rows fail once, then two halves of 6
    assert len(events) == 1
    assert events[0]["event"] == "oom_backoff"
    assert (events[0]["first_row"], events[0]["rows"], events[0]["retry_rows"]) == (0, 12, 6)
    assert "Tried to allocate" in events[0]["message"]


def test_out_of_memory_backoff_keeps_the_smaller_chunk(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    reference = _generate(model, tokenizer)
    calls = _fail_once_above(model, monkeypatch, rows_limit=2)
    events = []
    result = _generate(model, tokenizer, rows_per_chunk=5, events=events)
    assert [c.ids for c in result] == [c.ids for c in reference]
    # 5 fails -> 2 rows at a time; 2 never fails again.
    assert calls == [5, 2, 2, 2, 2, 2, 2]
    assert [(e["rows"], e["retry_rows"]) for e in events] == [(5, 2)]


def test_out_of_memory_at_one_row_is_raised(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    _fail_once_above(model, monkeypatch, rows_limit=0)
    events = []
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        _generate(model, tokenizer, rows=[(0, 0), (0, 1)], events=events)
    assert "does not fit" in "\n".join(getattr(info.value, "__notes__", []))
    assert [(e["rows"], e["retry_rows"]) for e in events] == [(2, 1)]
