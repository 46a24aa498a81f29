"""Data-parallel meProp on ``torch.distributed``: one selection for every rank, and an all-reduce of only the
rows it kept.

**Synchronised selection** (``meprop.Linear(..., sync_selection=True)``, or ``meprop.convert(...,
sync_selection=True)``; optional ``process_group=``): in ``"unified"`` mode each rank computes its column
scores ``s_j = sum_n |dy[n, j]|`` over its own part of the batch (``out`` floats, the op ``column_scores``),
the scores are summed over the process group (``all_reduce``) and every rank keeps the same ``k`` columns,
the top ``k`` of the summed scores (ties as usual: larger first, then lower index). The rows each rank
contributes are then exactly the rows one process would compute for the concatenated global batch, so
DDP's averaged gradient equals the single-process meProp gradient of the global batch (up to the order of
float summation). ``"random_unified"`` uses the draw of the group's first rank on every rank (a broadcast of
``k`` indices). The per-example modes select per example, which is already what one process does on the
global batch: they need no synchronisation (the option changes nothing there) and are exact under DDP
as they are.

Every rank must run the layer's backward the same number of times and in the same order (one score
all-reduce per backward of each synchronised layer), as DDP itself requires of its buckets; the selection
runs in eager mode only. Under ``no_sync()`` the selection is still synchronised at every backward, so the
accumulated gradient is the sum of the global batches' gradients.

**Row-sparse all-reduce** (:func:`register_row_sparse_hook`): a DDP communication hook that sends, for each
synchronised weight in a bucket, only the rows its selections touched since the last all-reduce (``k``
rows after one backward; their union after gradient accumulation), and the rest of the bucket as usual.
The rows are the same on every rank, so the result equals DDP's dense average, at ``k x in`` instead of
``out x in`` values per weight. ``sparse_grad=True`` (a sparse COO weight gradient) cannot go through
DDP's reducer, which all-reduces dense buckets: under DDP it is refused with an error pointing here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import reference

__all__ = ["RowSparseHook", "SyncSelection", "register_row_sparse_hook"]

# Selections kept per layer before they are folded into their union (gradient accumulation over many steps).
_MAX_PENDING = 16


def _ddp_class():
    return torch.nn.parallel.DistributedDataParallel


class SyncSelection:
    """The synchronised selection of one meprop layer: its process group, and the rows its selections touched
    since the row-sparse hook last reduced its weight gradient.

    Args:
        process_group: the group whose ranks share the selection (None: the default group).
        where: the layer's name in error messages.

    Attributes:
        score_bytes: bytes of scores (or indices) this layer has all-reduced (or broadcast) so far.
    """

    def __init__(self, process_group=None, where: str = "meprop") -> None:
        self.process_group = process_group
        self.where = where
        self.score_bytes = 0
        self._pending: list[torch.Tensor] = []  # the selections since the last take_rows()
        self._dense = False  # a dense weight gradient since the last take_rows()
        self._tracked = False  # set by register_row_sparse_hook: remember the selections

    def __repr__(self) -> str:
        group = "default group" if self.process_group is None else "explicit group"
        return f"SyncSelection({self.where}, {group})"

    def __deepcopy__(self, memo) -> SyncSelection:
        # A copy shares the process group (a group cannot be copied) and starts with nothing pending.
        return SyncSelection(self.process_group, self.where)

    def __getstate__(self) -> dict:
        if self.process_group is not None:
            raise TypeError(
                f"{self.where}: a layer with an explicit process_group cannot be pickled (a process group is bound "
                "to its processes); save its state_dict instead"
            )
        return {"where": self.where}

    def __setstate__(self, state: dict) -> None:
        self.__init__(None, state["where"])

    def select(self, dy: torch.Tensor, k: int, mode: str, ops, generator=None) -> torch.Tensor:
        """The ``k`` columns (int64 ``(k,)``, selection order) every rank of the group keeps for its ``dy (N, out)``.

        ``mode`` is ``"unified"`` (top ``k`` of the all-reduced column scores) or ``"random_unified"`` (the
        group's first rank's draw, broadcast); ``ops`` is the backend computing the scores and the top-k.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{self.where}: sync_selection=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        try:
            if mode == "unified":
                scores = ops.column_scores(dy)
                dist.all_reduce(scores, group=self.process_group)
                self.score_bytes += scores.numel() * scores.element_size()
                idx = ops.topk_unified(scores.unsqueeze(0), k)
            else:
                idx = reference.random_unified(dy, k, generator)
                source = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
                dist.broadcast(idx, src=source, group=self.process_group)
                self.score_bytes += idx.numel() * idx.element_size()
        except RuntimeError as exc:  # dist.DistError and its subclasses are RuntimeErrors
            raise RuntimeError(
                f"{self.where}: the synchronised selection could not reach the other ranks (a rank stopped, or "
                f"the process group timed out): {exc}"
            ) from exc
        if self._tracked:
            self._pending.append(idx)
            if len(self._pending) > _MAX_PENDING:
                self._pending = [torch.unique(torch.cat(self._pending))]
        return idx

    def touch_all(self) -> None:
        """Note that this step's weight gradient may fill every row (a dense or per-example backward)."""
        self._dense = True

    def take_rows(self, out_features: int) -> torch.Tensor | None:
        """The rows touched since the last call (int64, ascending, the same on every rank), or None where every
        row may be non-zero; then forget them."""
        pending, dense = self._pending, self._dense
        self._pending, self._dense = [], False
        if dense:
            return None
        if not pending:
            return torch.zeros(0, dtype=torch.long)
        if len(pending) == 1:
            return pending[0].sort().values  # k rows: no host synchronisation
        return torch.unique(torch.cat(pending))  # sorted


