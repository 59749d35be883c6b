"""ESTrainer end to end on tiny 4-bit models: learning, determinism, outputs, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lowmem_es import ESConfig, ESTrainer
from lowmem_es.example import example_config, tiny_dataset
from lowmem_es.rewards import target_fraction


def test_tiny_example_learns(tiny_llama_dir, tmp_path):
    """The built-in example: the centre's reward rises clearly (deterministic, fixed seed)."""
    data = tiny_dataset()
    trainer = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=data,
                        eval_dataset=data, args=example_config(str(tmp_path / "run")))
    before = trainer.evaluate()["eval_reward"]
    history = trainer.train()
    after = trainer.evaluate()["eval_reward"]
    print(f"tiny example: eval reward {before:.3f} -> {after:.3f}; train reward "
          f"{history[0]['reward_mean']:.3f} -> {history[-1]['reward_mean']:.3f}")
    assert after >= before + 0.5
    first = sum(h["reward_mean"] for h in history[:5]) / 5
    last = sum(h["reward_mean"] for h in history[-5:]) / 5
    assert last >= first + 0.3
    out = tmp_path / "run"
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert [j["iteration"] for j in journal] == list(range(len(history)))
    assert all(len(j["fitness"]) == 16 for j in journal)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "run.toml").is_file()
    assert ESConfig.from_toml(out / "run.toml") == trainer.args


def _short_run(model_dir, output_dir, **overrides):
    values = dict(iterations=2, population_size=4, batch_size=2, max_completion_length=4,
                  lora_rank=2, lora_alpha=4.0, sigma=0.05, learning_rate=0.1)
    values.update(overrides)
    args = example_config(str(output_dir), **values)
    trainer = ESTrainer(str(model_dir), [target_fraction], train_dataset=tiny_dataset(8),
                        args=args)
    trainer.train()
    return trainer


def test_runs_are_deterministic_and_seed_dependent(tiny_llama_dir, tmp_path):
    first = _short_run(tiny_llama_dir, tmp_path / "a")
    second = _short_run(tiny_llama_dir, tmp_path / "b")
    other = _short_run(tiny_llama_dir, tmp_path / "c", seed=1)
    read = [(tmp_path / d / "journal.jsonl").read_text().splitlines() for d in "abc"]
    fits = [[json.loads(line)["fitness"] for line in lines] for lines in read]
    assert fits[0] == fits[1]
    for a, b in zip(first.es_model.parameters().values(),
                    second.es_model.parameters().values(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(
        first.es_model.parameters().values(), other.es_model.parameters().values(), strict=True))


def test_chunked_generation_gives_same_run(tiny_llama_dir, tmp_path):
    """rows_per_chunk changes how rows are batched, not what the run computes."""
    whole = _short_run(tiny_llama_dir, tmp_path / "whole", rows_per_chunk=0)
    chunked = _short_run(tiny_llama_dir, tmp_path / "chunked", rows_per_chunk=3)
    for a, b in zip(whole.es_model.parameters().values(),
                    chunked.es_model.parameters().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_lr_schedule_is_journaled_and_replayed(tiny_llama_dir, tmp_path):
    """A cosine schedule: the journal holds the decayed rate, and replay reproduces the run."""
    from lowmem_es import es, journal

    def run(name, **overrides):
        args = example_config(str(tmp_path / name), iterations=4, **overrides)
        trainer = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(),
                            args=args)
        trainer.train()
        lines = (tmp_path / name / "journal.jsonl").read_text().splitlines()
        return trainer, [json.loads(line) for line in lines]

    cosine, records = run("cos", lr_schedule="cosine", lr_min_ratio=0.25)
    lr = cosine.args.learning_rate
    rates = [j["learning_rate"] for j in records]
    assert rates == [es.scheduled_learning_rate(lr, "cosine", i, 4, 0.25) for i in range(4)]
    assert rates[0] == pytest.approx(lr) and rates[-1] == pytest.approx(lr / 4)
    assert all(j["update_norm"] > 0 for j in records)  # the rewards gave a signal
    assert journal.replay_journal(tmp_path / "cos", 4).max_abs_diff == 0.0
    constant, plain = run("const")
    assert [j["learning_rate"] for j in plain] == [lr] * 4
    assert any(not torch.equal(a, b) for a, b in zip(
        constant.es_model.parameters().values(), cosine.es_model.parameters().values(),
        strict=True))


def test_qwen2_and_adam(tiny_qwen2_dir, tmp_path):
    trainer = _short_run(tiny_qwen2_dir, tmp_path / "q", optimizer="adam", weight_decay=0.01,
                         lora_target_modules=["q_proj", "v_proj"])
    assert trainer.adam_state.step == 2
    assert any(float(t.abs().sum()) > 0 for n, t in trainer.es_model.parameters().items()
               if n.endswith("lora_B"))


def test_batches_cover_the_dataset_each_epoch(tiny_llama_dir, tmp_path):
    args = example_config(str(tmp_path), batch_size=3, iterations=1)
    trainer = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(6),
                        args=args)
    epoch0 = trainer.batch_indices(0) + trainer.batch_indices(1)
    epoch1 = trainer.batch_indices(2) + trainer.batch_indices(3)
    assert sorted(epoch0) == sorted(epoch1) == list(range(6))
    assert epoch0 != epoch1  # reshuffled per epoch
    assert trainer.batch_indices(1) == trainer.batch_indices(1)


