"""Compiled (numba) kernels of the segment tree: the `cpu` engine's arithmetic.

Same layout, same formulas and same visiting order as the numpy reference (`engine_core.summary`
for the row and its arithmetic, `fallback.series` for the pyramid), but each operation is one
compiled call that releases the GIL: a window query or a 1-value tick costs well under a
microsecond of work after a ~0.3 us call, where the numpy engine pays a dozen array calls.

Why raw page addresses: a compiled function that receives a list of page arrays unboxes every
element on every call (5 us for 64 pages, see shared/notes/compiled-core.md), more than the whole
query. So each series keeps a *page directory*, an int64 array `directory[level, slot]` holding
the address of page `number` of that level at `slot = number & slot_mask`, and the kernels read
pages through it. The Python side owns the page arrays (and so their lifetime); the directory
only mirrors it. Safety rests on the invariants of `fallback.series`: the kernels only ever read
rows and values at or after the window start (never in a page that retention dropped), appends
only write at the tail (in pages reserved before the call), and no two live pages of a level
share a slot (the owner grows the directory before that could happen).

Numerics: the window query anchors exactly as `engine_core.summary.combine` does (the first raw
value of the window, else the first node's REF) and sums in two passes (count and deviation
sum, then M2), so avg and var match the numpy engine to rounding (the summation order differs:
sequential here, pairwise in numpy); min, max, last and count are selections and match bit for
bit.

The integer `shape` vector describes the geometry as shifts (every size is a power of two):
see the `SHAPE_*` indices and `shape_vector`.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

from engine_core.contract import (
    STATS_AVG,
    STATS_COUNT,
    STATS_LAST,
    STATS_MAX,
    STATS_MIN,
    STATS_VAR,
)
from engine_core.summary import COUNT, M2, MAX, MEAN, MIN, REF, ROW_WIDTH

# Indices into the int64 shape vector. Per level d (0 = raw values, 1..top = summaries):
# SHAPE_LEVELS + 2*d holds log2(rows per page), SHAPE_LEVELS + 2*d + 1 holds log2(span).
SHAPE_BLOCK_SHIFT = 0
SHAPE_FANOUT_SHIFT = 1
SHAPE_CHUNK_SHIFT = 2
SHAPE_TOP = 3
SHAPE_SLOT_MASK = 4
SHAPE_LEVELS = 5


# Indices into a series' int64 state vector, read and advanced by `append_fast`.
STATE_HEAD = 0  # absolute index of the oldest retained value
STATE_END = 1  # one past the newest value
STATE_RESERVED_END = 2  # every page of every level is in the directory below this index
STATE_MAX_VALUES = 3  # the retention bound
STATE_KEEP = 4  # values kept by a cleanup
STATE_DIRECTORY_AT = 5  # where the page directory starts in the control block

# The control block: one int64 array per series holding all the kernels read, so that a call
# from Python passes one array (numba unboxes every array argument, ~0.1 us each):
#   [0, CONTROL_SHAPE)              the state (STATE_*)
#   [CONTROL_SHAPE, directory at)   the shape vector (SHAPE_*)
#   [directory at, + levels*slots)  the page directory, row-major by level
CONTROL_SHAPE = 8


def control_block(state: np.ndarray, shape: np.ndarray, levels: int, slots: int) -> np.ndarray:
    """A control block holding `state` and `shape`, with an empty directory of `slots` slots
    per level (shape[SHAPE_SLOT_MASK] must be slots - 1)."""
    directory_at = CONTROL_SHAPE + shape.shape[0]
    control = np.zeros(directory_at + levels * slots, dtype=np.int64)
    control[: state.shape[0]] = state
    control[STATE_DIRECTORY_AT] = directory_at
    control[CONTROL_SHAPE:directory_at] = shape
    return control


def control_views(control: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(state, shape, directory) views of a control block (Python side)."""
    directory_at = int(control[STATE_DIRECTORY_AT])
    shape = control[CONTROL_SHAPE:directory_at]
    levels = int(shape[SHAPE_TOP]) + 1
    return control[:CONTROL_SHAPE], shape, control[directory_at:].reshape(levels, -1)


