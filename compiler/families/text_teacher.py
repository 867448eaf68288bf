"""A HF language model as CoFormer's teacher (:class:`TextTeacher`), and the adapter
methods every language family shares (:class:`TextAdapter`)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from coformer.compiler.families.base import registered
from coformer.compiler.families.text_slicing import magnitude, slice_net, sliced_head
from coformer.compiler.families.textnet import FIELDS, PartsModule, TextNet, last_linear, load_state, read_shape
from coformer.compiler.importance import Importance
from coformer.compiler.specs import SubModelSpec, TransformerShape
from coformer.runtime.errors import CoFormerError


class TextTeacher(nn.Module):
    """A HF language model as CoFormer's teacher: packed tokens -> logits.

    Args:
        hf: the HF model (``BertModel``/``Bert*ForSequenceClassification``,
            ``GPT2Model``/``GPT2ForSequenceClassification``/``GPT2LMHeadModel``,
            ``T5EncoderModel``/``T5ForConditionalGeneration``).
        family: ``bert``, ``gpt2`` or ``t5``.
        head: the task head on the pooled feature; for a checkpoint without one
            (a plain encoder) a fresh linear head, fitted by :func:`fit_head`.
        pool: how the feature is pooled (see :data:`POOLS`).
        head_fitted: whether ``head`` came trained with the checkpoint.
        source: where the checkpoint was read from (recorded in the bundle).
        normalize: whether the checkpoint's own pipeline L2-normalises the pooled
            feature (a sentence-transformers ``Normalize`` module): an embedding
            bundle then returns unit vectors.
    """

    def __init__(self, hf: nn.Module, family: str, head: nn.Module, pool: str, head_fitted: bool,
                 source: str = "", normalize: bool = False) -> None:
        super().__init__()
        self.hf, self.family, self.head, self.pool_kind = hf, family, head, pool
        self.head_fitted, self.source, self.normalize = head_fitted, source, normalize
        self.fields = FIELDS[family]

    @property
    def num_labels(self) -> int:
        return int(last_linear(self.head).out_features)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return registered(self.family).teacher_features(self, tokens)  # the adapter that built this teacher

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))



class TextAdapter:
    """The adapter methods every language family shares; a family supplies
    ``name``, ``matches_hf``, ``full_net`` (TextNet config and weights from the
    HF model) and ``teacher_features`` (the HF model's own pooled feature)."""

    name = ""
    prism_hooks = None  # PRISM's hooks for this family (coformer.compiler.families.prism_hooks), where served

    def matches(self, model: Any) -> bool:
        return isinstance(model, TextTeacher) and model.family == self.name

    def input_names(self, model: TextTeacher) -> list[str]:
        return list(FIELDS[self.name])

    def export_module(self, sub: TextNet) -> nn.Module:
        return PartsModule(sub)

    def input_shape(self, model: TextTeacher) -> tuple[int, ...]:
        return (len(FIELDS[self.name]), int(model.max_length))

    def full_net(self, model: TextTeacher) -> TextNet:
        """The teacher as a TextNet (what every sub-model is sliced from). Converted once and
        reused while the teacher's weights are unchanged (in-place updates bump their versions)."""
        version = sum(p._version for p in model.hf.parameters())
        cached = getattr(model, "_coformer_full_net", None)
        if cached is None or cached[0] != version:
            cached = (version, load_state(TextNet(self.net_config(model)), self.net_weights(model)))
            object.__setattr__(model, "_coformer_full_net", cached)  # not a submodule: no double parameters
        return cached[1]

    def read_shape(self, model: TextTeacher) -> TransformerShape:
        return read_shape(self.full_net(model), model.num_labels, int(getattr(model, "max_length", 128)))

    def slice(self, model: TextTeacher, spec: SubModelSpec) -> TextNet:
        spec.validate(self.read_shape(model))
        return slice_net(self.full_net(model), spec)

    def teacher_head(self, model: TextTeacher) -> nn.Module:
        return model.head

    def feature_index(self, model: TextTeacher, spec: SubModelSpec) -> list[int]:
        return list(spec.channels)

    def submodel_head(self, model: TextTeacher, spec: SubModelSpec) -> nn.Module:
        return sliced_head(model.head, self.feature_index(model, spec))

    def importance(self, model: TextTeacher, batches: Iterable[torch.Tensor], method: Any = "magnitude") -> Importance:
        if callable(method):
            return method(model, batches).check(self.read_shape(model))
        if method != "magnitude":
            raise CoFormerError(f"importance method {method!r} is not available for {self.name}; use 'magnitude'")
        return magnitude(self.full_net(model).eval(), batches).check(self.read_shape(model))

