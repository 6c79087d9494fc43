// Segment-tree kernels of the GPU engine: the same algorithm and row layout as
// engine_core/summary.py and fallback/series.py, one thread per output row or per query.
//
// Why one thread per output (no shared memory, no warp shuffles): each output is
// independent, so a launch covers every block, parent or query of a request at once,
// and the tests run this very file on the CPU (tests/engine/emulated_device.py compiles
// it as C++ and runs the threads in turn). Compiled with --fmad=false on the GPU so the
// products round the way they do on the CPU.
//
// A series is described by its directory, one int64 array on the device:
//   [0] levels (value level included)   [1] block   [2] fanout
//   [3 + 4*i ...] per level i: span, log2(rows_per_page), first_page, table_offset
//   [table_offset + p] device address of page (first_page + p) of that level
// Level 0 holds raw float64 values; levels >= 1 hold rows of six float64
// (count, ref, mean, M2, min, max) where the node's mean is ref + mean (anchored means;
// see engine_core/summary.py for why; this is its SUMMARY_ROW_VERSION 1). Positions are
// absolute indices, as in the numpy engine.

#define ROW_WIDTH 6
#define COUNT 0
#define REF 1
#define MEAN 2
#define M2 3
#define MIN 4
#define MAX 5

typedef long long i64;

// +inf by its bit pattern: NVRTC has no math.h (the CPU build defines this intrinsic).
#define POS_INF __longlong_as_double(0x7ff0000000000000LL)

__device__ __forceinline__ i64 dir_level(const i64* dir, int level, int field) {
    return dir[3 + 4 * level + field];
}

// Address of row `row` of `level`. The caller guarantees the row lies in an allocated page.
// Pages hold a power of two of rows: a shift and a mask, not a 64-bit division, per row read.
__device__ __forceinline__ double* level_row(const i64* dir, int level, i64 row) {
    i64 shift = dir_level(dir, level, 1);
    i64 page = row >> shift;
    i64 offset = row & ((1LL << shift) - 1);
    const i64* table = dir + dir_level(dir, level, 3);
    double* base = (double*)table[page - dir_level(dir, level, 2)];
    return base + offset * (level == 0 ? 1 : ROW_WIDTH);
}

// Level 1: summarize whole blocks [first, first + count) from the raw values.
extern "C" __global__ void summarize_blocks(const i64* dir, i64 first, i64 count) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    i64 block = dir[1];
    i64 b = first + i;
    const double* v = level_row(dir, 0, b * block);  // chunk >= block: one page
    double ref = v[0];
    double sum = 0.0, lo = v[0], hi = v[0];
    for (i64 j = 0; j < block; ++j) {
        sum += v[j] - ref;
        lo = fmin(lo, v[j]);
        hi = fmax(hi, v[j]);
    }
    double mean = sum * (1.0 / (double)block);  // exact scaling: block is a power of two
    double m2 = 0.0;
    for (i64 j = 0; j < block; ++j) {
        double d = (v[j] - ref) - mean;
        m2 += d * d;
    }
    double* out = level_row(dir, 1, b);
    out[COUNT] = (double)block;
    out[REF] = ref;
    out[MEAN] = mean;
    out[M2] = m2;
    out[MIN] = lo;
    out[MAX] = hi;
}

// Level `level` >= 2: recompute parents [first, first + count) from their `fanout`
// children. A parent is anchored at its first child's ref; IDENTITY children (count 0,
// min +inf, max -inf) carry no weight, so a group of them merges to IDENTITY again.
extern "C" __global__ void merge_groups(const i64* dir, i64 level, i64 first, i64 count) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    i64 fanout = dir[2];
    i64 parent = first + i;
    // Siblings never cross a page: every page holds a multiple of fanout rows.
    const double* c = level_row(dir, (int)level - 1, parent * fanout);
    double ref = c[REF];
    double n = 0.0, weighted = 0.0, m2 = 0.0, lo = POS_INF, hi = -POS_INF;
    for (i64 k = 0; k < fanout; ++k) {
        const double* row = c + k * ROW_WIDTH;
        double mean_k = (row[REF] - ref) + row[MEAN];
        n += row[COUNT];
        weighted += row[COUNT] * mean_k;
        m2 += row[M2];
        lo = fmin(lo, row[MIN]);
        hi = fmax(hi, row[MAX]);
    }
    double mean = weighted / fmax(n, 1.0);
    for (i64 k = 0; k < fanout; ++k) {
        const double* row = c + k * ROW_WIDTH;
        double d = ((row[REF] - ref) + row[MEAN]) - mean;
        m2 += row[COUNT] * d * d;
    }
    double* out = level_row(dir, (int)level, parent);
    out[COUNT] = n;
    out[REF] = ref;
    out[MEAN] = mean;
    out[M2] = m2;
    out[MIN] = lo;
    out[MAX] = hi;
}

