"""From a stream of tokenised examples to micro-batches, and from a micro-batch to tensors.

    from daemon.train.batching import micro_batches, collate
    for mb in micro_batches(examples, size=8, order="grouped", window=1024, seed=seed, epoch=0):
        tensors = collate(mb, pad_id, pack=True)    # input_ids, labels, position_ids (+ attention_mask when padded)

The loop only calls these two, so the way batches are made can change without
touching it. Both are deterministic functions of their arguments: a resumed
run re-creates the stream and skips the micro-batches it already trained.

Order (`data.group_by_length`, recorded in each checkpoint so a resume keeps
the order its file began with):
- `shuffled`: micro-batches of consecutive examples of the shuffled stream.
- `grouped`: within each window of the shuffled stream (`data.shuffle_buffer`
  examples), examples are sorted by length and cut into micro-batches, whose
  order is then shuffled (seeded). Examples of similar length share a batch,
  so almost nothing is padding; every example still comes once per epoch, and
  the number of micro-batches is the same as `shuffled`'s (ceil(n / size)):
  a window's remainder joins the next window.

Tensors (`data.packing`):
- padded: one example per row, right-padded to the longest, with an attention mask.
- packed: the examples are packed first-fit-decreasing into rows as wide as
  the longest of them, position ids restarting at 0 for each example and no
  attention mask. transformers then builds a block-diagonal causal mask from
  the position ids: no token attends across examples, and each example's loss
  is what it is alone. A row is never wider than padding's, so attention
  never costs more. The padding at a row's end continues its last example's
  positions, so a micro-batch of one example per row needs no mask at all
  and SDPA runs its causal kernel. With flash attention (CUDA) the whole micro-batch goes in
  one row instead: transformers runs variable-length attention only for a
  batch of one row, and its cost is then that of the examples alone.

Pieces (`width_pieces`): the step may run a micro-batch as runs of similar
length, each collated on its own, where the padding saved outweighs one more
forward and backward (a cost model in token slots). The micro-batch, and so
the schedule and the gradient, stay what they are.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from typing import Any, Iterable, Iterator, Literal

from daemon.errors import DataError
from daemon.train.data import IGNORE, Example

Order = Literal["shuffled", "grouped"]

# The cost model of `width_pieces`, in token slots (one token through the step's forward and backward): what one
# more forward and backward costs, in tokens of a piece that runs anyway, and what one attended (query, key) pair
# of a causal row costs, in tokens. Measured on the CPU by bench/pieces.py, between the 5M and the 25M model's
# figures (docs/PERFORMANCE.md, "Width pieces").
PIECE_OVERHEAD_TOKENS = 96.0
ATTENTION_PAIR_TOKENS = 1 / 1024


def batches(examples: Iterable[Example], micro_batch_size: int) -> Iterator[list[Example]]:
    """Group examples into lists of `micro_batch_size`; the last one may be smaller."""
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    batch: list[Example] = []
    for ex in examples:
        batch.append(ex)
        if len(batch) == micro_batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _window_rng(seed: int, epoch: int, window: int) -> random.Random:
    h = hashlib.blake2b(f"traind-groups:{seed}:{epoch}:{window}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "big"))


def grouped_batches(examples: Iterable[Example], size: int, window: int, seed: int, epoch: int) -> Iterator[list[Example]]:
    """Micro-batches of similar-length examples, window by window (see the module docstring)."""
    if size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {size}")
    window = max(window, size)
    pool: list[Example] = []
    w = 0
    for ex in examples:
        pool.append(ex)
        if len(pool) >= window:
            keep = len(pool) % size  # the remainder joins the next window, so only the last batch is short
            yield from _shuffled_groups(pool[:len(pool) - keep], size, _window_rng(seed, epoch, w))
            pool, w = pool[len(pool) - keep:], w + 1
    if pool:
        yield from _shuffled_groups(pool, size, _window_rng(seed, epoch, w))


def _shuffled_groups(pool: list[Example], size: int, rng: random.Random) -> list[list[Example]]:
    # Sort by length (then by line, so equal lengths order the same way everywhere), cut, shuffle the cuts;
    # a short last cut stays last, so every epoch ends with it, as `shuffled` does.
    ordered = sorted(pool, key=lambda ex: (len(ex.input_ids), ex.line))
    groups = [ordered[i:i + size] for i in range(0, len(ordered), size)]
    full = [g for g in groups if len(g) == size]
    rng.shuffle(full)
    return full + [g for g in groups if len(g) < size]


def micro_batches(examples: Iterable[Example], size: int, order: Order, window: int, seed: int,
                  epoch: int) -> Iterator[list[Example]]:
    """The epoch's micro-batches in `order`."""
    if order == "grouped":
        return grouped_batches(examples, size, window, seed, epoch)
    return batches(examples, size)


