"""x-path encoder stacks shared by the AL models and their backprop baselines.

Each builder returns ``(encoders, feature_dims, pool)``: one encoder per component, called as
``encoder(s, mask)``; ``feature_dims[i]`` is the size of ``pool(encoder_i output)``; ``pool`` turns an encoder
output into ``(N, feature_dim)`` (flatten for vision, masked mean over tokens for text).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .components import FlattenPool, MaskedMeanPool, Unmasked

__all__ = [
    "mlp_encoders",
    "cnn_encoders",
    "lstm_encoders",
    "transformer_encoders",
    "seed_lstm_encoders",
    "seed_transformer_encoders",
    "TokenEmbedding",
    "StatefulBiLSTM",
    "FinalStatePool",
    "SeedTransformerLayer",
]


def _check_components(num_components: int) -> None:
    if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components must be an int >= 1, got {num_components!r}")


def mlp_encoders(in_features: int = 784, hidden: int = 256, num_components: int = 3):
    """Fully connected layers ``Linear -> ReLU``; the first flattens its input ``(N, ...)``."""
    _check_components(num_components)
    encoders, dims = [], []
    for i in range(num_components):
        layers = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(in_features if i == 0 else hidden, hidden), nn.ReLU()]
        encoders.append(Unmasked(nn.Sequential(*layers)))
        dims.append(hidden)
    return encoders, dims, FlattenPool


def cnn_encoders(in_channels: int = 1, image_size: int = 28, channels=(16, 32, 64)):
    """One ``Conv3x3 -> BatchNorm -> ReLU -> MaxPool2`` block per component (no pooling once the map is 1x1).

    ``channels`` has one entry per component; input ``(N, in_channels, image_size, image_size)``.
    """
    channels = tuple(channels)
    _check_components(len(channels))
    encoders, dims = [], []
    size, previous = image_size, in_channels
    for width in channels:
        block = [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        if size >= 2:
            block.append(nn.MaxPool2d(2))
            size //= 2
        encoders.append(Unmasked(nn.Sequential(*block)))
        dims.append(width * size * size)
        previous = width
    return encoders, dims, FlattenPool


class TokenEmbedding(nn.Module):
    """Token ids ``(N, L)`` -> vectors ``(N, L, dim)``, optionally initialised from a ``(vocab, dim)`` matrix.

    Row 0 is padding (zero, not trained when built here from scratch).
    """

    def __init__(self, vocab_size: int, dim: int, vectors: torch.Tensor | None = None, dropout: float = 0.0):
        super().__init__()
        if vectors is not None:
            if tuple(vectors.shape) != (vocab_size, dim):
                raise ValueError(f"vectors must have shape ({vocab_size}, {dim}), got {tuple(vectors.shape)}")
            self.embedding = nn.Embedding.from_pretrained(vectors.float().clone(), freeze=False, padding_idx=0)
        else:
            self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embedding(ids))


class BiLSTMLayer(nn.Module):
    """One bidirectional LSTM layer over padded sequences: ``(N, L, in), mask (N, L) -> (N, L, 2*hidden)``.

    Sequences are packed by their true lengths, so padding never enters the recurrence (in training and in
    inference alike) and padded output positions are zero. Each call starts from a zero state: a component
    hands the next one its output sequence, never its recurrent state.
    """

    def __init__(self, in_features: int, hidden: int, embedding: TokenEmbedding | None = None):
        super().__init__()
        self.embedding = embedding
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True, bidirectional=True)

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.embedding is not None:
            s = self.embedding(s)
        if mask is None:
            return self.lstm(s)[0]
        lengths = mask.sum(dim=1).cpu()
        if bool((lengths < 1).any()):
            raise ValueError("every sequence needs at least one valid token (mask row of all False)")
        packed = pack_padded_sequence(s, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=s.shape[1])[0]


def lstm_encoders(
    vocab_size: int,
    embedding_dim: int = 50,
    hidden: int = 128,
    num_components: int = 2,
    vectors: torch.Tensor | None = None,
    dropout: float = 0.2,
):
    """Embedding + BiLSTM for the first component, one more BiLSTM layer per further component."""
    _check_components(num_components)
    embedding = TokenEmbedding(vocab_size, embedding_dim, vectors, dropout)
    encoders = [BiLSTMLayer(embedding_dim, hidden, embedding)]
    encoders += [BiLSTMLayer(2 * hidden, hidden) for _ in range(num_components - 1)]
    return encoders, [2 * hidden] * num_components, MaskedMeanPool


class TransformerLayer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` over padded sequences; the first also embeds the token ids.

    The first layer maps ids ``(N, L)`` to ``(N, L, d_model)`` through the embedding, a linear projection
    and learned positions (``L <= max_len``).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        feedforward: int,
        dropout: float,
        embedding: TokenEmbedding | None = None,
        max_len: int = 0,
    ):
        super().__init__()
        self.embedding = embedding
        if embedding is not None:
            self.project = nn.Linear(embedding.embedding.embedding_dim, d_model)
            self.positions = nn.Embedding(max_len, d_model)
        self.layer = nn.TransformerEncoderLayer(d_model, nhead, feedforward, dropout, batch_first=True)

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.embedding is not None:
            if s.shape[1] > self.positions.num_embeddings:
                raise ValueError(f"sequence length {s.shape[1]} exceeds max_len {self.positions.num_embeddings}")
            positions = torch.arange(s.shape[1], device=s.device)
            s = self.project(self.embedding(s)) + self.positions(positions)
        padding = None if mask is None else ~mask
        return self.layer(s, src_key_padding_mask=padding)


def transformer_encoders(
    vocab_size: int,
    embedding_dim: int = 50,
    d_model: int = 128,
    nhead: int = 4,
    feedforward: int = 256,
    num_components: int = 2,
    max_len: int = 128,
    vectors: torch.Tensor | None = None,
    dropout: float = 0.1,
):
    """Embedding + positions + a Transformer encoder layer for the first component, one layer per further one."""
    _check_components(num_components)
    embedding = TokenEmbedding(vocab_size, embedding_dim, vectors, dropout)
    encoders = [TransformerLayer(d_model, nhead, feedforward, dropout, embedding, max_len)]
    encoders += [TransformerLayer(d_model, nhead, feedforward, dropout) for _ in range(num_components - 1)]
    return encoders, [d_model] * num_components, MaskedMeanPool


# ------------------------------------------------------------------------------------ the seed's text models

class StatefulBiLSTM(nn.Module):
    """A seed LSTM component's encoder: one bidirectional LSTM layer that starts from the previous LSTM
    component's final state and hands on its own.

    Input: vectors ``(N, L, in)`` (after the embedding component, zero initial state) or, with
    ``takes_state``, the previous :class:`StatefulBiLSTM`'s output. Output ``(N, L + 2, 2*hidden)``: the output
    sequence (zero at padding), then the final ``h`` and ``c`` as two extra rows, each ``[forward | backward]``;
    so one tensor carries sequence and state between components (and pipeline stages). Sequences are packed by
    their lengths (``mask (N, L)``), so padding never enters the recurrence and the final state is the one after
    each sequence's last real token.
    """

    def __init__(self, in_features: int, hidden: int, takes_state: bool = False):
        super().__init__()
        self.hidden, self.takes_state = hidden, takes_state
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True, bidirectional=True)

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, hidden = s.shape[0], self.hidden
        state = None
        if self.takes_state:
            if s.shape[-1] != 2 * hidden:
                raise ValueError(f"StatefulBiLSTM: the previous component's state has width {s.shape[-1]}, "
                                 f"this LSTM needs 2 * hidden = {2 * hidden}")
            h0 = s[:, -2].reshape(n, 2, hidden).transpose(0, 1).contiguous()
            c0 = s[:, -1].reshape(n, 2, hidden).transpose(0, 1).contiguous()
            s, state = s[:, :-2], (h0, c0)
        if mask is None:
            out, (h, c) = self.lstm(s, state)
        else:
            lengths = mask.sum(dim=1).cpu()
            if bool((lengths < 1).any()):
                raise ValueError("every sequence needs at least one valid token (mask row of all False)")
            packed = pack_padded_sequence(s, lengths, batch_first=True, enforce_sorted=False)
            out, (h, c) = self.lstm(packed, state)
            out = pad_packed_sequence(out, batch_first=True, total_length=s.shape[1])[0]
        h = h.transpose(0, 1).reshape(n, 1, 2 * hidden)
        c = c.transpose(0, 1).reshape(n, 1, 2 * hidden)
        return torch.cat([out, h.to(out.dtype), c.to(out.dtype)], dim=1)


class FinalStatePool(nn.Module):
    """The seed LSTM's bridge input ``h_fwd + h_bwd`` from a :class:`StatefulBiLSTM` output: ``(N, L + 2, 2H) -> (N, H)``."""

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = s[:, -2]
        half = h.shape[-1] // 2
        return h[:, :half] + h[:, half:]


