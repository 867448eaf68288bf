"""Text in, token ids out, without torch or transformers: the device side of the
language families.

A text bundle's ``input.preprocessing`` record (``kind: "text"``) says how raw
text becomes the model input, and the bundle carries the checkpoint's
``tokenizer.json``; :class:`TextEncoder` tokenises with the lightweight
``tokenizers`` package. The model input is one int64 tensor ``[B, k, T]``
packing, per sample, the rows named in ``fields`` (``input_ids``,
``attention_mask`` and, for BERT, ``token_type_ids``), right-padded to the
batch's longest sequence; ``T`` may be anything from 1 to ``max_length``.

:func:`check_tokens` is what every receiver (central node, worker) runs on
such a tensor before an engine sees it: ids inside the vocabulary, a 0/1 mask
that keeps at least the first token and is right-padded, type ids in range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from coformer.runtime.errors import CoFormerError, missing_package
from coformer.runtime.protocol import ProtocolError

TEXT_KEYS = ("tokenizer", "fields", "max_length", "pair", "truncation", "pad_id", "vocab_size", "type_vocab_size")
TextInput = Union[str, Sequence[str]]


def text_spec(d: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a text preprocessing record; raise naming the missing or bad field."""
    if d.get("kind") != "text":
        raise CoFormerError(f"preprocessing kind {d.get('kind')!r} is not 'text'")
    missing = [k for k in TEXT_KEYS if k not in d]
    if missing:
        raise CoFormerError(f"text preprocessing record misses {missing}")
    fields = list(d["fields"])
    if fields[:2] != ["input_ids", "attention_mask"]:
        raise CoFormerError(f"text fields {fields} must start with input_ids, attention_mask")
    if int(d["max_length"]) < 2:
        raise CoFormerError(f"text max_length {d['max_length']} must be >= 2")
    return dict(d)


def model_feeds(engine, x: np.ndarray, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The engine's named inputs for the bundle input ``x``: a packed token tensor is
    split into its rows when the engine takes them by name, anything else goes whole."""
    names = engine.input_names
    if spec.get("kind") == "text" and names == list(spec["fields"]):
        return {n: np.ascontiguousarray(x[:, i]) for i, n in enumerate(names)}
    return {names[0]: x}


def check_tokens(x: np.ndarray, spec: Mapping[str, Any]) -> None:
    """Refuse a packed token tensor a model must not see, with a :class:`ProtocolError` naming the fault."""
    ids, mask = x[:, 0], x[:, 1]
    V = int(spec["vocab_size"])
    bad = np.argwhere((ids < 0) | (ids >= V))
    if len(bad):
        b, t = (int(v) for v in bad[0])
        raise ProtocolError("bad_ids", f"token id {int(ids[b, t])} at sample {b}, position {t} is outside the "
                                       f"vocabulary 0..{V - 1}")
    if not np.isin(mask, (0, 1)).all():
        raise ProtocolError("bad_mask", "attention_mask must hold only 0 and 1")
    if (mask[:, 0] != 1).any():
        b = int(np.argmax(mask[:, 0] != 1))
        raise ProtocolError("empty_text", f"sample {b} has no tokens (its attention_mask starts with 0)")
    if (np.diff(mask, axis=1) > 0).any():
        b = int(np.argwhere(np.diff(mask, axis=1) > 0)[0][0])
        raise ProtocolError("bad_mask", f"sample {b}: attention_mask must be right-padded (1s, then 0s)")
    if "token_type_ids" in spec["fields"]:
        types = x[:, list(spec["fields"]).index("token_type_ids")]
        if ((types < 0) | (types >= int(spec["type_vocab_size"]))).any():
            raise ProtocolError("bad_ids", f"token_type_ids must be in 0..{int(spec['type_vocab_size']) - 1}")


class TextEncoder:
    """Tokenise text (or sentence pairs) the way the bundle was compiled.

    Args:
        tokenizer: path of a ``tokenizer.json``.
        spec: the bundle's text preprocessing record.
    """

    def __init__(self, tokenizer: Path, spec: Mapping[str, Any]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise missing_package("tokenizers", "text", "text input") from None
        self.spec = text_spec(spec)
        path = Path(tokenizer)
        if not path.is_file():
            raise CoFormerError(f"tokenizer {path} does not exist")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own exception types
            raise CoFormerError(f"tokenizer {path} cannot be read: {e}") from None
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if self.spec["truncation"]:
            self.tokenizer.enable_truncation(int(self.spec["max_length"]))

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest=None) -> "TextEncoder":
        from coformer.runtime.manifest import load_manifest

        manifest = manifest or load_manifest(bundle_dir, verify=False)
        pre = manifest.input.preprocessing
        if pre.get("kind") != "text":
            raise CoFormerError(f"bundle {bundle_dir} does not take text (its input is {pre.get('kind')!r})")
        return cls(Path(bundle_dir) / pre["tokenizer"], pre)

    @property
    def fields(self) -> list[str]:
        return list(self.spec["fields"])

    def _one(self, i: int, item: TextInput):
        pair = bool(self.spec["pair"])
        parts = [item] if isinstance(item, str) else list(item)
        if len(parts) != (2 if pair else 1) or not all(isinstance(p, str) for p in parts):
            want = "a pair of texts [first, second]" if pair else "one text (a string)"
            raise CoFormerError(f"input {i} is {item!r}: this bundle takes {want}")
        for p in parts:
            if not p.strip():
                raise CoFormerError(f"input {i} is empty; give some text")
        enc = self.tokenizer.encode(*parts)
        if len(enc.ids) > int(self.spec["max_length"]):
            raise CoFormerError(f"input {i} has {len(enc.ids)} tokens, the bundle's limit is "
                                f"{self.spec['max_length']} (compile with truncation to cut longer texts)")
        if not enc.ids:
            raise CoFormerError(f"input {i} has no tokens")
        return enc

    def encode(self, texts: Sequence[TextInput], length: int = 0) -> np.ndarray:
        """``texts`` (strings, or ``[first, second]`` pairs) -> int64 ``[B, k, T]``, right-padded to
        the longest (or to ``length``, when given and not shorter)."""
        if isinstance(texts, str) or not len(texts):
            raise CoFormerError("give a list of texts (at least one)")
        encs = [self._one(i, t) for i, t in enumerate(texts)]
        T = max(length, max(len(e.ids) for e in encs))
        out = np.zeros((len(encs), len(self.fields), T), dtype=np.int64)
        out[:, 0] = int(self.spec["pad_id"])
        for b, e in enumerate(encs):
            n = len(e.ids)
            out[b, 0, :n] = e.ids
            out[b, 1, :n] = 1
            if "token_type_ids" in self.fields:
                out[b, 2, :n] = e.type_ids
        check_tokens(out, self.spec)
        return out
