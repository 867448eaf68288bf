"""Text data for the language families: files a user has, and a built-in task.

Files (``read_records``), by suffix:

* ``.tsv`` — GLUE style: a header row, then one example per row. The text is
  the column ``sentence`` (or ``text``, ``question``), a pair is
  ``sentence1``/``sentence2`` (or ``question1``/``question2``,
  ``question``/``sentence``, ``premise``/``hypothesis``), the label ``label``
  (optional).
* ``.jsonl`` — one JSON object per line with the same keys (``text`` /
  ``text_pair`` too).
* ``.txt`` — one text per line and no labels: label-free distillation from the
  teacher's decisions.

Records become a :class:`~coformer.calibration.data.Dataset` whose ``x`` is the
packed token tensor the sub-models take (see :mod:`coformer.compiler.families.textnet`),
tokenised by the same :class:`~coformer.runtime.text.TextEncoder` the device
runs, so what was calibrated is what is served. The split is fixed
(stratified when labelled, seed 0): 70% train, 10% validation, 20% test.

The built-in task (``sentiment_records``) needs no file and no download: short
reviews generated from word lists, labelled positive or negative, where a
``not`` before the adjective flips the label, so word order matters.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from coformer.calibration.data import Dataset, Split
from coformer.runtime.errors import CoFormerError

SINGLE_KEYS = ("sentence", "text", "question")
PAIR_KEYS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
             ("premise", "hypothesis"), ("text", "text_pair"))


def _pick(row: dict[str, Any], where: str) -> tuple[Any, ...]:
    for a, b in PAIR_KEYS:
        if row.get(a) is not None and row.get(b) is not None:
            return (str(row[a]), str(row[b]))
    for k in SINGLE_KEYS:
        if row.get(k) is not None:
            return (str(row[k]),)
    raise CoFormerError(f"{where}: no text column; expected one of {list(SINGLE_KEYS)} or a pair "
                        f"{[list(p) for p in PAIR_KEYS]}, found {sorted(row)}")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read a .tsv, .jsonl or .txt file into records ``{"text": (str,) or (str, str), "label": str or None}``."""
    path = Path(path)
    if not path.is_file():
        raise CoFormerError(f"text data {path} does not exist")
    suffix = path.suffix.lower()
    records: list[dict[str, Any]] = []
    if suffix == ".txt":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append({"text": (line.strip(),), "label": None})
    elif suffix == ".tsv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for n, row in enumerate(reader, 2):
                records.append({"text": _pick(row, f"{path} line {n}"), "label": row.get("label")})
    elif suffix in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CoFormerError(f"{path} line {n} is not JSON: {e}") from None
            if not isinstance(row, dict):
                raise CoFormerError(f"{path} line {n} is not a JSON object")
            label = row.get("label")
            records.append({"text": _pick(row, f"{path} line {n}"), "label": None if label is None else str(label)})
    else:
        raise CoFormerError(f"text data {path}: suffix {suffix!r} is not one of .tsv, .jsonl, .txt")
    if not records:
        raise CoFormerError(f"text data {path} holds no examples")
    arity = {len(r["text"]) for r in records}
    if len(arity) != 1:
        raise CoFormerError(f"text data {path} mixes single texts and pairs")
    labelled = {r["label"] is not None and r["label"] != "" for r in records}
    if len(labelled) != 1:
        raise CoFormerError(f"text data {path}: some examples have a label and some do not")
    return records


def _label_order(names: set[str]) -> list[str]:
    try:
        return [str(v) for v in sorted(int(n) for n in names)]
    except ValueError:
        return sorted(names)