def test_bad_dataset_is_named(tiny_llama_dir, tmp_path):
    """ESTrainer checks its rows before any model work (every case: tests/test_data.py)."""
    with pytest.raises(ValueError, match="`train_dataset` row 1: field 'prompt' must be"):
        ESTrainer(str(tiny_llama_dir), [target_fraction],
                  train_dataset=[{"prompt": "ok"}, {"prompt": 7}],
                  args=example_config(str(tmp_path)))
    with pytest.raises(ValueError, match="`eval_dataset` is empty"):
        ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=[{"prompt": "ok"}],
                  eval_dataset=[], args=example_config(str(tmp_path)))


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ESTrainer(str(tmp_path / "no-such-model"), [target_fraction],
                  train_dataset=tiny_dataset(2), args=example_config(str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ESTrainer(str(tmp_path / "empty"), [target_fraction],
                  train_dataset=tiny_dataset(2), args=example_config(str(tmp_path)))


def test_reward_weights_must_match(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="reward_weights"):
        ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(2),
                  args=example_config(str(tmp_path), reward_weights=[1.0, 2.0]))


def test_bad_reward_function_output_is_named(tiny_llama_dir, tmp_path):
    def broken(completions, **kwargs):
        return [0.0]

    trainer = ESTrainer(str(tiny_llama_dir), [broken], train_dataset=tiny_dataset(2),
                        args=example_config(str(tmp_path), batch_size=2, population_size=2,
                                            max_completion_length=2))
    with pytest.raises(ValueError, match="'broken' returned 1 values"):
        trainer.step(0)


def test_profile_plans_chunks_and_records_prediction(tiny_llama_dir, tmp_path):
    trainer = _short_run(tiny_llama_dir, tmp_path / "p", profile="cpu", rows_per_chunk=3)
    assert trainer.plan is not None and trainer.rows_per_chunk == 3  # the cap is respected
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["profile"] == "cpu" and plan["rows_per_chunk"] == 3
    metrics = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["predicted_peak_mb"] > 0 for m in metrics)


def test_generation_backends_give_the_same_run(tiny_llama_dir, tmp_path):
    loop = _short_run(tiny_llama_dir, tmp_path / "loop", generation_backend="loop")
    generate = _short_run(tiny_llama_dir, tmp_path / "gen", generation_backend="generate")
    for a, b in zip(loop.es_model.parameters().values(),
                    generate.es_model.parameters().values(), strict=True):
        assert torch.equal(a, b)


