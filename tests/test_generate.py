"""Population generation: chunking invariance, centre rows, EOS handling, prompt rendering."""

from __future__ import annotations

import pytest
import torch

from lowmem_es.generate import _cut, _segments, generate_population, render_prompt
from lowmem_es.lora import Member, attach_es_lora
from lowmem_es.model import load_model


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    model, tokenizer, _ = load_model(tiny_llama_dir)
    es_model = attach_es_lora(model, ["q_proj", "o_proj"], rank=4, alpha=8.0, seed=0)
    generator = torch.Generator().manual_seed(4)
    for tensor in es_model.parameters().values():
        tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return es_model, tokenizer


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


def test_sampling_is_reproducible(model_and_tokenizer):
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


def test_render_prompt(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    assert render_prompt("hello", tokenizer, 0) == "hello"
    with pytest.raises(ValueError, match=r"row 3.*chat template"):
        render_prompt([{"role": "user", "content": "hi"}], tokenizer, 3)
    with pytest.raises(ValueError, match=r"row 1.*string or a list of chat messages"):
        render_prompt(42, tokenizer, 1)