// Accumulates one window in two passes, as engine_core/summary.py `combine` does: pass 0 sums
// deviations from the anchor (and takes min/max), pass 1 sums squared deviations from the
// window mean. Raw values and node rows go through the same two formulas as on the CPU.
struct Window {
    int pass;
    bool anchored;
    double anchor, n, total, mean, m2, lo, hi;

    __device__ void value(double x) {
        if (pass == 0) {
            n += 1.0;
            total += x - anchor;
            lo = fmin(lo, x);
            hi = fmax(hi, x);
        } else {
            double d = (x - anchor) - mean;
            m2 += d * d;
        }
    }

    __device__ void row(const double* r) {
        if (!anchored) {  // a window of whole nodes only: anchor at its first node
            anchor = r[REF];
            anchored = true;
        }
        double node_mean = (r[REF] - anchor) + r[MEAN];
        if (pass == 0) {
            n += r[COUNT];
            total += r[COUNT] * node_mean;
            lo = fmin(lo, r[MIN]);
            hi = fmax(hi, r[MAX]);
        } else {
            double d = node_mean - mean;
            m2 += r[M2] + r[COUNT] * d * d;
        }
    }
};

__device__ void visit_values(const i64* dir, i64 lo, i64 hi, Window& w) {
    for (i64 i = lo; i < hi; ++i) w.value(*level_row(dir, 0, i));
}

__device__ void visit_rows(const i64* dir, int level, i64 lo, i64 hi, Window& w) {
    for (i64 i = lo; i < hi; ++i) w.row(level_row(dir, level, i));
}

// The values [start, end) as SegmentTreeSeries._window_parts splits them: raw values at the
// old edge up to a block boundary, then at each level the siblings up to the parent
// boundary (the top level: every node up to the last whole block), then the raw values of
// the newest partial block. A node containing an evicted value is never read: the start
// is rounded up at every level.
__device__ void visit_window(const i64* dir, i64 start, i64 end, Window& w) {
    i64 block = dir[1], fanout = dir[2];
    int top = (int)dir[0] - 1;
    i64 full_end = end - end % block;
    i64 raw_end = (start + block - 1) / block * block;
    if (raw_end > end) raw_end = end;
    if (raw_end >= full_end) {
        visit_values(dir, start, end, w);
        return;
    }
    visit_values(dir, start, raw_end, w);
    i64 index = raw_end / block;
    for (int depth = 1; depth <= top; ++depth) {
        i64 span = dir_level(dir, depth, 0);
        i64 nodes = (full_end + span - 1) / span;
        if (depth == top) {
            visit_rows(dir, depth, index, nodes, w);
            break;
        }
        i64 boundary = (index + fanout - 1) / fanout * fanout;
        if (boundary > nodes) boundary = nodes;
        if (boundary > index) visit_rows(dir, depth, index, boundary, w);
        if (boundary == nodes) break;
        index = boundary / fanout;
    }
    visit_values(dir, full_end, end, w);
}

// One thread per query. queries: (n, 3) int64 rows of (directory address, end, count), with
// 1 <= count <= the series' length. out: (n, 5) float64 rows of (count, mean, M2, min, max).
extern "C" __global__ void window_stats(const i64* queries, double* out, i64 n_queries) {
    i64 q = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= n_queries) return;
    const i64* dir = (const i64*)queries[3 * q];
    i64 end = queries[3 * q + 1];
    i64 start = end - queries[3 * q + 2];
    i64 block = dir[1];
    i64 full_end = end - end % block;
    i64 raw_end = (start + block - 1) / block * block;
    if (raw_end > end) raw_end = end;
    Window w;
    w.pass = 0;
    w.n = w.total = w.m2 = w.mean = 0.0;
    w.lo = POS_INF;
    w.hi = -POS_INF;
    // The CPU anchors at the first raw value of the window (its old edge, else the newest
    // partial block) and only without raw values at the first node.
    w.anchored = true;
    if (start < raw_end) {
        w.anchor = *level_row(dir, 0, start);
    } else if (full_end < end) {
        w.anchor = *level_row(dir, 0, full_end);
    } else {
        w.anchored = false;
        w.anchor = 0.0;
    }
    visit_window(dir, start, end, w);
    w.mean = w.total / w.n;
    w.pass = 1;
    visit_window(dir, start, end, w);
    double* o = out + 5 * q;
    o[0] = w.n;
    o[1] = w.anchor + w.mean;
    o[2] = w.m2;
    o[3] = w.lo;
    o[4] = w.hi;
}