def test_oom_backoff_lowers_chunk_for_later_iterations(tiny_llama_dir, tmp_path, monkeypatch):
    import lowmem_es.generate as generation

    original = generation._run_model
    calls = {"n": 0}

    def flaky(model, kwargs, backend):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(model, kwargs, backend)

    monkeypatch.setattr(generation, "_run_model", flaky)
    trainer = _short_run(tiny_llama_dir, tmp_path / "o", rows_per_chunk=8)
    assert trainer.rows_per_chunk == 4
    journal = [json.loads(x) for x in (tmp_path / "o" / "journal.jsonl").read_text().split("\n")
               if x]
    assert journal[0]["oom_events"][0]["retry_rows"] == 4 and "oom_events" not in journal[1]
    reference = _short_run(tiny_llama_dir, tmp_path / "r", rows_per_chunk=8)
    for a, b in zip(trainer.es_model.parameters().values(),
                    reference.es_model.parameters().values(), strict=True):
        assert torch.equal(a, b)  # nothing lost or changed by the retry


def test_long_prompts_are_warned_about_once(tiny_llama_dir, tmp_path, caplog):
    rows = [{"prompt": "x" * 80, "target": "a"}, {"prompt": "short", "target": "a"}]
    with caplog.at_level("WARNING", logger="lowmem_es"):
        ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=rows,
                  args=example_config(str(tmp_path), max_prompt_length=32))
    assert any("1 of 2 prompts are longer than max_prompt_length=32" in r.message
               for r in caplog.records)


def test_kernel_status_goes_to_the_first_metrics_line(tiny_llama_dir, tmp_path):
    trainer = _short_run(tiny_llama_dir, tmp_path / "k")
    # On CPU no Triton kernel runs, so the self-check has nothing to check.
    assert trainer.kernel_status == {"noisy_lora": "not used", "nf4_matmul": "not used",
                                     "es_update": "not used", "sampling": "not used"}
    metrics = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["kernels"] == trainer.kernel_status
    assert all("kernels" not in m for m in metrics[1:])


def test_int8_kv_cache_runs_and_needs_the_loop(tiny_llama_dir, tmp_path):
    trainer = _short_run(tiny_llama_dir, tmp_path / "int8", kv_cache_dtype="int8")
    assert len(trainer.history) == 2
    assert all(math.isfinite(h["reward_mean"]) for h in trainer.history)
    with pytest.raises(ValueError, match=r"`kv_cache_dtype`.*needs generation_backend='loop'"):
        example_config(str(tmp_path / "x"), kv_cache_dtype="int8",
                       generation_backend="generate")


def test_a_kernel_that_broke_the_cuda_context_stops_before_any_work(tiny_llama_dir, tmp_path,
                                                                      monkeypatch):
    from lowmem_es import trainer as trainer_module
    from lowmem_es.errors import USER_ERRORS, KernelError

    lost = ("disabled: RuntimeError: illegal memory access; the CUDA context was lost, "
            "restart with LOWMEM_ES_FORCE_TORCH=1")
    monkeypatch.setattr(trainer_module, "check_kernels", lambda es_model, device, **k: {
        "noisy_lora": lost, "nf4_matmul": "unchecked: the CUDA context was lost (x)",
        "es_update": "not used"})
    with pytest.raises(KernelError, match=r"\['noisy_lora', 'nf4_matmul'\].*"
                                          r"LOWMEM_ES_FORCE_TORCH=1") as error:
        _short_run(tiny_llama_dir, tmp_path / "lost")
    assert isinstance(error.value, USER_ERRORS)  # the CLI reports it without a traceback
    assert not (tmp_path / "lost").exists()


