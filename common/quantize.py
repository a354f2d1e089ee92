"""A quantized frozen base at the site: the base model's weights held in int8, on CPU or CUDA.

A site with little memory sets ``quantize = "int8"`` (site.toml ``[site]``; ``simulate
--site-quantize``). Its copy of the frozen base model then keeps every linear layer's weight and
the word embeddings as int8 with one fp32 scale per output row (symmetric, absmax / 127), a
quarter of their fp32 bytes. Nothing shared changes: the PEFT parameters and the classification
head stay fp32 and trainable, the delta has the run's names and shapes, and the coordinator
cannot tell (nor needs to) which sites quantized. A layer dequantizes its weight for each matmul
(the saving is memory at rest, not compute); gradients flow through it to the input, so LoRA,
adapters, prompts and biases before and inside it train as usual. The method ``full`` trains
the base weights themselves and cannot run on an int8 base.

This is weight-only quantization in plain torch, the same on CPU and CUDA; bitsandbytes' 8/4-bit
(QLoRA's NF4) is not used: it is CUDA-only and not a dependency of fedpeft.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from fedpeft.common.config import QUANTIZE

__all__ = [
    "QUANTIZE",
    "Int8Embedding",
    "Int8Linear",
    "quantize_base",
    "weight_bytes",
]

#: Modules left as they are: the classification head trains and is shared.
KEEP = ("classifier",)


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (rows = output features or tokens) as int8 and one fp32 scale per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(torch.nn.Linear):
    """A frozen :class:`torch.nn.Linear` whose weight is int8 with a scale per output row. A
    subclass, so that peft wraps it as any linear layer (LoRA, IA3 and adapters target it)."""

    scale: torch.Tensor

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)  # not Linear's: it would allocate an fp32 weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _int8_rows(linear.weight)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias  # fp32; BitFit trains it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, self.bias)


class Int8Embedding(torch.nn.Embedding):
    """A frozen :class:`torch.nn.Embedding` whose table is int8 with a scale per token: only
    the looked-up rows are dequantized."""

    scale: torch.Tensor

    def __init__(self, embedding: torch.nn.Embedding):
        torch.nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm = embedding.padding_idx, None
        self.norm_type, self.scale_grad_by_freq, self.sparse = 2.0, False, False
        q, scale = _int8_rows(embedding.weight)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scale[ids][..., None]


def quantize_base(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a base model, before a PEFT method wraps it) with every linear layer and the
    word embeddings in int8, in place; the classification head (:data:`KEEP`) as it was."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if any(qualified == k or qualified.startswith(k + ".") for k in KEEP):
                continue
            if type(child) is torch.nn.Linear:
                setattr(module, child_name, Int8Linear(child))
            elif child is embeddings and type(child) is torch.nn.Embedding:
                setattr(module, child_name, Int8Embedding(child))
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held (int8 weights count 1 a value)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
