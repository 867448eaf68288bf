"""Language teachers from local HuggingFace checkpoints (``--model hf:PATH``).

A checkpoint directory holds ``config.json``, the weights and the tokenizer
(``tokenizer.json``; a checkpoint with only a slow tokenizer is converted once
with transformers). The family is read from the config's ``architectures``
(or ``model_type``), the weights are loaded with ``local_files_only=True``: no
download is ever tried. An unsupported architecture is refused with the list
of supported ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from coformer.compiler.families import hf_adapter_for, supported_architectures
from coformer.compiler.families.text_teacher import TextTeacher
from coformer.runtime.files import read_json
from coformer.runtime.errors import CoFormerError

# model_type -> the class used when config.json names no architecture
_BY_MODEL_TYPE = {"bert": "BertModel", "gpt2": "GPT2Model", "t5": "T5EncoderModel"}


def wrap_hf(hf: nn.Module, source: str = "", max_length: int = 128, tokenizer: Optional[Path] = None,
            pool: Optional[str] = None, normalize: bool = False) -> TextTeacher:
    """A HF model (already built) as a :class:`TextTeacher`; ``tokenizer`` is its ``tokenizer.json``."""
    adapter = hf_adapter_for(hf)
    head = adapter.task_head(hf)
    fitted = head is not None
    if head is None:
        # resized to the data's labels by fit_head; zeros until then, not a random draw, so the
        # teacher's weights digest (the manifest's, the bench's cache key) is the same every load
        head = nn.Linear(_hidden_size(hf), 2)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    teacher = TextTeacher(hf.eval(), adapter.name, head, pool or adapter.default_pool(hf), fitted, source,
                          normalize=normalize)
    limit = _max_positions(hf)
    if limit and max_length > limit:
        raise CoFormerError(f"max_length {max_length} exceeds the model's {limit} positions")
    teacher.max_length = int(max_length)
    teacher.tokenizer_file = None if tokenizer is None else Path(tokenizer)
    return teacher.eval()


def _hidden_size(hf: nn.Module) -> int:
    c = hf.config
    return int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or c.d_model)


def _max_positions(hf: nn.Module) -> int:
    c = hf.config
    return int(getattr(c, "max_position_embeddings", 0) or getattr(c, "n_positions", 0) or 0)


ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
              "pooling_mode_lasttoken": "last"}


def sentence_transformers_layout(path: Path) -> Optional[dict[str, Any]]:
    """A sentence-transformers folder's pipeline (``modules.json``): where the transformer's
    weights are, its pooling (``1_Pooling/config.json``: mean, CLS, max or last token), whether a
    ``Normalize`` module follows, and ``max_seq_length``. None for a plain checkpoint folder;
    modules CoFormer cannot reproduce (a ``Dense`` projection, weighted or sqrt-length
    pooling) are refused by name."""
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    entries = read_json(modules, "")
    if not isinstance(entries, list):
        raise CoFormerError(f"{modules} must list the pipeline's modules")
    out: dict[str, Any] = {"transformer": path, "pool": None, "normalize": False, "max_seq_length": None}
    for m in sorted(entries, key=lambda e: int(e.get("idx", 0))):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        where = path / str(m.get("path", ""))
        if kind == "Transformer":
            out["transformer"] = where
            cfg = where / "sentence_bert_config.json"
            if cfg.is_file():
                out["max_seq_length"] = read_json(cfg, "").get("max_seq_length")
        elif kind == "Pooling":
            cfg = read_json(where / "config.json", f"{where} has no config.json for its pooling")
            modes = [ST_POOLING.get(k, k) for k, on in cfg.items() if k.startswith("pooling_mode") and on]
            if len(modes) != 1 or modes[0] not in ST_POOLING.values():
                raise CoFormerError(f"{where}: pooling {modes} is not one CoFormer reproduces (one of "
                                    f"{sorted(ST_POOLING.values())})")
            out["pool"] = modes[0]
        elif kind == "Normalize":
            out["normalize"] = True
        else:
            raise CoFormerError(f"{path}: sentence-transformers module {kind!r} ({m.get('path')}) is not supported "
                                "(Transformer, Pooling and Normalize are)")
    return out


def load_hf(path: Path, max_length: int = 128) -> TextTeacher:
    """Load the checkpoint directory ``path`` as a teacher (see the module doc). A
    sentence-transformers folder (``modules.json``) gives the pooling and normalisation of its
    own pipeline, so the teacher's feature is the embedding that library computes."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # CoFormer shows its own progress
    path = Path(path)
    st = sentence_transformers_layout(path)
    if st is not None:
        teacher = _load_plain(st["transformer"], min(max_length, st["max_seq_length"] or max_length))
        if st["pool"]:
            teacher.pool_kind = st["pool"]
        teacher.normalize = st["normalize"]
        teacher.source = f"hf:{path}"
        teacher.sentence_transformers = True
        return teacher
    return _load_plain(path, max_length)