def test_evaluation_is_sharded_over_the_ranks(tiny_llama_dir, tmp_path, monkeypatch):
    """Under torchrun rank r generates eval rows r, r + world, ... only, and the rows
    gathered from all ranks give one process's result (tests/test_distributed.py runs
    the real collective)."""
    from lowmem_es import distributed
    from lowmem_es import generate as generate_module

    trainer = _short_run(tiny_llama_dir, tmp_path / "shard", iterations=1)
    rows = tiny_dataset(7)
    alone = trainer.evaluate(rows)
    completions = generate_module.generate_population(
        trainer.es_model, trainer.tokenizer, trainer._prompts(rows),
        [(None, p) for p in range(7)], max_completion_length=trainer.args.max_completion_length,
        max_prompt_length=trainer.args.max_prompt_length)
    totals, per_func = trainer.score(rows, list(range(7)), completions)
    generated, gathered = [], []
    real_generate = generate_module.generate_population

    def spy(model, tokenizer, prompts, spec, **kwargs):
        generated.append([p for _, p in spec])
        return real_generate(model, tokenizer, prompts, spec, **kwargs)

    def gather(indices, columns, count):  # this rank's rows in; every rank's rows out
        gathered.append((list(indices), [list(c) for c in columns], count))
        return [totals] + [per_func[name] for name in per_func]

    monkeypatch.setattr(generate_module, "generate_population", spy)  # evaluate.score_centre's
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "gather_rows", gather)
    assert trainer.evaluate(rows) == alone
    assert generated == [[1, 3, 5]]
    [(indices, columns, count)] = gathered
    assert indices == [1, 3, 5] and count == 7
    assert columns[0] == [totals[i] for i in indices]  # this rank's rows, as one process


def _same_masters(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.es_model.parameters().values(),
                                                 second.es_model.parameters().values(),
                                                 strict=True))


def test_a_trainer_continues_its_own_run(tiny_llama_dir, tmp_path, caplog):
    """train() again on the same object continues the run it wrote (more iterations):
    it used to refuse ("pass --resume"), and with overwrite=True it wiped the directory
    and started "iteration 0" from the trained weights."""
    reference = _short_run(tiny_llama_dir, tmp_path / "ref", iterations=4)
    for overwrite in (False, True):
        out = tmp_path / f"run{overwrite}"
        if overwrite:  # a run there already, which overwrite=True replaces
            _short_run(tiny_llama_dir, out, seed=7)
        args = example_config(str(out), iterations=2, population_size=4, batch_size=2,
                              max_completion_length=4, lora_rank=2, lora_alpha=4.0,
                              sigma=0.05, learning_rate=0.1)
        trainer = ESTrainer(str(tiny_llama_dir), [target_fraction],
                            train_dataset=tiny_dataset(8), args=args, overwrite=overwrite)
        trainer.train()
        trainer.args.iterations = 4
        trainer.train()
        assert trainer.iteration == 4 and [h["iteration"] for h in trainer.history] == [
            0, 1, 2, 3]
        assert _same_masters(trainer, reference)
        journal = (tmp_path / f"run{overwrite}" / "journal.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in journal] == [0, 1, 2, 3]
    # Pointed at a new directory, it starts a run there (no "--resume: no run" warning).
    trainer.args.output_dir = str(tmp_path / "elsewhere")
    trainer.args.iterations = 1
    with caplog.at_level("WARNING", logger="lowmem_es"):
        trainer.train()
    assert not any("no run to continue" in r.getMessage() for r in caplog.records)
    assert trainer.iteration == 1 and len(trainer.history) == 1
    # ... from the starting adapter, not from the weights it trained before.
    assert _same_masters(trainer, _short_run(tiny_llama_dir, tmp_path / "one", iterations=1))


def test_two_trainers_keep_their_own_noise_backend_and_kernel_switch(tiny_llama_dir,
                                                                     tmp_path):
    """Process-wide switches are applied per call: building trainer B no longer changes
    the noise backend or NF4 kernel switch trainer A runs with."""
    from lowmem_es import backends, noise

    def nf4():
        return backends.force(backends.NF4_MATMUL)

    seen = []
    first = _short_run(tiny_llama_dir, tmp_path / "a", iterations=1, nf4_kernel=True)
    second = _short_run(tiny_llama_dir, tmp_path / "b", iterations=1, nf4_kernel=False,
                        noise_backend="eager")
    before = noise.get_backend(), nf4()
    first.args.iterations = 2
    first.train(callback=lambda entry: seen.append((noise.get_backend(), nf4())))
    second.args.iterations = 2
    second.train(callback=lambda entry: seen.append((noise.get_backend(), nf4())))
    assert seen == [(first.args.noise_backend, None), ("eager", "torch")]
    assert (noise.get_backend(), nf4()) == before  # restored after


def test_given_tokenizer_is_used_and_a_mismatched_model_is_refused(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from lowmem_es.lora import attach_es_lora
    from lowmem_es.model import load_model

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    args = example_config(str(tmp_path / "run"), iterations=1, population_size=4,
                          batch_size=2, max_completion_length=2, lora_rank=2, lora_alpha=4.0)
    trainer = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(4),
                        args=args, tokenizer=tokenizer)
    assert trainer.tokenizer is tokenizer and tokenizer.padding_side == "left"
    base, tokenizer, _ = load_model(tiny_llama_dir)
    model = attach_es_lora(base, ["q_proj"], 2, 4.0)
    with pytest.raises(ValueError, match=r"does not match `args` \(lora_rank: args 8, model 2"):
        ESTrainer(model, [target_fraction], train_dataset=tiny_dataset(4), tokenizer=tokenizer,
                  args=example_config(str(tmp_path / "other"), lora_rank=8))


def test_a_kernel_the_start_up_check_switched_off_stays_off(tiny_llama_dir, tmp_path,
                                                            monkeypatch):
    """check_kernels may switch the NF4 kernel off (it failed on this GPU); the per-call
    settings used to switch it back on for every iteration and evaluation."""
    from lowmem_es import backends
    from lowmem_es import trainer as trainer_module

    def broken_nf4(es_model, device, sampling=False):
        backends.switch_off(backends.NF4_MATMUL)
        return {"nf4_matmul": "disabled: kernel disagrees with its twin"}

    backends.set_force(backends.NF4_MATMUL, None)
    monkeypatch.setattr(trainer_module, "check_kernels", broken_nf4)
    seen = []
    args = example_config(str(tmp_path / "run"), iterations=2, population_size=4,
                          batch_size=2, max_completion_length=2, lora_rank=2, lora_alpha=4.0)
    trainer = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(4),
                        args=args)
    backends.set_force(backends.NF4_MATMUL, None)  # another trainer built since, kernel on
    trainer.train(callback=lambda entry: seen.append(backends.force(backends.NF4_MATMUL)))
    assert seen == ["torch", "torch"]


