"""A family's PRISM hooks: what PRISM (issue 23) needs of a teacher, one subclass per family
it serves, made by that family's adapter (``adapter.prism_hooks(teacher)``), so a family's
knowledge lives in its adapter's module and nothing branches on a family's name.

:mod:`coformer.compiler.prism` holds the arithmetic (Segment Means, the restructured attention,
each family's partitioned forward, the reference); the bundle (:mod:`coformer.compiler.prism_bundle`)
and the fine-tuning (:mod:`coformer.compiler.prism_finetune`) read a teacher only through these
hooks. A family without hooks (Swin, T5) is refused by name, listing those that have them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class PrismHooks:
    """A teacher seen by PRISM. Set by a subclass's ``__init__``, which refuses a teacher of
    its family that PRISM cannot serve (its pooling, a second head) by name:

    * ``teacher``, ``name`` (the family), ``blocks`` (its transformer layers, in order);
    * ``qkv(block, x) -> (q, k, v)`` and ``finish(block, x, o) -> x`` around the attention,
      and ``scales`` (each layer's attention scale);
    * ``pool``: ``"token"`` (the head reads position 0, on the first device) or ``"sum"``
      (each device sends its share's sum); ``prefix``: positions before the content;
    * ``causal`` (GPT-2's partition-aware causal mask), ``last_token`` (pooled by the last
      real token, which moves with the text's length);
    * ``input_names``, ``embed_dim``, ``heads``, ``head_dim``; ``text``: the input is token
      fields ``[B, fields, T]``, padded to :meth:`tokens`.
    """

    name = ""
    text = True
    causal = False
    last_token = False
    prefix = 0
    teacher: Any
    blocks: list
    qkv: Callable
    finish: Callable
    scales: list[float]
    pool: str
    input_names: list[str]
    embed_dim: int
    heads: int
    head_dim: int

    def embed(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input -> every position's first hidden state ``[B, T, d]`` and real-token mask ``[B, T]``."""
        raise NotImplementedError

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """The last hidden states -> what pooling reads (a final norm, where the family has one)."""
        return h

    def head_of_token(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the first device's final hidden states (class-token pooling)."""
        raise NotImplementedError

    def head_of_mean(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from the pooled sum over every device's share (mean or last-token pooling)."""
        return self.teacher.head(pooled)

    def tokens(self) -> int:
        """Positions a request holds: fixed at compile time (text is padded to ``max_length``)."""
        return int(self.teacher.max_length)

    def logits(self, x: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
        """The PyTorch PRISM forward's logits, differentiable (the fine-tuning trains it)."""
        raise NotImplementedError

    @torch.no_grad()
    def reference(self, x: torch.Tensor, shares: Sequence[int], cr: int) -> torch.Tensor:
        """:meth:`logits` without gradients: what a served PRISM bundle must answer."""
        return self.logits(x, shares, cr)