def text_dataset(records: Sequence[dict[str, Any]], encoder, labels: Optional[Sequence[str]] = None,
                 seed: int = 0) -> Dataset:
    """Tokenise ``records`` with ``encoder`` (a :class:`~coformer.runtime.text.TextEncoder`) and split them.

    ``labels`` fixes the label order (e.g. the checkpoint's ``id2label``);
    by default labels are sorted (numerically when they are numbers).
    """
    from sklearn.model_selection import train_test_split

    pair = len(records[0]["text"]) == 2
    if pair != bool(encoder.spec["pair"]):
        raise CoFormerError(f"the data holds {'pairs' if pair else 'single texts'}, the encoder was set up for "
                            f"{'pairs' if encoder.spec['pair'] else 'single texts'}")
    has_y = records[0]["label"] is not None
    texts = [r["text"][0] if not pair else list(r["text"]) for r in records]
    x = torch.as_tensor(encoder.encode(texts))
    y = None
    if has_y:
        names = list(labels) if labels is not None else _label_order({r["label"] for r in records})
        unknown = sorted({r["label"] for r in records} - set(names))
        if unknown:
            raise CoFormerError(f"labels {unknown[:5]} are not among the model's labels {names}")
        y = torch.as_tensor([names.index(r["label"]) for r in records])
    else:
        names = list(labels or [])
    idx = np.arange(len(records))
    strat = y.numpy() if y is not None and np.bincount(y.numpy()).min() >= 4 else None
    if len(idx) < 10:
        raise CoFormerError(f"{len(idx)} examples are too few to split into train, validation and test (need 10)")
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=strat)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed,
                                  stratify=None if strat is None else strat[rest])
    raw = np.empty(len(texts), dtype=object)
    raw[:] = [t if isinstance(t, str) else tuple(t) for t in texts]

    def split(ix: np.ndarray) -> Split:
        return Split(x[ix], None if y is None else y[ix], raw[ix])

    return Dataset(split(train), split(val), split(test), names, dict(encoder.spec))


# -- the built-in task ----------------------------------------------------------------------------
_SUBJECTS = ["the movie", "the food", "this phone", "the hotel", "the service", "our trip", "the book", "the game",
             "the concert", "this laptop", "the coffee", "the staff", "the show", "the car", "the room", "the app"]
_GOOD = ["great", "good", "excellent", "wonderful", "lovely", "amazing", "fantastic", "pleasant", "superb", "nice"]
_BAD = ["bad", "awful", "terrible", "boring", "poor", "horrible", "dreadful", "dull", "disappointing", "sad"]
_ADVERBS = ["", "really", "very", "quite", "truly", "rather", "so"]
_VERBS = ["was", "is", "felt", "seemed", "looked"]
_TAILS = ["", "overall", "today", "this time", "in the end", "for us", "as usual"]
_FILLERS = ["honestly", "well", "i think", "to be fair", "sadly", "luckily", "frankly"]
SENTIMENT_LABELS = ["negative", "positive"]


def sentiment_records(n: int = 1600, seed: int = 0) -> list[dict[str, Any]]:
    """Synthetic reviews: ``[filler] subject verb [not] [adverb] adjective [tail]``; the label is the
    adjective's polarity, flipped by ``not``. Balanced, deterministic under ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = i % 2 == 0
        negated = rng.random() < 0.35
        adj = rng.choice(_GOOD if positive != negated else _BAD)
        words = [rng.choice(_FILLERS)] if rng.random() < 0.3 else []
        words += [rng.choice(_SUBJECTS), rng.choice(_VERBS)] + (["not"] if negated else [])
        words += [rng.choice(_ADVERBS), adj, rng.choice(_TAILS)]
        out.append({"text": (" ".join(w for w in words if w),), "label": SENTIMENT_LABELS[int(positive)]})
    return out


def sentiment_vocabulary() -> list[str]:
    words: set[str] = set()
    for group in (_SUBJECTS, _GOOD, _BAD, _ADVERBS, _VERBS, _TAILS, _FILLERS, ["not"]):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


def build_word_tokenizer(path: Path, words: Sequence[str]) -> Path:
    """A word-level ``tokenizer.json`` (lower-case, whitespace split, BERT-style specials
    ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3``), built offline with the ``tokenizers`` package."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    from coformer.runtime.files import atomic_write_bytes

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    atomic_write_bytes(Path(path), tok.to_str().encode())
    return Path(path)