// OHLC bars (GET /history/bars; engine_core/bars.py is the reference). One thread per bar:
// bar b is values[offsets[b], offsets[b + 1]), never empty. out: (bars, 6) float64 rows of
// (open, high, low, close, avg, var). Anchored at the open, two passes: the mean of the
// deviations, then M2 around it, so 1e9-scale prices keep their variance.
extern "C" __global__ void bar_summaries(const double* values, const i64* offsets, double* out,
                                         i64 bars) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= bars) return;
    i64 lo = offsets[b], hi = offsets[b + 1];
    double open = values[lo];
    double sum = 0.0, low = open, high = open;
    for (i64 i = lo; i < hi; ++i) {
        double v = values[i];
        sum += v - open;
        low = fmin(low, v);
        high = fmax(high, v);
    }
    double n = (double)(hi - lo);
    double mean = sum / n;
    double m2 = 0.0;
    for (i64 i = lo; i < hi; ++i) {
        double d = (values[i] - open) - mean;
        m2 += d * d;
    }
    double* o = out + 6 * b;
    o[0] = open;
    o[1] = high;
    o[2] = low;
    o[3] = values[hi - 1];
    o[4] = open + mean;
    o[5] = m2 / n;
}

// ---- Rolling statistics (GET /history/rolling; engine_core/rolling.py is the reference) ----
//
// Min, max, avg and var of the `window` values ending at p = window - 1 + m * step, for each
// output m. The blocked (van Herk / Gil-Werman) algorithm of engine_core/rolling.py: cut the
// values into W-blocks of `window`; a window that does not start a W-block is the suffix of
// W-block b from its start s plus the prefix of W-block b + 1 up to p. To keep one thread per
// item, each W-block is cut into tiles of `tile` values (the last tile of a W-block may be
// shorter), and three launches follow:
//   rolling_tiles    one thread per tile: Welford prefix and suffix summaries of every
//                    position within its tile (pre/suf: 4 doubles per value: mean, M2, min,
//                    max; the prefix anchored at the tile's first value, the suffix at its
//                    last, counts implied by the position)
//   rolling_carries  one thread per W-block: per tile, the merged summary of the tiles
//                    before it (prefix carry) and after it (suffix carry) in its W-block,
//                    as summary rows (count, ref, mean, M2, min, max)
//   rolling_outputs  one thread per output: suffix(s) = in-tile suffix + suffix carry,
//                    prefix(p) = prefix carry + in-tile prefix, merged (Chan's formula).
// Every merge shifts the second part's mean by the anchors' difference, an exact subtraction
// of two prices, so 1e9-scale prices keep their 1e-3 noise (engine_core/summary.py).

struct Part {
    double n, ref, mean, m2, lo, hi;  // mean is relative to ref, as in a summary row
};

__device__ __forceinline__ Part part_empty() {
    Part p;
    p.n = 0.0;
    p.ref = 0.0;
    p.mean = 0.0;
    p.m2 = 0.0;
    p.lo = POS_INF;
    p.hi = -POS_INF;
    return p;
}

// a then b (a's values come first); anchored at a's ref unless a is empty.
__device__ __forceinline__ Part part_merge(Part a, Part b) {
    if (b.n == 0.0) return a;
    if (a.n == 0.0) return b;
    double n = a.n + b.n;
    double delta = ((b.ref - a.ref) + b.mean) - a.mean;
    Part out;
    out.n = n;
    out.ref = a.ref;
    out.mean = a.mean + delta * (b.n / n);
    out.m2 = (a.m2 + b.m2) + delta * delta * (a.n * b.n / n);
    out.lo = fmin(a.lo, b.lo);
    out.hi = fmax(a.hi, b.hi);
    return out;
}

__device__ __forceinline__ Part part_load(const double* four, double n, double ref) {
    Part p;
    p.n = n;
    p.ref = ref;
    p.mean = four[0];
    p.m2 = four[1];
    p.lo = four[2];
    p.hi = four[3];
    return p;
}

__device__ __forceinline__ Part part_row(const double* row) {
    Part p;
    p.n = row[COUNT];
    p.ref = row[REF];
    p.mean = row[MEAN];
    p.m2 = row[M2];
    p.lo = row[MIN];
    p.hi = row[MAX];
    return p;
}

__device__ __forceinline__ void part_store(double* row, Part p) {
    row[COUNT] = p.n;
    row[REF] = p.ref;
    row[MEAN] = p.mean;
    row[M2] = p.m2;
    row[MIN] = p.lo;
    row[MAX] = p.hi;
}