def collate(batch: list[Example], pad_id: int, pack: bool = False, one_row: bool = False) -> dict[str, Any]:
    """Tensors of one micro-batch: packed rows (see the module docstring) or one padded row per example.

    `one_row` packs the whole micro-batch into a single row, for flash attention: transformers runs its
    variable-length kernel only for a batch of one row, and there a row costs nothing beyond its examples.
    """
    if not batch:
        raise DataError("cannot collate an empty batch")
    if not pack:
        return _padded(batch, pad_id)
    return _packed(batch, pad_id, sum(len(ex.input_ids) for ex in batch) if one_row else None)


def width_pieces(batch: list[Example], packed: bool, overhead: float = PIECE_OVERHEAD_TOKENS,
                 pair: float = ATTENTION_PAIR_TOKENS) -> list[list[Example]]:
    """`batch` as runs of similar length, each to be collated and run on its own, where that costs less.

    A micro-batch is collated as wide as its longest example, so one long example among short ones makes
    the short ones' rows mostly padding. Run in pieces, each as wide as its own longest, the padding
    goes, at the price of one more forward and backward per piece. The step divides every piece's
    summed loss by the whole group's targets, so the gradient is the same however a micro-batch is cut.
    The cut is the one that minimises an estimated cost in token slots (runs of the examples sorted by
    length): per piece `overhead`, plus its rows x width, plus `pair` per attended (query, key) pair. A
    pure function of the lengths: a resumed run cuts its micro-batches the same way.
    """
    if len(batch) < 2:
        return [batch]
    order = sorted(batch, key=lambda ex: (len(ex.input_ids), ex.line))
    lengths = [len(ex.input_ids) for ex in order]
    n = len(order)
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)

    def cost(i: int, j: int, rows: int) -> float:  # the run order[i:j], as wide as its longest, lengths[j - 1]
        width = lengths[j - 1]
        return overhead + rows * width + pair * rows * width * width / 2

    def rows_estimate(i: int, j: int) -> int:  # cheap, and never more than the rows the run really takes
        return rows_at_least(lengths, prefix, i, j) if packed else j - i

    # The search prices runs by a lower bound on their rows (exact packing for every candidate run would cost
    # O(n^2) packings); the cut it finds is then priced exactly against the whole micro-batch, so an
    # underestimate can make it miss a better cut but never take one dearer than no cut.
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + cost(i, j, rows_estimate(i, j))
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    if len(bounds) == 1:
        return [batch]

    def exact(i: int, j: int) -> float:
        return cost(i, j, len(pack_rows(lengths[i:j], lengths[j - 1])) if packed else j - i)

    if sum(exact(i, j) for i, j in bounds) >= exact(0, n):
        return [batch]
    return [order[i:j] for i, j in reversed(bounds)]


def rows_at_least(lengths: list[int], prefix: list[int], i: int, j: int) -> int:
    """A lower bound on the rows `pack_rows` makes of lengths[i:j] (sorted ascending; `prefix` their running
    sums) at the width of the longest: the total over the width, and one row per example over half of it."""
    width = lengths[j - 1]
    return max(-(-(prefix[j] - prefix[i]) // width), j - max(i, bisect.bisect_right(lengths, width // 2)))


def _padded(batch: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    import torch  # lazy: importing this module must stay cheap for tools that only count

    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` per row, no row over `width` (ties by index: deterministic)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def _packed(batch: list[Example], pad_id: int, width: int | None = None) -> dict[str, Any]:
    """Examples packed into rows (as wide as the longest, or `width`); the padding at a row's end carries on
    the positions of the row's last example, with labels -100.

    Carrying on (not restarting at 0) changes nothing a real token sees: attention is causal, so no real
    token attends to a later position, and the padding has no labels. What it buys:
    a micro-batch whose rows each hold one example (length-grouped batches mostly are) has plain
    0..width-1 positions per row, so transformers builds no block mask and SDPA runs its causal kernel,
    which skips the upper triangle (docs/PERFORMANCE.md, "Rows of one example attend causally").
    Rows holding several examples still get the block-diagonal mask from the restarting positions."""
    import torch

    width = width or max(len(ex.input_ids) for ex in batch)
    rows = pack_rows([len(ex.input_ids) for ex in batch], width)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ex, n = batch[i], len(batch[i].input_ids)
            input_ids[r, at:at + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[r, at:at + n] = torch.tensor(ex.labels, dtype=torch.long)
            # An example's first label is never a target of its own (position t predicts t+1); packed, it
            # would be the target of the previous example's last token: no loss across examples either.
            labels[r, at] = IGNORE
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        last = len(batch[members[-1]].input_ids)
        position_ids[r, at:] = torch.arange(last, last + width - at)  # the padding tail: see the docstring
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