def constant_reward(completions, **kwargs):
    return [0.5] * len(completions)


def test_an_iteration_without_signal_says_so(tiny_llama_dir, tmp_path, caplog):
    """Members that all score alike give a zero update: the journal, the metrics and the
    console say so (TRL logs frac_reward_zero_std), and three in a row name remedies."""
    args = example_config(str(tmp_path / "flat"), iterations=3, population_size=4,
                          batch_size=2, max_completion_length=3, lora_rank=2, lora_alpha=4.0)
    trainer = ESTrainer(str(tiny_llama_dir), [constant_reward], train_dataset=tiny_dataset(4),
                        args=args)
    before = {n: t.clone() for n, t in trainer.es_model.parameters().items()}
    with caplog.at_level("WARNING", logger="lowmem_es"):
        trainer.train()
    records = [json.loads(line) for line in
               (tmp_path / "flat" / "journal.jsonl").read_text().splitlines()]
    assert all(r["no_signal"] and r["fitness_std"] == 0.0 for r in records)
    assert all(0.25 <= r["identical_members"] <= 1.0 for r in records)
    metrics = [json.loads(line) for line in
               (tmp_path / "flat" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["no_signal"] and m["fitness_std"] == 0.0 for m in metrics)
    assert all(torch.equal(before[n], t) for n, t in trainer.es_model.parameters().items())
    messages = [r.getMessage() for r in caplog.records if "no signal" in r.getMessage()]
    assert len(messages) == 3 and "every member scored 0.5" in messages[0]
    assert any("3 iterations in a row without signal" in r.getMessage()
               and "--sigma" in r.getMessage() for r in caplog.records)
    # A reward that tells members apart: a spread, no flag.
    signal = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(),
                       args=example_config(str(tmp_path / "signal"), iterations=1))
    signal.train()
    [record] = [json.loads(line) for line in
                (tmp_path / "signal" / "journal.jsonl").read_text().splitlines()]
    assert "no_signal" not in record and record["fitness_std"] > 0
    assert record["identical_members"] < 1.0