class SeedTransformerLayer(nn.Module):
    """A seed Transformer component's encoder: one pre-norm encoder layer (self-attention and feed-forward
    sublayers, each ``x + dropout(sublayer(LayerNorm(x)))``) and a final LayerNorm, Xavier-initialised, no
    positional encoding: ``(N, L, d_model), mask (N, L) -> (N, L, d_model)``."""

    def __init__(self, d_model: int, nhead: int, feedforward: int, dropout: float = 0.1):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"the seed Transformer's d_model (= embedding size {d_model}) must be divisible by "
                             f"the number of heads ({nhead})")
        self.layer = nn.TransformerEncoderLayer(d_model, nhead, feedforward, dropout, batch_first=True,
                                                norm_first=True)
        self.norm = nn.LayerNorm(d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        padding = None if mask is None else ~mask
        return self.norm(self.layer(s, src_key_padding_mask=padding))


def _seed_embedding(vocab_size, embedding_dim, vectors, dropout):
    return Unmasked(TokenEmbedding(vocab_size, embedding_dim, vectors, dropout))


def seed_lstm_encoders(
    vocab_size: int,
    embedding_dim: int = 300,
    hidden: int = 128,
    num_components: int = 3,
    vectors: torch.Tensor | None = None,
    dropout: float = 0.3,
):
    """The seed's LSTM: the embedding (a component of its own, pooled by masked mean), then
    ``num_components - 1`` :class:`StatefulBiLSTM` (pooled by ``h_fwd + h_bwd``), each after the first starting
    from the previous one's final state."""
    _check_components(num_components)
    if num_components < 2:
        raise ValueError(f"num_components of the seed LSTM must be >= 2 (embedding + LSTMs), got {num_components}")
    encoders = [_seed_embedding(vocab_size, embedding_dim, vectors, dropout), StatefulBiLSTM(embedding_dim, hidden)]
    encoders += [StatefulBiLSTM(2 * hidden, hidden, takes_state=True) for _ in range(num_components - 2)]
    return encoders, [embedding_dim] + [hidden] * (num_components - 1), [MaskedMeanPool] + [FinalStatePool] * (
        num_components - 1)


def seed_transformer_encoders(
    vocab_size: int,
    embedding_dim: int = 300,
    nhead: int = 4,
    feedforward: int = 256,
    num_components: int = 3,
    vectors: torch.Tensor | None = None,
    dropout: float = 0.1,
):
    """The seed's Transformer: the embedding (a component of its own), then ``num_components - 1``
    :class:`SeedTransformerLayer` with d_model = ``embedding_dim``; every bridge pools by masked mean."""
    _check_components(num_components)
    if num_components < 2:
        raise ValueError(f"num_components of the seed Transformer must be >= 2 (embedding + layers), got {num_components}")
    encoders = [_seed_embedding(vocab_size, embedding_dim, vectors, dropout)]
    encoders += [SeedTransformerLayer(embedding_dim, nhead, feedforward, dropout) for _ in range(num_components - 1)]
    return encoders, [embedding_dim] * num_components, MaskedMeanPool
