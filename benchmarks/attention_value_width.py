"""Would narrower values make SAM 2.1's memory cross-attention cheaper on this CPU?

In the memory cross-attention every value is a linear map of a 64-wide memory token,
``v = m Wv^T + bv`` (256 wide), and each row of attention weights sums to 1, so
``softmax(q k^T) v = (softmax(q k^T) m) Wv^T + bv``: attending over the 64-wide memories
and projecting afterwards is exact and needs a quarter of the multiply-adds in the
weights-times-values product. Whether it is *faster* depends on the kernel: this script
times, on the shapes of one tracked frame (4096 queries of 256 channels; 1 to 7 memory
frames of 4096 tokens each plus 16 pointer tokens; one head), in float32 on ``--threads``
threads:

- ``sdpa``: ``F.scaled_dot_product_attention`` with 256-wide values (what both the
  official code and ours run; the value projection is timed with it);
- ``sdpa v64``: the same call with the 64-wide memories as values, then the projection;
- ``chunked v64``: query blocks through plain matrix products and a softmax, 64-wide
  values, then the projection.

Prints the median seconds of ``--repeats`` calls and the largest difference of the two
factored outputs from ``sdpa`` (relative to its largest value)::

    .venv/bin/python benchmarks/attention_value_width.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

TOKENS, WIDTH, MEMORY_WIDTH, POINTERS = 4096, 256, 64, 16


def timed(fn, args: tuple, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def chunked(q: torch.Tensor, k: torch.Tensor, m: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) m, ``rows`` queries at a time: (1, 1, N, 64)."""
    out = q.new_empty(*q.shape[:-1], m.shape[-1])
    kt = k.transpose(-1, -2) * q.shape[-1] ** -0.5
    for s in range(0, q.shape[-2], rows):
        weights = torch.softmax(q[..., s : s + rows, :] @ kt, dim=-1)
        torch.matmul(weights, m, out=out[..., s : s + rows, :])
    return out


def full(q, k, m, w_v, b_v):
    return F.scaled_dot_product_attention(q, k, F.linear(m, w_v, b_v))


def narrow(q, k, m, w_v, b_v):
    return F.linear(F.scaled_dot_product_attention(q, k, m), w_v, b_v)


def blocks(q, k, m, w_v, b_v):
    return F.linear(chunked(q, k, m), w_v, b_v)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 3, 7], help="memory frames to time")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    w_v = torch.randn(WIDTH, MEMORY_WIDTH, generator=g) / MEMORY_WIDTH**0.5
    b_v = torch.randn(WIDTH, generator=g)
    print(f"torch {torch.__version__}, {a.threads} thread(s), float32; median of {a.repeats}; seconds per call")
    print(f"{'memory frames':>13} {'keys':>6} {'sdpa':>8} {'sdpa v64':>9} {'chunked v64':>12} {'max rel diff':>13}")
    with torch.inference_mode():
        for frames in a.frames:
            keys = frames * TOKENS + POINTERS
            q = torch.randn(1, 1, TOKENS, WIDTH, generator=g)
            k = torch.randn(1, 1, keys, WIDTH, generator=g)
            m = torch.randn(1, 1, keys, MEMORY_WIDTH, generator=g)
            args = (q, k, m, w_v, b_v)
            (t_full, want), (t_narrow, got_a), (t_blocks, got_b) = (timed(f, args, a.repeats)
                                                                    for f in (full, narrow, blocks))
            scale = want.abs().max().item()
            diff = max((got - want).abs().max().item() for got in (got_a, got_b)) / scale
            print(f"{frames:>13} {keys:>6} {t_full:8.3f} {t_narrow:9.3f} {t_blocks:12.3f} {diff:13.1e}")


if __name__ == "__main__":
    main()