class RowSparseHook:
    """The state of the communication hook :func:`register_row_sparse_hook` installs.

    Attributes:
        process_group: the DDP model's process group.
        row_bytes: bytes all-reduced so far for the rows of synchronised weights.
        dense_bytes: bytes all-reduced so far for everything else (biases, other parameters, and synchronised
            weights whose touched rows covered more than :attr:`max_row_fraction` of them).
        max_row_fraction: above this share of a weight's rows the whole weight is all-reduced.
    """

    def __init__(self, process_group, syncs: dict[int, tuple[torch.nn.Parameter, SyncSelection]]) -> None:
        self.process_group = process_group
        self.row_bytes = 0
        self.dense_bytes = 0
        self.max_row_fraction = 0.5
        self._syncs = syncs  # id(weight) -> (weight, its SyncSelection)

    @property
    def bytes_reduced(self) -> int:
        """``row_bytes + dense_bytes``."""
        return self.row_bytes + self.dense_bytes

    def reset_counts(self) -> None:
        """Set the byte counters to 0."""
        self.row_bytes = self.dense_bytes = 0

    def _rows_of(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        entry = self._syncs.get(id(param))
        if entry is None or entry[0] is not param:
            return None
        rows = entry[1].take_rows(grad.shape[0])
        if rows is None or rows.numel() > self.max_row_fraction * grad.shape[0]:
            return None
        return rows.to(grad.device)


def _row_sparse_hook(state, bucket):
    """The DDP communication hook: all-reduce the touched rows of each synchronised weight in ``bucket`` and the
    rest of the bucket densely, averaged over the group (as DDP's own all-reduce: divide, then sum)."""
    group = state.process_group
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    pieces, writes = [], []  # flat values to reduce, and where each goes back: (grad view, rows or None)
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        rows = state._rows_of(param, grad)
        if rows is None:
            pieces.append(grad.reshape(-1))
            state.dense_bytes += grad.numel() * grad.element_size()
        else:
            pieces.append(grad.index_select(0, rows).reshape(-1))
            state.row_bytes += pieces[-1].numel() * grad.element_size()
        writes.append((grad, rows))
    compact_any = any(rows is not None for _, rows in writes)
    values = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]) if compact_any else buffer
    values.div_(world)

    def write_back(fut):
        try:
            reduced = fut.value()[0]
        except RuntimeError as exc:
            raise RuntimeError(
                "meprop.distributed: the row-sparse all-reduce could not reach the other ranks (a rank stopped, "
                f"or the process group timed out): {exc}"
            ) from exc
        if not compact_any:
            return buffer
        offset = 0
        for grad, rows in writes:
            n = grad.numel() if rows is None else rows.numel() * grad[0].numel()
            part = reduced[offset : offset + n]
            if rows is None:
                grad.copy_(part.view_as(grad))
            elif n:
                grad.index_copy_(0, rows, part.view(rows.numel(), *grad.shape[1:]))
            offset += n
        return buffer

    return dist.all_reduce(values, group=group, async_op=True).get_future().then(write_back)