// Tile g's values: [*lo, *hi), empty past the end of the values.
__device__ __forceinline__ void rolling_tile_bounds(i64 g, i64 n, i64 window, i64 tile,
                                                    i64* lo, i64* hi) {
    i64 per_block = (window + tile - 1) / tile;
    i64 b = g / per_block;
    i64 start = b * window + (g - b * per_block) * tile;
    i64 end = start + tile;
    if (end > b * window + window) end = b * window + window;
    if (end > n) end = n;
    *lo = start;
    *hi = end > start ? end : start;
}

extern "C" __global__ void rolling_tiles(const double* values, double* pre, double* suf, i64 n,
                                         i64 window, i64 tile, i64 tiles) {
    i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= tiles) return;
    i64 lo, hi;
    rolling_tile_bounds(g, n, window, tile, &lo, &hi);
    if (lo >= hi) return;
    double anchor = values[lo], mean = 0.0, m2 = 0.0, low = anchor, high = anchor;
    for (i64 i = lo; i < hi; ++i) {  // Welford, forwards
        double x = values[i];
        double d = x - anchor;
        double delta = d - mean;
        mean += delta / (double)(i - lo + 1);
        m2 += delta * (d - mean);
        low = fmin(low, x);
        high = fmax(high, x);
        double* o = pre + 4 * i;
        o[0] = mean;
        o[1] = m2;
        o[2] = low;
        o[3] = high;
    }
    anchor = values[hi - 1];
    mean = 0.0;
    m2 = 0.0;
    low = anchor;
    high = anchor;
    for (i64 i = hi - 1; i >= lo; --i) {  // Welford, backwards
        double x = values[i];
        double d = x - anchor;
        double delta = d - mean;
        mean += delta / (double)(hi - i);
        m2 += delta * (d - mean);
        low = fmin(low, x);
        high = fmax(high, x);
        double* o = suf + 4 * i;
        o[0] = mean;
        o[1] = m2;
        o[2] = low;
        o[3] = high;
    }
}

// carries: (tiles, 2, 6): [g][0] merges the tiles before g in its W-block, [g][1] those after.
extern "C" __global__ void rolling_carries(const double* values, const double* pre,
                                           double* carries, i64 n, i64 window, i64 tile,
                                           i64 blocks) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    i64 per_block = (window + tile - 1) / tile;
    i64 first = b * per_block;
    Part acc = part_empty();
    for (i64 g = first; g < first + per_block; ++g) {
        part_store(carries + 12 * g, acc);
        i64 lo, hi;
        rolling_tile_bounds(g, n, window, tile, &lo, &hi);
        if (lo < hi) acc = part_merge(acc, part_load(pre + 4 * (hi - 1), (double)(hi - lo), values[lo]));
    }
    acc = part_empty();
    for (i64 g = first + per_block - 1; g >= first; --g) {
        part_store(carries + 12 * g + 6, acc);
        i64 lo, hi;
        rolling_tile_bounds(g, n, window, tile, &lo, &hi);
        if (lo < hi) acc = part_merge(part_load(pre + 4 * (hi - 1), (double)(hi - lo), values[lo]), acc);
    }
}

// out: (4, outputs): the columns min, max, avg, var.
extern "C" __global__ void rolling_outputs(const double* values, const double* pre,
                                           const double* suf, const double* carries,
                                           double* out, i64 window, i64 tile, i64 step,
                                           i64 outputs) {
    i64 m = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= outputs) return;
    i64 per_block = (window + tile - 1) / tile;
    i64 p = window - 1 + m * step;
    i64 s = p - window + 1;
    // prefix(p): the tiles before p's in its W-block, then p's tile up to p
    i64 b = p / window;
    i64 t = (p - b * window) / tile;
    i64 lo = b * window + t * tile;
    Part part = part_merge(part_row(carries + 12 * (b * per_block + t)),
                           part_load(pre + 4 * p, (double)(p - lo + 1), values[lo]));
    if (s % window != 0) {  // else the window is p's W-block, whole
        // suffix(s): s's tile from s, then the tiles after it in its (full) W-block
        i64 bs = s / window;
        i64 ts = (s - bs * window) / tile;
        i64 hi = bs * window + ts * tile + tile;
        if (hi > bs * window + window) hi = bs * window + window;
        Part head = part_merge(part_load(suf + 4 * s, (double)(hi - s), values[hi - 1]),
                               part_row(carries + 12 * (bs * per_block + ts) + 6));
        part = part_merge(head, part);
    }
    // column-major: each statistic's column is contiguous, so the host uses it as it lands
    out[m] = part.lo;
    out[outputs + m] = part.hi;
    out[2 * outputs + m] = part.ref + part.mean;
    out[3 * outputs + m] = part.m2 / (double)window;
}