def shape_vector(
    block: int, fanout: int, chunk: int, rows_per_page: list[int], spans: list[int], slots: int
) -> np.ndarray:
    """The shape vector for a pyramid whose levels 0..top have these rows per page and spans
    (level 0: `chunk` rows of span 1). Every size must be a power of two."""
    shape = np.zeros(SHAPE_LEVELS + 2 * len(spans), dtype=np.int64)
    shape[SHAPE_BLOCK_SHIFT] = block.bit_length() - 1
    shape[SHAPE_FANOUT_SHIFT] = fanout.bit_length() - 1
    shape[SHAPE_CHUNK_SHIFT] = chunk.bit_length() - 1
    shape[SHAPE_TOP] = len(spans) - 1
    shape[SHAPE_SLOT_MASK] = slots - 1
    for depth, (rows, span) in enumerate(zip(rows_per_page, spans, strict=True)):
        shape[SHAPE_LEVELS + 2 * depth] = rows.bit_length() - 1
        shape[SHAPE_LEVELS + 2 * depth + 1] = span.bit_length() - 1
    return shape


def _pointer_intrinsic(dtype):
    """An intrinsic turning an int64 address into a `dtype` pointer (an LLVM inttoptr; no
    check, no cost): the kernels read pages and control blocks through raw addresses."""

    def pointer(typingctx, address):
        if not isinstance(address, types.Integer):
            return None
        sig = types.CPointer(dtype)(address)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    pointer.__name__ = f"_{dtype}_pointer"
    return intrinsic(pointer)


_f64_pointer = _pointer_intrinsic(types.float64)
_i64_pointer = _pointer_intrinsic(types.int64)


@njit(nogil=True, inline="always")
def _views(control):
    """(directory, shape) views of a control block, as the kernels take them."""
    directory_at = control[STATE_DIRECTORY_AT]
    shape = control[CONTROL_SHAPE:directory_at]
    levels = shape[SHAPE_TOP] + 1
    slots = shape[SHAPE_SLOT_MASK] + 1
    directory = control[directory_at : directory_at + levels * slots].reshape((levels, slots))
    return directory, shape


@njit(nogil=True, inline="always")
def _page(directory, shape, depth, number):
    return _f64_pointer(directory[depth, number & shape[SHAPE_SLOT_MASK]])


@njit(nogil=True, inline="always")
def _value_at(directory, shape, index):
    shift = shape[SHAPE_CHUNK_SHIFT]
    return _page(directory, shape, 0, index >> shift)[index & ((1 << shift) - 1)]


@njit(nogil=True, inline="always")
def _row_slot(directory, shape, depth, row):
    """(page pointer, element offset of the row) for `row` of summary level `depth`."""
    shift = shape[SHAPE_LEVELS + 2 * depth]
    page = _page(directory, shape, depth, row >> shift)
    return page, (row & ((1 << shift) - 1)) * ROW_WIDTH


# -- query ----------------------------------------------------------------------------------