def test_completions_digest_tells_completions_apart():
    from types import SimpleNamespace

    from lowmem_es.trainer import _completions_digest

    def done(*ids):
        return [SimpleNamespace(ids=list(row)) for row in ids]

    first = _completions_digest(done([1, 2], [3]))
    assert first == _completions_digest(done([1, 2], [3]))
    assert first != _completions_digest(done([1], [2, 3]))  # same tokens, other rows
    assert first != _completions_digest(done([1, 2], [4]))
    assert first == float(int(first)) and first < 2.0**53  # exact in float64


def _per_pair_run(model_dir, output_dir, resume=False, **overrides):
    values = dict(iterations=3, population_size=6, prompt_assignment="per_pair",
                  prompts_per_pair=2, fitness_baseline="prompt", max_completion_length=4,
                  lora_rank=2, lora_alpha=4.0)
    values.update(overrides)
    trainer = ESTrainer(str(model_dir), [target_fraction], train_dataset=tiny_dataset(5),
                        args=example_config(str(output_dir), **values), resume=resume)
    trainer.train()
    return trainer


def test_prompts_per_pair_are_windows_of_the_data_order_and_replay(tiny_llama_dir, tmp_path):
    """Pair k of iteration t sees positions (t * pairs + k) * size ... of the seeded data
    order (both members the same rows); the journal holds the groups and the centred
    fitness, and replay rebuilds the adapter bit for bit."""
    from lowmem_es import journal

    trainer = _per_pair_run(tiny_llama_dir, tmp_path / "pairs")
    records = [json.loads(line) for line in
               (tmp_path / "pairs" / "journal.jsonl").read_text().splitlines()]
    for t, record in enumerate(records):
        assert record["prompt_indices"] == [trainer._data_stream((t * 3 + k) * 2, 2)
                                            for k in range(3)]
        assert record["fitness_baseline"] == "prompt" and len(record["centred_fitness"]) == 6
    assert records[0]["prompt_indices"] != records[1]["prompt_indices"]
    assert journal.replay_journal(tmp_path / "pairs").max_abs_diff == 0.0
    # Killed after 2 iterations and resumed: the run that never stopped.
    _per_pair_run(tiny_llama_dir, tmp_path / "resumed", iterations=2)
    resumed = _per_pair_run(tiny_llama_dir, tmp_path / "resumed", resume=True)
    assert _same_masters(trainer, resumed)


def test_fitness_baselines(tiny_llama_dir, tmp_path):
    """"pair" leaves each pair's difference; "prompt" centres every prompt on the mean of
    the members that saw it (pooled by dataset row)."""
    args = example_config(str(tmp_path / "b"), population_size=4, fitness_baseline="pair",
                          prompt_assignment="per_pair", prompts_per_pair=2, lora_rank=2,
                          lora_alpha=4.0)
    trainer = ESTrainer(str(tiny_llama_dir), [target_fraction], train_dataset=tiny_dataset(5),
                        args=args)
    assert trainer._centred([1.0, 0.0, 0.5, 0.25], [], [[0], [1]]) == [0.5, -0.5, 0.125,
                                                                        -0.125]
    trainer.args.fitness_baseline = "prompt"
    # Pair 0 saw rows 3 and 7, pair 1 rows 7 and 9: row 7 is pooled over all four members.
    scores = [[1.0, 0.0, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0]]  # [prompt slot][member]
    centred = trainer._centred([0.0] * 4, scores, [[3, 7], [7, 9]])
    row3, row7, row9 = (1.0 + 0.0) / 2, (1.0 + 1.0 + 0.5 + 0.5) / 4, 0.0
    assert centred == pytest.approx([((1.0 - row3) + (1.0 - row7)) / 2,
                                     ((0.0 - row3) + (1.0 - row7)) / 2,
                                     ((0.5 - row7) + (0.0 - row9)) / 2,
                                     ((0.5 - row7) + (0.0 - row9)) / 2])


