"""A quantized frozen base at the site: the base model's weights held in int8 or in 4-bit
NormalFloat (nf4), on CPU or CUDA.

A site with little memory sets ``quantize = "int8"`` or ``"nf4"`` (site.toml ``[site]``;
``simulate --site-quantize``). Nothing shared changes: the PEFT parameters and the
classification head stay fp32 and trainable, the delta has the run's names and shapes, and the
coordinator cannot tell (nor needs to) which sites quantized. Gradients flow through the frozen
layers to their input, so LoRA, adapters, prompts and biases before and inside them train as
usual. The method ``full`` trains the base weights themselves and cannot run on either.

- ``int8``: every linear layer's weight and the word embeddings as int8 with one fp32 scale per
  output row (symmetric, absmax / 127), a quarter of their fp32 bytes; plain torch, the same on
  CPU and CUDA. A layer dequantizes its weight for each matmul: the saving is memory at rest,
  not compute.
- ``nf4``: QLoRA's base (Dettmers et al. 2023): every linear layer's weight in bitsandbytes'
  4-bit NormalFloat, blocks of 64 values with a scale each (the scales themselves 8-bit, QLoRA's
  double quantization), computed in fp32 (the word
  embeddings int8 as above: bitsandbytes has no 4-bit embedding). bitsandbytes is an optional
  dependency (``pip install 'fedpeft[nf4]'``); its CPU kernels are used on CPU, its CUDA ones
  on CUDA.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from fedpeft.common.config import QUANTIZE
from fedpeft.common.errors import ModelError

__all__ = [
    "QUANTIZE",
    "Int8Embedding",
    "Int8Linear",
    "quantize_base",
    "weight_bytes",
]

#: Modules left as they are: the classification head trains and is shared.
KEEP = ("classifier",)
#: A site's quantized bases (``QUANTIZE`` less ``none``).
KINDS = tuple(q for q in QUANTIZE if q != "none")


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


def _bitsandbytes() -> Any:
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a missing optional kernel
        import bitsandbytes
    except ImportError:
        raise ModelError(
            "quantize nf4 needs bitsandbytes, which is not installed: pip install 'fedpeft[nf4]'"
        ) from None
    return bitsandbytes


def _nf4_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """``linear`` as bitsandbytes' frozen 4-bit NormalFloat layer, computing in fp32 (a subclass
    of :class:`torch.nn.Linear`, which peft wraps with its own 4-bit LoRA and (IA)³ layers)."""
    bnb = _bitsandbytes()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().float(), requires_grad=False, quant_type="nf4"
    )
    layer.bias = linear.bias  # fp32; BitFit trains it
    # In eval mode on an AVX512-BF16 CPU bitsandbytes repacks the weight for inference, for
    # good: a layer that trains again after an evaluation (early stopping) would then fail.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(linear.weight.device)  # bitsandbytes quantizes on the move


def quantize_base(model: torch.nn.Module, kind: str = "int8") -> torch.nn.Module:
    """``model`` (a base model, before a PEFT method wraps it) with every linear layer in
    ``kind`` (int8 or nf4) and the word embeddings in int8, in place; the classification head
    (:data:`KEEP`) as it was."""
    if kind not in KINDS:
        raise ModelError(f"quantize {kind!r} is not one of {', '.join(KINDS)}")
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if any(qualified == k or qualified.startswith(k + ".") for k in KEEP):
                continue
            if type(child) is torch.nn.Linear:
                setattr(
                    module, child_name, Int8Linear(child) if kind == "int8" else _nf4_linear(child)
                )
            elif child is embeddings and type(child) is torch.nn.Embedding:
                setattr(module, child_name, Int8Embedding(child))
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held (int8 weights count 1 a value, nf4
    weights half of one, with their blocks' scales)."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # bitsandbytes keeps an nf4 weight's scales here
        while state is not None:  # the scales, quantized in turn (state2), and their own
            tensors += [t for t in (state.absmax, state.code, state.offset) if t is not None]
            state = state.state2 if state.nested else None
    return sum(t.numel() * t.element_size() for t in tensors)