def _same_ranks(a, b) -> bool:
    def ranks(group):
        return list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)

    return ranks(a) == ranks(b)


def register_row_sparse_hook(ddp_model) -> RowSparseHook:
    """Install on ``ddp_model`` (a ``DistributedDataParallel``) the communication hook that all-reduces only the
    touched rows of its synchronised meprop weights (``sync_selection=True``), and the rest of each bucket as
    usual. The weights come out as without the hook (DDP's average); returns the hook's state, which counts
    the bytes all-reduced.

    A weight's gradient must come from its meprop layer only (not also from, say, a tied embedding): the
    hook sends the rows that layer's selections touched. Call it once, before the first backward.
    """
    where = "meprop.distributed.register_row_sparse_hook"
    if not isinstance(ddp_model, _ddp_class()):
        raise TypeError(
            f"{where}: ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model)}"
        )
    group = ddp_model.process_group
    syncs: dict[int, tuple[torch.nn.Parameter, SyncSelection]] = {}
    owners: dict[int, int] = {}
    for module in ddp_model.module.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    for module in ddp_model.module.modules():
        sync = getattr(module, "selection_sync", None)
        if not isinstance(sync, SyncSelection):
            continue
        if getattr(module, "sparse_grad", False):
            raise ValueError(
                f"{where}: {sync.where} has sparse_grad=True, which DDP cannot all-reduce; use sparse_grad=False "
                "(this hook then sends only the kept rows)"
            )
        if not _same_ranks(sync.process_group, group):
            raise ValueError(f"{where}: {sync.where} selects over other ranks than the DDP model's process group")
        if owners.get(id(module.weight), 0) > 1:
            continue  # a weight shared with another module: its gradient may fill other rows
        sync._tracked = True
        syncs[id(module.weight)] = (module.weight, sync)
    state = RowSparseHook(group, syncs)
    ddp_model.register_comm_hook(state, _row_sparse_hook)
    return state


def refuse_sparse_grad_under_ddp(weight: torch.Tensor, where: str) -> None:
    """Raise a clear error when ``weight``, whose layer has ``sparse_grad=True``, runs inside the forward of a
    DistributedDataParallel that all-reduces it (DDP's reducer fails on sparse gradients)."""
    active = getattr(_ddp_class(), "_get_active_ddp_module", lambda: None)()
    if active is None or not weight.requires_grad:
        return
    ignored = getattr(active, "parameters_to_ignore", ())
    if any(p is weight and name not in ignored for name, p in active.module.named_parameters()):
        raise RuntimeError(
            f"{where}: sparse_grad=True does not work under DistributedDataParallel (its reducer all-reduces dense "
            "gradients and fails on a sparse one); use sparse_grad=False with sync_selection=True and "
            "meprop.distributed.register_row_sparse_hook(ddp_model), which all-reduces only the kept rows"
        )