def _load_plain(path: Path, max_length: int) -> TextTeacher:
    import transformers

    cfg = read_json(path / "config.json", f"hf:{path} is not a HuggingFace checkpoint directory: no config.json in it")
    arch = (cfg.get("architectures") or [_BY_MODEL_TYPE.get(cfg.get("model_type", ""), "")])[0]
    supported = supported_architectures()
    if arch not in supported:
        raise CoFormerError(f"hf:{path}: architecture {arch or cfg.get('model_type')!r} is not supported; "
                            f"supported: {supported}")
    cls = getattr(transformers, arch)
    try:
        hf = cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CoFormerError(f"hf:{path}: transformers cannot load the checkpoint: {str(e)[:400]}") from None
    return wrap_hf(hf, f"hf:{path}", max_length=min(max_length, _max_positions(hf) or max_length),
                   tokenizer=_tokenizer_json(path))


def _tokenizer_json(path: Path) -> Path:
    tok = path / "tokenizer.json"
    if tok.is_file():
        return tok
    try:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        out = Path(tempfile.mkdtemp(prefix="coformer-tok-")) / "tokenizer.json"
        fast.backend_tokenizer.save(str(out))
        return out
    except Exception as e:  # transformers raises many kinds here
        raise CoFormerError(f"hf:{path} has no tokenizer.json and its tokenizer cannot be converted: "
                            f"{str(e)[:300]}") from None


def text_spec_for(teacher: TextTeacher, pair: bool, truncation: bool = False,
                  tokenizer_name: str = "tokenizer.json") -> dict[str, Any]:
    """The bundle's text preprocessing record for ``teacher``."""
    c = teacher.hf.config
    pad = getattr(c, "pad_token_id", None)
    if pad is None:
        pad = getattr(c, "eos_token_id", None)
    if pad is None:
        pad = 0
    return {
        "kind": "text", "tokenizer": tokenizer_name, "fields": list(teacher.fields),
        "max_length": int(teacher.max_length), "pair": bool(pair), "truncation": bool(truncation),
        "pad_id": int(pad), "vocab_size": int(c.vocab_size),
        "type_vocab_size": int(getattr(c, "type_vocab_size", 0) or 0),
        "source": teacher.source,
    }


def encoder_for(teacher: TextTeacher, pair: bool, truncation: bool = False):
    """The :class:`~coformer.runtime.text.TextEncoder` the bundle will carry, for tokenising data."""
    from coformer.runtime.text import TextEncoder

    if getattr(teacher, "tokenizer_file", None) is None:
        raise CoFormerError("this teacher has no tokenizer.json; give one (a HF checkpoint directory carries it)")
    return TextEncoder(teacher.tokenizer_file, text_spec_for(teacher, pair, truncation))


def fit_head(teacher: TextTeacher, data, epochs: int = 200, progress: bool = False) -> dict[str, Any]:
    """Give a plain encoder a task head: a linear layer on its pooled feature, fitted on the
    training labels with the backbone frozen (a linear probe). A checkpoint that came with a
    head keeps it; its label count must match the data's."""
    from coformer.calibration.train import train_classifier
    from coformer.compiler.inference import run_batched

    n = len(data.labels)
    if teacher.head_fitted:
        if teacher.num_labels != n:
            raise CoFormerError(f"the checkpoint's task head has {teacher.num_labels} labels, the data has {n} "
                                f"({data.labels})")
        return {"head": "checkpoint"}
    if data.train.y is None:
        raise CoFormerError("this checkpoint has no task head and the data has no labels: give labelled data "
                            "so CoFormer can fit one, or compile it as an encoder with --task embedding")
    feats = run_batched(_Features(teacher), data.train.x)
    with torch.random.fork_rng():  # the same head every run: a resumed compile's key must not change
        torch.manual_seed(0)
        head = nn.Linear(feats.shape[1], n)
    train_classifier(head, feats, data.train.y, epochs=epochs, lr=1e-2, batch_size=64, weight_decay=1e-4,
                     label_smoothing=0.0, progress=progress, desc="fit task head")
    teacher.head = head.eval()
    teacher.head_fitted = True
    with torch.no_grad():
        acc = float((head(feats).argmax(-1) == data.train.y).float().mean())
    return {"head": "linear probe", "train_accuracy": acc}


class _Features(nn.Module):
    def __init__(self, teacher: TextTeacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.features(x)