def test_sigma_level_follows_the_journal():
    """Up one level per iteration without signal whose partners wrote alike (to the cap),
    down one per iteration with signal or whose partners differ (broken by noise), unchanged
    by a skipped one; 1 (off) always gives level 0."""
    from lowmem_es.trainer import next_sigma_level

    flat, moving, skipped = {"no_signal": True, "identical_pairs": 1.0}, {}, {"skipped": True}
    broken = {"no_signal": True, "identical_pairs": 0.25, "identical_members": 1.0}
    level, seen = 0, []
    for record in [flat, flat, skipped, moving, flat, flat, flat, flat, flat, broken, broken]:
        level = next_sigma_level(level, record, 2.0)
        seen.append(level)
    assert seen == [1, 2, 2, 1, 2, 3, 4, 4, 4, 3, 2]  # 2**4 = 16 = SIGMA_GROWTH_CAP
    # without antithetic pairs the whole population's sameness decides
    assert next_sigma_level(2, {"no_signal": True, "identical_members": 0.75}, 2.0) == 3
    assert next_sigma_level(2, {"no_signal": True, "identical_members": 0.25}, 2.0) == 1
    assert next_sigma_level(3, flat, 1.0) == 0
    assert next_sigma_level(0, flat, 16.0) == 1 and next_sigma_level(1, flat, 16.0) == 1


def test_identical_pairs_counts_partners_that_wrote_the_same():
    from lowmem_es.es import Member
    from lowmem_es.trainer import identical_pairs

    members = [Member(0, 1), Member(0, -1), Member(1, 1), Member(1, -1), Member(2, 1)]
    assert identical_pairs(members, [5.0, 5.0, 6.0, 7.0, 5.0]) == 0.5  # pair 2 is unpaired
    assert identical_pairs(members[:2], [1.0, 1.0]) == 1.0
    assert identical_pairs([Member(0, 1), Member(1, 1)], [1.0, 1.0]) is None


def test_sigma_grows_while_there_is_no_signal_and_resumes(tiny_llama_dir, tmp_path):
    """sigma_growth doubles the journaled sigma after each flat iteration whose partners
    wrote alike; a resumed run rebuilds the level from the journal, so it goes on as the run
    that never stopped. Partners that write different text (too much noise) do not grow it."""
    def run(out, iterations, resume=False, sigma=1e-6):
        args = example_config(str(out), iterations=iterations, population_size=4,
                              batch_size=2, max_completion_length=3, lora_rank=2,
                              lora_alpha=4.0, sigma=sigma, sigma_growth=2.0)
        trainer = ESTrainer(str(tiny_llama_dir), [constant_reward],
                            train_dataset=tiny_dataset(4), args=args, resume=resume)
        trainer.train()
        return [json.loads(line) for line in
                (out / "journal.jsonl").read_text().splitlines()]

    records = run(tmp_path / "whole", 4)
    assert [r["sigma"] for r in records] == pytest.approx([1e-6, 2e-6, 4e-6, 8e-6])
    assert all(r["no_signal"] and r["identical_pairs"] == 1.0 for r in records)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4, resume=True)
    assert [r["sigma"] for r in resumed] == pytest.approx([1e-6, 2e-6, 4e-6, 8e-6])
    noisy = run(tmp_path / "noisy", 3, sigma=0.5)
    assert all(r["no_signal"] and r["identical_pairs"] < 0.5 for r in noisy)
    assert [r["sigma"] for r in noisy] == pytest.approx([0.5, 0.5, 0.5])


def _three_steps(model_dir, out, resume=False, **overrides):
    """A 3-iteration run checkpointed every step (for replay and resume checks)."""
    values = dict(iterations=3, save_steps=1)
    values.update(overrides)
    trainer = ESTrainer(str(model_dir), [target_fraction], train_dataset=tiny_dataset(),
                        args=example_config(str(out), **values), resume=resume)
    trainer.train()
    return trainer