@njit(nogil=True, inline="always")
def _raw_sums(page, lo, hi, anchor):
    """(sum of x - anchor, min, max) of page[lo:hi], hi > lo, in eight interleaved lanes: one
    running sum is a chain of dependent adds (4 cycles each); eight lanes run in parallel and
    fix the order of the additions, so a result never depends on the machine's vector width."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    low0 = low1 = high0 = high1 = page[lo]
    j = lo
    while j + 8 <= hi:
        x0 = page[j]
        x1 = page[j + 1]
        x2 = page[j + 2]
        x3 = page[j + 3]
        x4 = page[j + 4]
        x5 = page[j + 5]
        x6 = page[j + 6]
        x7 = page[j + 7]
        s0 += x0 - anchor
        s1 += x1 - anchor
        s2 += x2 - anchor
        s3 += x3 - anchor
        s4 += x4 - anchor
        s5 += x5 - anchor
        s6 += x6 - anchor
        s7 += x7 - anchor
        low0 = min(low0, min(min(x0, x1), min(x2, x3)))
        low1 = min(low1, min(min(x4, x5), min(x6, x7)))
        high0 = max(high0, max(max(x0, x1), max(x2, x3)))
        high1 = max(high1, max(max(x4, x5), max(x6, x7)))
        j += 8
    while j < hi:
        x = page[j]
        s0 += x - anchor
        low0 = min(low0, x)
        high0 = max(high0, x)
        j += 1
    total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    return total, min(low0, low1), max(high0, high1)


@njit(nogil=True, inline="always")
def _raw_squares(page, lo, hi, center):
    """Sum of (x - anchor - mean)**2 over page[lo:hi] in eight lanes (see `_raw_sums`), with
    center = (anchor, mean): (x - anchor) - mean, the same two roundings combine() makes."""
    anchor, mean = center
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    j = lo
    while j + 8 <= hi:
        d0 = (page[j] - anchor) - mean
        d1 = (page[j + 1] - anchor) - mean
        d2 = (page[j + 2] - anchor) - mean
        d3 = (page[j + 3] - anchor) - mean
        d4 = (page[j + 4] - anchor) - mean
        d5 = (page[j + 5] - anchor) - mean
        d6 = (page[j + 6] - anchor) - mean
        d7 = (page[j + 7] - anchor) - mean
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        s4 += d4 * d4
        s5 += d5 * d5
        s6 += d6 * d6
        s7 += d7 * d7
        j += 8
    while j < hi:
        d = (page[j] - anchor) - mean
        s0 += d * d
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(nogil=True)
def _raw_pass(directory, shape, lo, hi, anchor, mean, first_pass, acc):
    """Fold raw values [lo, hi) into `acc` = (count, deviation sum, min, max, M2): counts,
    sums and extremes on the first pass, squared deviations from the mean on the second."""
    count, total, low, high, m2 = acc
    shift = shape[SHAPE_CHUNK_SHIFT]
    chunk = 1 << shift
    while lo < hi:
        offset = lo & (chunk - 1)
        take = min(hi - lo, chunk - offset)
        page = _page(directory, shape, 0, lo >> shift)
        if first_pass:
            part, part_low, part_high = _raw_sums(page, offset, offset + take, anchor)
            count += take
            total += part
            low = min(low, part_low)
            high = max(high, part_high)
        else:
            m2 += _raw_squares(page, offset, offset + take, (anchor, mean))
        lo += take
    return count, total, low, high, m2


@njit(nogil=True)
def _rows_pass(directory, shape, depth, lo, hi, anchor, mean, first_pass, acc):
    """Fold summary rows [lo, hi) of level `depth` (possibly across pages) into `acc`; see
    `_raw_pass`."""
    count, total, low, high, m2 = acc
    shift = shape[SHAPE_LEVELS + 2 * depth]
    rows_per_page = 1 << shift
    while lo < hi:
        offset = lo & (rows_per_page - 1)
        take = min(hi - lo, rows_per_page - offset)
        page = _page(directory, shape, depth, lo >> shift)
        for r in range(offset, offset + take):
            base = r * ROW_WIDTH
            weight = page[base + COUNT]
            # The node's mean relative to the window's anchor, as combine() forms it.
            dev = (page[base + REF] - anchor) + page[base + MEAN]
            if first_pass:
                count += weight
                total += weight * dev
                low = min(low, page[base + MIN])
                high = max(high, page[base + MAX])
            else:
                dev -= mean
                m2 += page[base + M2] + weight * (dev * dev)
        lo += take
    return count, total, low, high, m2


@njit(nogil=True)
def _visit(directory, shape, start, end, anchor, mean, first_pass, acc):
    """Visit [start, end) as `fallback.series._window_parts` splits it: raw values at the old
    edge and in the newest partial block, and the fewest whole nodes between them (sibling
    runs up to each parent boundary, then one level up; the top level's run may cross pages).
    """
    block_shift = shape[SHAPE_BLOCK_SHIFT]
    block = 1 << block_shift
    fanout_shift = shape[SHAPE_FANOUT_SHIFT]
    fanout = 1 << fanout_shift
    top = shape[SHAPE_TOP]
    full_end = end - (end & (block - 1))
    raw_end = min(((start + block - 1) >> block_shift) << block_shift, end)
    if raw_end >= full_end:
        return _raw_pass(directory, shape, start, end, anchor, mean, first_pass, acc)
    acc = _raw_pass(directory, shape, start, raw_end, anchor, mean, first_pass, acc)
    index = raw_end >> block_shift
    for depth in range(1, top + 1):
        span_shift = shape[SHAPE_LEVELS + 2 * depth + 1]
        nodes = (full_end + (1 << span_shift) - 1) >> span_shift
        if depth == top:
            acc = _rows_pass(directory, shape, depth, index, nodes, anchor, mean, first_pass, acc)
            break
        boundary = min(((index + fanout - 1) >> fanout_shift) << fanout_shift, nodes)
        if boundary > index:
            acc = _rows_pass(
                directory, shape, depth, index, boundary, anchor, mean, first_pass, acc
            )
        if boundary == nodes:
            break
        index = boundary >> fanout_shift
    return _raw_pass(directory, shape, full_end, end, anchor, mean, first_pass, acc)


@njit(nogil=True)
def _first_node_ref(directory, shape, index):
    """REF of the first node a window with no raw values visits: block `index` when it starts
    a sibling run, else its first ancestor that does (the walk in `_visit` climbs the same)."""
    fanout_shift = shape[SHAPE_FANOUT_SHIFT]
    top = shape[SHAPE_TOP]
    depth = 1
    while depth < top and index & ((1 << fanout_shift) - 1) == 0:
        # A run that starts on a parent boundary is empty at this level: the walk steps up.
        index >>= fanout_shift
        depth += 1
    page, offset = _row_slot(directory, shape, depth, index)
    return page[offset + REF]


@njit(nogil=True)
def window_stats(directory, shape, start, end):
    """(count, mean, M2, min, max, last) of absolute values [start, end), start < end."""
    block_shift = shape[SHAPE_BLOCK_SHIFT]
    block = 1 << block_shift
    full_end = end - (end & (block - 1))
    raw_end = min(((start + block - 1) >> block_shift) << block_shift, end)
    if start < raw_end or raw_end >= full_end:
        anchor = _value_at(directory, shape, start)
    elif full_end < end:
        anchor = _value_at(directory, shape, full_end)
    else:
        anchor = _first_node_ref(directory, shape, raw_end >> block_shift)
    acc = (0.0, 0.0, np.inf, -np.inf, 0.0)
    acc = _visit(directory, shape, start, end, anchor, 0.0, True, acc)
    n, total, low, high, _ = acc
    mean = total / n
    m2 = _visit(directory, shape, start, end, anchor, mean, False, acc)[4]
    last = _value_at(directory, shape, end - 1)
    return int(n), anchor + mean, m2, low, high, last


@njit(nogil=True)
def series_window_stats(control, window):
    """`window_stats` over the newest min(window, length) values of a series (window >= 1);
    count 0 (and nothing read) when the series is empty."""
    head = control[STATE_HEAD]
    end = control[STATE_END]
    if end == head:
        return 0, 0.0, 0.0, 0.0, 0.0, 0.0
    start = end - window if window < end - head else head
    directory, shape = _views(control)
    return window_stats(directory, shape, start, end)


# -- append ---------------------------------------------------------------------------------


@njit(nogil=True, inline="always")
def _set_row(directory, shape, depth, index, row):
    """Write row `index` of level `depth`: (count, ref, mean, M2, min, max)."""
    page, base = _row_slot(directory, shape, depth, index)
    page[base + COUNT] = row[0]
    page[base + REF] = row[1]
    page[base + MEAN] = row[2]
    page[base + M2] = row[3]
    page[base + MIN] = row[4]
    page[base + MAX] = row[5]


@njit(nogil=True)
def _summarize_block(directory, shape, block_index):
    """Level-1 row of one whole block: anchored at its first value, two passes."""
    block_shift = shape[SHAPE_BLOCK_SHIFT]
    width = 1 << block_shift
    chunk_shift = shape[SHAPE_CHUNK_SHIFT]
    first = block_index << block_shift
    values = _page(directory, shape, 0, first >> chunk_shift)
    offset = first & ((1 << chunk_shift) - 1)
    ref = values[offset]
    total, low, high = _raw_sums(values, offset, offset + width, ref)
    mean = total * (1.0 / width)  # exact: width is a power of two
    m2 = _raw_squares(values, offset, offset + width, (ref, mean))
    _set_row(directory, shape, 1, block_index, (width, ref, mean, m2, low, high))


@njit(nogil=True)
def _merge_group(directory, shape, depth, parent_index):
    """Row `parent_index` of level `depth` from its `fanout` children (one page of depth-1),
    as `engine_core.summary.merge_groups`: anchored at the first child's REF; IDENTITY
    children weigh nothing."""
    fanout_shift = shape[SHAPE_FANOUT_SHIFT]
    fanout = 1 << fanout_shift
    children, base = _row_slot(directory, shape, depth - 1, parent_index << fanout_shift)
    ref = children[base + REF]
    count = 0.0
    weighted = 0.0
    m2 = 0.0
    low = np.inf
    high = -np.inf
    for c in range(fanout):
        row = base + c * ROW_WIDTH
        weight = children[row + COUNT]
        count += weight
        weighted += weight * ((children[row + REF] - ref) + children[row + MEAN])
        m2 += children[row + M2]
        low = min(low, children[row + MIN])
        high = max(high, children[row + MAX])
    mean = weighted / max(count, 1.0)
    for c in range(fanout):
        row = base + c * ROW_WIDTH
        d = ((children[row + REF] - ref) + children[row + MEAN]) - mean
        m2 += children[row + COUNT] * (d * d)
    _set_row(directory, shape, depth, parent_index, (count, ref, mean, m2, low, high))


@njit(nogil=True)
def append_fast(control, values):
    """Append `values` when every page it writes is reserved, applying the retention rule
    (`engine_core.contract.RetentionPolicy`, the same arithmetic) by moving control[STATE_HEAD].
    Returns the number of values evicted, or -1 (nothing done) when a page must be reserved
    first. Evicting only moves `head`: the caller retires the pages it leaves behind later."""
    head = control[STATE_HEAD]
    end = control[STATE_END]
    bound = control[STATE_MAX_VALUES]
    incoming = values.shape[0]
    current = end - head
    kept_old = current
    kept_new = incoming
    if current + incoming > bound:
        kept_old = min(current, control[STATE_KEEP])
        if kept_old + incoming > bound:
            if incoming >= bound:
                kept_old = 0
                kept_new = bound
            else:
                kept_old = bound - incoming
    if end + kept_new > control[STATE_RESERVED_END]:
        return -1
    directory, shape = _views(control)
    append_values(directory, shape, values[incoming - kept_new :], end)
    control[STATE_END] = end + kept_new
    control[STATE_HEAD] = end - kept_old
    return current - kept_old


@njit(nogil=True)
def fill_rows(page, row):
    """Set every row of a (rows, ROW_WIDTH) page to `row` (IDENTITY for a reused page)."""
    for r in range(page.shape[0]):
        for c in range(ROW_WIDTH):
            page[r, c] = row[c]


@njit(nogil=True)
def append_values(directory, shape, values, start):
    """Write `values` at absolute index `start` (pages reserved by the caller), summarize the
    blocks they complete and re-merge those blocks' ancestors, one chunk segment at a time."""
    block_shift = shape[SHAPE_BLOCK_SHIFT]
    fanout_shift = shape[SHAPE_FANOUT_SHIFT]
    chunk_shift = shape[SHAPE_CHUNK_SHIFT]
    chunk = 1 << chunk_shift
    top = shape[SHAPE_TOP]
    n = values.shape[0]
    done = 0
    while done < n:
        position = start + done
        offset = position & (chunk - 1)
        take = min(n - done, chunk - offset)
        page = _page(directory, shape, 0, position >> chunk_shift)
        for j in range(take):
            page[offset + j] = values[done + j]
        lo = position >> block_shift
        hi = (position + take) >> block_shift
        if hi > lo:
            for b in range(lo, hi):
                _summarize_block(directory, shape, b)
            for depth in range(2, top + 1):
                lo >>= fanout_shift
                hi = (hi + (1 << fanout_shift) - 1) >> fanout_shift
                for parent in range(lo, hi):
                    _merge_group(directory, shape, depth, parent)
        done += take


BAR_COLUMNS = 7  # open, high, low, close, count, avg, var (one row per bar)


@njit(nogil=True)
def bar_rows(values, offsets, out):
    """GET /history/bars' summaries: row i of `out` describes values[offsets[i]:offsets[i+1]]
    (the last bar up to the end). Two passes per bar anchored at its open, as
    `engine_core.bars.bar_summaries` (the numpy reference) does: the mean of deviations from
    the open, then M2 around it, so 1e9-scale prices with 1e-3 noise keep their digits. Four
    accumulation lanes per pass (the additions' order is fixed: results do not depend on the
    CPU's vector width). Not built on the window query's `_raw_sums` / `_raw_squares`: called
    here over 1e7 values they took 48 ms against this loop's 14 ms (measured 2026-12-04)."""
    n = values.shape[0]
    bars = offsets.shape[0]
    for i in range(bars):
        lo = offsets[i]
        hi = offsets[i + 1] if i + 1 < bars else n
        count = hi - lo
        first = values[lo]
        high = first
        low = first
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        j = lo
        while j + 4 <= hi:
            a, b, c, d = values[j], values[j + 1], values[j + 2], values[j + 3]
            s0 += a - first
            s1 += b - first
            s2 += c - first
            s3 += d - first
            high = max(high, max(max(a, b), max(c, d)))
            low = min(low, min(min(a, b), min(c, d)))
            j += 4
        while j < hi:
            x = values[j]
            s0 += x - first
            high = max(high, x)
            low = min(low, x)
            j += 1
        mean = ((s0 + s1) + (s2 + s3)) / count
        q0 = 0.0
        q1 = 0.0
        q2 = 0.0
        q3 = 0.0
        j = lo
        while j + 4 <= hi:
            a = values[j] - first - mean
            b = values[j + 1] - first - mean
            c = values[j + 2] - first - mean
            d = values[j + 3] - first - mean
            q0 += a * a
            q1 += b * b
            q2 += c * c
            q3 += d * d
            j += 4
        while j < hi:
            a = values[j] - first - mean
            q0 += a * a
            j += 1
        out[i, 0] = first
        out[i, 1] = high
        out[i, 2] = low
        out[i, 3] = values[hi - 1]
        out[i, 4] = count
        out[i, 5] = first + mean
        out[i, 6] = ((q0 + q1) + (q2 + q3)) / count


# -- rolling statistics (GET /history/rolling) ------------------------------------------------

# Per position of a block: the previous block's suffix mean, M2, min, max, and 1 / (position
# + 1), the Welford weights (a multiply instead of a divide in the loops' dependency chain).
ROLLING_SCRATCH_ROWS = 5


@njit(nogil=True)
def rolling_rows(values, window, step, out, scratch):
    """Rolling min, max, avg, var (the rows of `out`, shape (4, outputs)) of the `window`
    values ending at window - 1, window - 1 + step, ... (engine_core.rolling says which).

    The blocked algorithm of `engine_core.rolling.rolling_summaries` (blocks of `window`; a
    window is the suffix of block k - 1 from its start plus the prefix of block k up to its
    end, or one whole block), but streamed: block k - 1's suffixes are kept in `scratch`,
    (ROLLING_SCRATCH_ROWS, window), while one forward pass over block k carries the prefix,
    so the extra memory is O(window) and each value is read twice. The running mean moves by
    delta * (1 / count) with the reciprocals tabled once: Welford's loop is a dependency chain
    through the mean, and a multiply there costs a third of a divide (measured: 1e7 values,
    window 4e5: 190-210 ms -> 89-93 ms, benches/results/rolling-2026-12-05.md).

    Numerics: Welford updates (no sum-of-squares cancellation), the suffixes anchored at
    their block's last value, the prefixes at their block's first value; both anchors lie in
    every window that uses them, so 1e9-scale prices keep their 1e-3 noise. The parts merge
    with Chan's formula after one exact shift of the prefix mean by the anchors' difference.
    Min and max are running selections: exact.
    """
    n = values.shape[0]
    outputs = out.shape[1]
    if outputs == 0:
        return
    s_mean = scratch[0]
    s_m2 = scratch[1]
    s_min = scratch[2]
    s_max = scratch[3]
    weight = scratch[4]
    for j in range(window):
        weight[j] = 1.0 / (j + 1)
    inv_window = 1.0 / window
    m = 0
    p_next = window - 1
    blocks = (n + window - 1) // window
    for k in range(blocks):
        lo = k * window
        hi = min(lo + window, n)
        if p_next >= hi:
            continue  # no output ends in this block (step > window)
        if k >= 1 and p_next < lo + window - 1:
            # Suffixes of block k - 1, Welford from its last value backwards. (Skipped when
            # the only output here is the whole block k, which needs none.)
            base = lo - window
            anchor = values[lo - 1]
            mean = 0.0
            m2 = 0.0
            low = anchor
            high = anchor
            for t in range(window - 1, -1, -1):
                x = values[base + t]
                d = x - anchor
                delta = d - mean
                mean += delta * weight[window - 1 - t]
                m2 += delta * (d - mean)
                low = min(low, x)
                high = max(high, x)
                s_mean[t] = mean
                s_m2[t] = m2
                s_min[t] = low
                s_max[t] = high
        anchor = values[lo]
        shift = anchor - values[lo - 1] if k >= 1 else 0.0
        mean = 0.0
        m2 = 0.0
        low = anchor
        high = anchor
        for i in range(lo, hi):
            x = values[i]
            d = x - anchor
            c = i - lo + 1
            delta = d - mean
            mean += delta * weight[c - 1]
            m2 += delta * (d - mean)
            low = min(low, x)
            high = max(high, x)
            if i != p_next:
                continue
            if c == window:  # the window is block k, whole
                out[0, m] = low
                out[1, m] = high
                out[2, m] = anchor + mean
                out[3, m] = m2 * inv_window
            else:
                t = c  # the window starts at column c of block k - 1
                count_a = window - t
                mean_a = s_mean[t]
                delta = (shift + mean) - mean_a
                merged = mean_a + delta * (c * inv_window)
                out[0, m] = min(low, s_min[t])
                out[1, m] = max(high, s_max[t])
                out[2, m] = values[lo - 1] + merged
                out[3, m] = (s_m2[t] + m2 + delta * delta * (count_a * c * inv_window)) * inv_window
            m += 1
            if m == outputs:
                return
            p_next += step
            if p_next >= hi:
                break


# -- stats_table: a whole batch of window queries in one call -------------------------------


@njit(nogil=True)
def stats_table(controls, which, windows, out):
    """`Engine.stats_table` of the compiled engine: row i of `out` (n, 6) is count, min, max,
    last, avg, var of the series whose control block is at address `controls[which[i]]`, over
    its newest min(windows[i], length) values.

    Why addresses: passing 100 control blocks as a list of arrays would unbox each on every
    call (as the page directory avoids for pages); one int64 array of addresses is unboxed
    once. A control block's length is read from its own header (its directory holds
    (top + 1) * slots slots after `STATE_DIRECTORY_AT`). The caller keeps every control
    block alive and unchanged for the call (the store's symbol locks; the engine holds the
    arrays). Same arithmetic as `series_window_stats` (the same `window_stats`), so the answers
    equal `CompiledSeries.stats`'s bit for bit; var is M2 / count as there.
    """
    for i in range(which.shape[0]):
        address = controls[which[i]]
        header = carray(_i64_pointer(address), (CONTROL_SHAPE + SHAPE_LEVELS,))
        directory_at = header[STATE_DIRECTORY_AT]
        levels = header[CONTROL_SHAPE + SHAPE_TOP] + 1
        slots = header[CONTROL_SHAPE + SHAPE_SLOT_MASK] + 1
        control = carray(_i64_pointer(address), (directory_at + levels * slots,))
        n, mean, m2, lo, hi, last = series_window_stats(control, min(windows[i], 1 << 62))
        out[i, STATS_COUNT] = n
        out[i, STATS_MIN] = lo
        out[i, STATS_MAX] = hi
        out[i, STATS_LAST] = last
        out[i, STATS_AVG] = mean
        out[i, STATS_VAR] = m2 / n
