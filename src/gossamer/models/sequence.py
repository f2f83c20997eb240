"""Next-token models over integer token ids: LEAF's character LSTM and a small transformer.

Input ``x`` is ``[n, L]`` int64 token ids (``input_shape == (L,)``), the label the id of the
token after the sequence; output logits ``[n, num_classes]`` (``num_classes`` is the
vocabulary for next-token data). Both are written with plain matrix products, so they run
for many nodes at once under ``torch.func.vmap`` (``nn.LSTM``'s fused ``aten::lstm`` has no
batching rule), and have no buffers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gossamer import checks
from gossamer.models.zoo import MODELS


def token_shape(model: str, input_shape: tuple[int, ...]) -> int:
    """The sequence length ``L`` of ``input_shape == (L,)``; a one-line ValueError otherwise."""
    shape = tuple(input_shape)
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise ValueError(f"model {model} needs token-id inputs, input_shape (L,), got {shape}")
    return shape[0]


def _tokens(model: str, x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"model {model} needs integer token ids as inputs, got {x.dtype}")
    return x.long()


class LSTM(nn.Module):
    """A multi-layer LSTM (batch first) with explicit matrix products, equal to
    ``nn.LSTM(input_size, hidden, layers, batch_first=True)`` with the same weights.

    Parameters have ``nn.LSTM``'s names, shapes, order and init: ``weight_ih_l{k}``
    ``[4H, in]``, ``weight_hh_l{k}`` ``[4H, H]``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``[4H]``,
    gates in the order input, forget, cell, output. Returns the top layer's outputs
    ``[n, L, H]``; the state starts at zero.

    Hochreiter, Schmidhuber, "Long Short-Term Memory", Neural Computation 9(8), 1997.
    """

    def __init__(self, input_size: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.hidden, self.layers = hidden, layers
        for k in range(layers):
            fan_in = input_size if k == 0 else hidden
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden, fan_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden, hidden)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden)))
        bound = 1 / math.sqrt(hidden)
        for p in self.parameters():            # nn.LSTM.reset_parameters, in its order
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_all = x
        for k in range(self.layers):
            w_hh = getattr(self, f"weight_hh_l{k}")
            # the input projection of every step at once; only h @ w_hh is sequential
            pre = (h_all @ getattr(self, f"weight_ih_l{k}").T + getattr(self, f"bias_ih_l{k}")
                   + getattr(self, f"bias_hh_l{k}"))
            h = c = None
            outputs = []
            for step in pre.unbind(dim=-2):     # (unbind: one backward, not a slice per step)
                gates = step if h is None else step + h @ w_hh.T
                i, f, g, o = gates.chunk(4, dim=-1)
                i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                c = i * g if c is None else f * c + i * g
                h = o * torch.tanh(c)
                outputs.append(h)
            h_all = torch.stack(outputs, dim=-2)
        return h_all


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: embedding -> stacked LSTM -> linear, from the last step.

    Defaults (``vocab`` 80, ``embed`` 8, ``layers`` 2, ``hidden`` 256) are LEAF's. With 80
    classes it has 819,920 parameters (torch's two LSTM bias vectors per layer; LEAF's
    TensorFlow cell has one, 817,872).

    Caldas, Duddu, Wu, et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097;
    the model follows McMahan, Moore, Ramage, et al., "Communication-Efficient Learning of
    Deep Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, vocab: int = 80,
                 embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        token_shape("char_lstm", input_shape)
        vocab = checks.as_int("vocab", vocab, lo=1)
        embed = checks.as_int("embed", embed, lo=1)
        hidden = checks.as_int("hidden", hidden, lo=1)
        layers = checks.as_int("layers", layers, lo=1)
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = LSTM(embed, hidden, layers)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lstm(self.embedding(_tokens("char_lstm", x)))
        return self.fc(h[..., -1, :])


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention, then a GELU MLP
    of 4x width, each added to the residual stream."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of ``x`` ``[n, L, D]`` with plain matrix products."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)
                   for t in (q, k, v))                                   # [n, heads, L, d]
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    """A small causal (decoder-only) transformer predicting the token after the sequence.

    Token and learned position embeddings (``input_shape[0]`` positions), ``layers``
    pre-LayerNorm blocks of ``heads``-head causal self-attention and a 4x MLP, a final
    LayerNorm, and a linear head on the last position. ``dim`` must be divisible by ``heads``.

    Vaswani, Shazeer, Parmar, et al., "Attention Is All You Need", NeurIPS 2017,
    arXiv:1706.03762; the pre-LayerNorm decoder-only layout as in GPT-2 (Radford et al.,
    "Language Models are Unsupervised Multitask Learners", 2019, no arXiv id).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, vocab: int | None = None,
                 dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        length = token_shape("transformer", input_shape)
        vocab = checks.as_int("vocab", num_classes if vocab is None else vocab, lo=1)
        dim = checks.as_int("dim", dim, lo=1)
        heads = checks.as_int("heads", heads, lo=1)
        layers = checks.as_int("layers", layers, lo=1)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _tokens("transformer", x)
        h = self.tokens(x) + self.positions.weight[: x.shape[-1]]
        return self.head(self.norm(self.blocks(h)[..., -1, :]))


@MODELS.register("char_lstm")
def char_lstm(input_shape: tuple[int, ...], num_classes: int, vocab: int = 80, embed: int = 8,
              hidden: int = 256, layers: int = 2) -> nn.Module:
    return CharLSTM(input_shape, num_classes, vocab, embed, hidden, layers)


@MODELS.register("transformer")
def transformer(input_shape: tuple[int, ...], num_classes: int, vocab: int | None = None, dim: int = 64,
                heads: int = 4, layers: int = 2) -> nn.Module:
    return Transformer(input_shape, num_classes, vocab, dim, heads, layers)
