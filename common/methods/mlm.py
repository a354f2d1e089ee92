"""A masked-language head beside a fine-tuning method, for domain-adaptive pretraining
(``[[schedule]]`` stages that train ``mlm``; ``MethodConfig.mlm``; Gururangan et al. 2020).

The packaged base (a sentence-transformers MiniLM) ships no masked-language head, so the head is
new: BERT's transform (a dense layer, GELU, LayerNorm) whose output is scored against the base's
own word embeddings (tied, frozen). It has no bias over the vocabulary: a bias's update would be
each site's token frequencies, nearly as they are. The head is shared like the method's
parameters and trains only in mlm stages; its 148 K parameters stay in the state, unchanged,
after them (client/trainer.py ``MaskedLm`` trains it).
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.common.methods.compose import MLM_HEAD


class MlmHead(torch.nn.Module):
    """BERT's masked-language transform: dense, GELU, LayerNorm (the vocabulary scores are the
    transformed states times the word embeddings: :func:`vocabulary_logits`)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden, eps=eps)
        torch.nn.init.normal_(self.dense.weight, std=0.02)  # BERT's initializer range
        torch.nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.nn.functional.gelu(self.dense(hidden)))


def attach(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a method-wrapped base) with a new :class:`MlmHead` as ``mlm_head``, trainable."""
    config: Any = model.config
    head = MlmHead(config.hidden_size, getattr(config, "layer_norm_eps", 1e-12))
    device = next(model.parameters()).device
    model.add_module(MLM_HEAD.rstrip("."), head.to(device))
    return model


def vocabulary_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Scores over the vocabulary of the final hidden states ``hidden`` (n, hidden size): the
    head's transform times the base's word embeddings (an int8 base's, dequantized)."""
    embeddings: Any = model.get_input_embeddings()  # type: ignore[operator]
    table = embeddings.weight
    scale = getattr(embeddings, "scale", None)  # common/quantize.py Int8Embedding
    if scale is not None:
        table = table.float() * scale[:, None]
    head: Any = model.mlm_head
    transformed = head(hidden)
    return transformed @ table.to(transformed.dtype).T
