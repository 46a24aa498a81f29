"""Point-to-point messages between pipeline stages over ``torch.distributed`` (gloo or NCCL).

A message is a kind, three integers (epoch, step, aux) and a list of tensors whose shapes may change from
one message to the next (text batches). On the wire it is two transfers:

1. a header, int64 ``[kind, epoch, step, aux, count, body_bytes]``;
2. when ``count > 0``, a body of ``body_bytes`` bytes: a shape table, int64 ``(count, 2 + MAX_DIMS)`` (dtype
   code, ndim, sizes, 0-padded), then each tensor's bytes, each starting at a multiple of ``ALIGN`` bytes.

:class:`Sender` sends with ``isend`` and keeps at most one message in flight: a new send first waits for the
previous one, so the sender computes the next batch while the receiver takes the last one. gloo completes a
send only once the receiver has posted the matching receive, which bounds how far a stage can run ahead of
the next one (``al.stage_checkpoints.MAX_LEAD_PER_LINK``). Every failure of a peer (it died, closed
its connection, or did not answer within the process group's timeout) becomes a :class:`StageFailure`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["Kind", "Message", "Sender", "Receiver", "StageFailure", "pack_body", "unpack_body", "MAX_DIMS"]

MAX_DIMS = 6
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_CODES = {dtype: code for code, dtype in enumerate(_DTYPES)}
_HEADER = 6
ALIGN = 16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class Kind(IntEnum):
    """Message kinds; stage 0 drives the pipeline and every other stage reacts to what it receives."""

    TRAIN = 1  # a training batch: s, t, labels[, mask]
    EPOCH_END = 2  # an epoch's training is over: mean losses of the components so far (float64)
    TRAIN_END = 3  # no more training batches
    EVAL_BEGIN = 4  # an evaluation pass starts (aux: split code): label-decoder tensors of the components so far
    EVAL = 5  # an evaluation batch: s, labels[, mask]
    EVAL_END = 6  # the evaluation pass is over
    SAVE = 7  # the state tensors of the components so far, gathered towards the last stage
    STOP = 8  # the run is over


class Message(NamedTuple):
    kind: Kind
    epoch: int = 0
    step: int = 0
    aux: int = 0
    tensors: tuple = ()


class StageFailure(RuntimeError):
    """A peer stage died, closed its connection, or did not answer within the timeout."""


def _failure(me: int, peer: int, action: str, message: Message | None, error: Exception) -> StageFailure:
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "timed out" in cause.lower() or "timeout" in cause.lower():
        reason = f"stage {peer} did not answer within the timeout (--timeout): it hangs or is overloaded"
    else:
        reason = f"stage {peer} died or closed its connection"
    what = f" ({message.kind.name} epoch {message.epoch} step {message.step})" if message else ""
    return StageFailure(f"stage {me}: {action} stage {peer}{what} failed: {reason}; stopping. Cause: {cause}")


class Sender:
    """Sends messages to rank ``peer``; ``wire`` is the device tensors travel on (cpu for gloo, cuda for NCCL)."""

    def __init__(self, me: int, peer: int, wire: torch.device):
        self.me, self.peer, self.wire = me, peer, wire
        self._pending: list = []  # the works of the message in flight
        self._in_flight: tuple = ()  # its header and body, kept alive until the send completes
        self._message: Message | None = None

    def send(self, message: Message) -> None:
        """Starts sending ``message`` after waiting for the previous one."""
        self.wait()
        tensors = [t.detach() for t in message.tensors]
        parts = [pack_body(tensors, self.wire)] if tensors else []
        header = torch.tensor([int(message.kind), message.epoch, message.step, message.aux, len(tensors),
                               parts[0].numel() if parts else 0], dtype=torch.int64, device=self.wire)
        parts.insert(0, header)
        self._message = message
        try:
            self._pending = [dist.isend(part, self.peer) for part in parts]
        except RuntimeError as error:
            raise _failure(self.me, self.peer, "sending to", message, error) from error
        self._in_flight = tuple(parts)

    def wait(self) -> None:
        """Waits until the message in flight (if any) has been received."""
        try:
            for work in self._pending:
                work.wait()
        except RuntimeError as error:
            raise _failure(self.me, self.peer, "sending to", self._message, error) from error
        finally:
            self._pending, self._in_flight = [], ()


class Receiver:
    """Receives messages from rank ``peer`` onto ``device`` (``wire``: the device they travel on)."""

    def __init__(self, me: int, peer: int, wire: torch.device, device: torch.device):
        self.me, self.peer, self.wire, self.device = me, peer, wire, device

    def _recv(self, buffer: torch.Tensor, header) -> torch.Tensor:
        try:
            dist.recv(buffer, self.peer)
        except RuntimeError as error:
            raise _failure(self.me, self.peer, "receiving from", header, error) from error
        return buffer

    def recv(self) -> Message:
        header = self._recv(torch.empty(_HEADER, dtype=torch.int64, device=self.wire), None).tolist()
        kind, epoch, step, aux, count, body_bytes = header
        message = Message(Kind(kind), epoch, step, aux)
        if count == 0:
            return message
        body = self._recv(torch.empty(body_bytes, dtype=torch.uint8, device=self.wire), message)
        return message._replace(tensors=tuple(t.to(self.device) for t in unpack_body(body, count)))


def pack_body(tensors, device: torch.device) -> torch.Tensor:
    """The shape table and the bytes of ``tensors`` (contiguous) in one uint8 buffer on ``device``."""
    table = torch.zeros(len(tensors), 2 + MAX_DIMS, dtype=torch.int64)
    offsets, size = [], _aligned(table.numel() * 8)
    for row, t in enumerate(tensors):
        if t.dtype not in _CODES:
            raise TypeError(f"message tensors: unsupported dtype {t.dtype}")
        if t.dim() > MAX_DIMS:
            raise ValueError(f"message tensors: at most {MAX_DIMS} dimensions, got shape {tuple(t.shape)}")
        table[row, 0], table[row, 1] = _CODES[t.dtype], t.dim()
        table[row, 2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        offsets.append(size)
        size += _aligned(t.numel() * t.element_size())
    body = torch.empty(size, dtype=torch.uint8, device=device)
    body[: table.numel() * 8] = table.view(-1).view(torch.uint8).to(device)
    for offset, t in zip(offsets, tensors):
        data = t.reshape(-1).view(torch.uint8)
        body[offset: offset + data.numel()] = data
    return body


def unpack_body(body: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The ``count`` tensors packed by :func:`pack_body`, as views of ``body``."""
    table_bytes = count * (2 + MAX_DIMS) * 8
    table = body[:table_bytes].cpu().view(torch.int64).view(count, 2 + MAX_DIMS).tolist()
    tensors, offset = [], _aligned(table_bytes)
    for code, ndim, *sizes in table:
        dtype, shape = _DTYPES[code], sizes[:ndim]
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        tensors.append(body[offset: offset + nbytes].view(dtype).view(shape))
        offset += _aligned(nbytes)
    return tensors
