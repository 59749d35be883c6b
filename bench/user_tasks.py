"""User-style JSONL tasks nobody tuned a default on, and the rewards a user would write.

    python bench/user_tasks.py --out /tmp/user_tasks     # writes <task>-{train,eval}.jsonl

* ``yesno``: "Is a <word> an animal? Answer yes or no." Balanced: half the words are
  animals. The best constant answer scores 0.5, so learning has to beat that.
* ``sentiment``: "Is the word '<word>' positive? Answer yes or no." Balanced, like
  ``yesno``; unlike it, SmolLM2-135M's first token already leans the right way a little
  (bench/RESULTS.md 2026-12-08: yes-vs-no margin AUC 0.69 here, 0.33 for ``yesno``), so a
  learner can find the answer the model half knows instead of building a new feature.
* ``antonym``: "What is the opposite of <word>? Answer with one word." A short free-text
  answer; no constant answer scores above a few percent.

Train and eval rows come from disjoint words (and, for antonyms, disjoint pairs, so the
reverse of an eval pair is never trained on). Rows are conversational prompts (one
user message, so the chat template applies, as TRL does for an instruct model) with an
``answer`` column, as a user's file would be; ``first_word`` is the ``module:function``
reward (``--reward user_tasks:first_word`` with bench/ on the path), a user's usual
normalised exact match on the first word of the completion.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

ANIMALS = (
    "dog cat horse cow pig sheep goat lion tiger bear wolf fox rabbit mouse rat deer "
    "elephant giraffe zebra monkey camel donkey duck chicken eagle owl parrot penguin "
    "shark whale dolphin frog snake turtle lizard crocodile bee ant spider butterfly "
    "squirrel kangaroo koala panda hippo rhino cheetah leopard moose otter seal crab "
    "goose swan pigeon crow bat beaver hamster salmon").split()
THINGS = (
    "chair table spoon fork knife cup plate bottle pencil book phone lamp door window "
    "car bicycle truck train boat hammer shoe sock hat shirt coat bed pillow blanket "
    "clock mirror key wallet bag box brick rock stone cloud river mountain tree flower "
    "apple banana bread cheese candle brush comb ladder rope wheel coin ring piano "
    "guitar drum kettle sofa carpet fence tent").split()
ANTONYMS = (
    "hot cold, big small, up down, fast slow, happy sad, light dark, open closed, "
    "early late, full empty, hard soft, high low, long short, old new, rich poor, "
    "strong weak, thick thin, wet dry, good bad, loud quiet, clean dirty, "
    "push pull, win lose, buy sell, first last, inside outside, left right, day night, "
    "black white, true false, yes no, in out, on off, give take, love hate, "
    "cheap expensive, wide narrow, deep shallow, sweet sour, near far, "
    "north south, east west, before after, above below, front back, top bottom, "
    "start finish, alive dead, asleep awake, brave afraid, safe dangerous, easy difficult, "
    "friend enemy, question answer, remember forget, always never, laugh cry, "
    "arrive leave, accept refuse, increase decrease, maximum minimum, wild tame, "
    "smooth rough, sharp dull, tight loose, polite rude, calm angry, simple complex, "
    "correct wrong, present absent, public private").split(", ")

POSITIVE = (
    "happy good great kind love nice joy beautiful wonderful brave calm friendly honest "
    "smart bright warm gentle lucky proud strong cheerful delightful excellent fantastic "
    "generous glad grateful healthy helpful hopeful joyful lovely loyal peaceful pleasant "
    "polite safe sweet thankful wise clean fresh fun funny free rich calm clever careful "
    "charming confident creative eager fair fine gorgeous graceful handsome jolly keen "
    "lively marvelous merry neat perfect pretty proud relaxed successful superb terrific "
    "tidy true useful victorious vivid welcome").split()
NEGATIVE = (
    "sad bad terrible cruel hate ugly awful angry scared lazy rude mean dirty weak poor "
    "sick lonely boring stupid evil annoying anxious ashamed bitter broken careless "
    "clumsy cold cowardly crazy creepy dangerous dead depressed disgusting dull foolish "
    "gloomy greedy grumpy guilty harmful harsh horrible hostile hurt jealous miserable "
    "nasty naughty nervous painful pathetic rotten selfish shameful silly smelly sorry "
    "sour stressful tired toxic tragic unfair unhappy unlucky upset useless vicious "
    "wicked worried worthless wrong").split()

TASKS = ("yesno", "sentiment", "antonym")


def _split(items: list, seed: int, eval_share: float = 0.3) -> tuple[list, list]:
    items = sorted(set(items))
    random.Random(seed).shuffle(items)
    cut = int(len(items) * eval_share)
    return items[cut:], items[:cut]


def task_rows(name: str, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """{"train": rows, "eval": rows} of task ``name``; ``seed`` picks the word split."""
    if name == "yesno":
        rows: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
        for words, answer in ((ANIMALS, "yes"), (THINGS, "no")):
            train, held = _split(list(words), seed)
            for split, chosen in (("train", train), ("eval", held)):
                rows[split] += [_row(f"Is {_article(w)} {w} an animal? Answer yes or no.",
                                     answer) for w in chosen]
        for split in rows:
            random.Random(f"{seed}-{split}").shuffle(rows[split])
        return rows
    if name == "sentiment":
        rows = {"train": [], "eval": []}
        for words, answer in ((POSITIVE, "yes"), (NEGATIVE, "no")):
            train, held = _split(list(words), seed)
            for split, chosen in (("train", train), ("eval", held)):
                rows[split] += [_row(f"Is the word '{w}' positive? Answer yes or no.", answer)
                                for w in chosen]
        for split in rows:
            random.Random(f"{seed}-{split}").shuffle(rows[split])
        return rows
    if name == "antonym":
        pairs = [tuple(p.split()) for p in ANTONYMS]
        train, held = _split(pairs, seed)
        out = {}
        for split, chosen in (("train", train), ("eval", held)):
            rows_ = [_row(f"What is the opposite of {a}? Answer with one word.", b)
                     for x, y in chosen for a, b in ((x, y), (y, x))]
            random.Random(f"{seed}-{split}").shuffle(rows_)
            out[split] = rows_
        return out
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def _row(question: str, answer: str) -> dict[str, Any]:
    """A conversational row, as TRL users write them for an instruct model."""
    return {"prompt": [{"role": "user", "content": question}], "answer": answer}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_WORD = re.compile(r"[a-z]+")


def first_words(text: str) -> list[str]:
    """The words of ``text``, lower-cased, letters only."""
    return _WORD.findall(text.lower())


def first_word(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion's first word (lower-cased, letters only) is the answer."""
    rewards = []
    for completion, wanted in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        found = first_words(text)
        rewards.append(float(bool(found) and found[0] == str(wanted).lower()))
    return rewards


def answer_credit(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 when the first word is the answer, 0.5 when the answer is one of the first ten
    words: the partial credit a user gives for "right answer, wrong format", which a
    0/1 first-word match withholds from a model that answers "The opposite of hot is
    cold"."""
    rewards = []
    for completion, wanted in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        found, target = first_words(text), str(wanted).lower()
        rewards.append(1.0 if found[:1] == [target] else 0.5 if target in found[:10] else 0.0)
    return rewards


def best_constant(rows: list[dict[str, str]]) -> tuple[str, float]:
    """The most frequent answer and the accuracy of always giving it."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["answer"]] = counts.get(row["answer"], 0) + 1
    answer = max(sorted(counts), key=counts.__getitem__)
    return answer, counts[answer] / len(rows)


def write(out: Path, seed: int = 0) -> list[Path]:
    """Write every task's train and eval JSONL files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TASKS:
        for split, rows in task_rows(name, seed).items():
            path = out / f"{name}-{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write(Path(args.out), args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