def _replays_exactly(trainer, out) -> None:
    """Replay from step 0 matches every checkpoint; with steps 2 and 3 removed, replay from
    step 1 (state of theta_0 read back from step_000000) rebuilds the trainer's masters."""
    import shutil

    from lowmem_es import checkpoint, journal

    assert journal.replay_journal(out).max_abs_diff == 0.0
    for step in (2, 3):
        shutil.rmtree(checkpoint.step_dir(out, step))
    replayed = journal.replay_journal(out, start="nearest", step=3)
    masters = trainer.es_model.parameters()
    assert replayed.start_step == 1
    assert all(torch.equal(replayed.params[n], masters[n]) for n in masters)


def test_anchor_decay_pulls_toward_the_start_and_replays(tiny_llama_dir, tmp_path):
    """theta -= lr * anchor_decay * (theta - theta_0): on a zero update it is that and
    nothing else; in a run it is journaled, and replay and resume are bit-exact."""

    from lowmem_es import es

    theta = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    start = {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([[3.0]])}
    es.es_update(theta, {"a": 0, "b": 1}, run_seed=0, iteration=0,
                 shaped_fitness=[0.0, 0.0], schedule=[(0, 1), (0, -1)], learning_rate=0.1,
                 anchor_decay=0.5, anchor=start)
    assert torch.allclose(theta["a"], torch.tensor([0.95, 2.1])) and theta["b"].item() == 3.0
    with pytest.raises(ValueError, match="anchor"):
        es.es_update(theta, {"a": 0, "b": 1}, run_seed=0, iteration=0,
                     shaped_fitness=[0.0, 0.0], schedule=[(0, 1), (0, -1)],
                     learning_rate=0.1, anchor_decay=0.5)
    def run(out, resume=False, **overrides):
        return _three_steps(tiny_llama_dir, out, resume, **overrides)

    trainer = run(tmp_path / "anchored", anchor_decay=2.0)
    records = [json.loads(line) for line in
               (tmp_path / "anchored" / "journal.jsonl").read_text().splitlines()]
    assert all(r["anchor_decay"] == 2.0 for r in records)
    assert not all(r.get("no_signal") for r in records)
    _replays_exactly(trainer, tmp_path / "anchored")
    assert not _same_masters(trainer, run(tmp_path / "free"))
    run(tmp_path / "resumed", iterations=2, anchor_decay=2.0)
    assert _same_masters(trainer, run(tmp_path / "resumed", resume=True, anchor_decay=2.0))


def test_relative_noise_scaling_is_journaled_replays_and_resumes(tiny_llama_dir, tmp_path):
    """noise_scaling='relative': A's noise and step scale with A's starting RMS, B (zero at
    the start) keeps sigma; journaled, and replay and resume rebuild the same masters."""
    def run(out, resume=False, **overrides):
        return _three_steps(tiny_llama_dir, out, resume, **{"sigma": 0.2, **overrides})

    trainer = run(tmp_path / "scaled", noise_scaling="relative")
    scales = trainer.es_model.noise_scales()
    start = trainer._start_masters
    for name, value in scales.items():
        expected = 1.0 if name.endswith("lora_B") else float(start[name].pow(2).mean().sqrt())
        assert value == pytest.approx(expected, rel=1e-6)
    assert all(v < 0.5 for n, v in scales.items() if n.endswith("lora_A"))
    records = [json.loads(line) for line in
               (tmp_path / "scaled" / "journal.jsonl").read_text().splitlines()]
    assert all(r["noise_scaling"] == "relative" for r in records)
    assert not all(r.get("no_signal") for r in records)
    _replays_exactly(trainer, tmp_path / "scaled")
    plain = run(tmp_path / "plain")
    assert not _same_masters(trainer, plain)
    assert "noise_scaling" not in (tmp_path / "plain" / "journal.jsonl").read_text()
    assert set(plain.es_model.noise_scales().values()) == {1.0}
    run(tmp_path / "resumed", iterations=2, noise_scaling="relative")
    assert _same_masters(trainer, run(tmp_path / "resumed", resume=True,
                                      noise_scaling="relative"))
