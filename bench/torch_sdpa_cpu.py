#!/usr/bin/env python3
"""PyTorch CPU scaled_dot_product_attention on the shape bench_attention uses, for a side-by-side.

    python3 bench/torch_sdpa_cpu.py [--threads 2] [--n 8192] [--repeats 3]

FLOPs are counted as in bench_attention: 4·N²·D·H for the forward, 2.5× that for forward +
backward. Prints one line per (dtype, pass) with the median time of `repeats` runs after a warm-up.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats):
    fn()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, H, N, D = args.batch, args.heads, args.n, args.dim
    flops_fwd = 4.0 * N * N * D * H * B
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B={B} H={H} N={N} D={D}")
    print(f"{'dtype':<10} {'pass':<10} {'ms':>10} {'GFLOP/s':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(3))

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)

        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        dout = torch.randn(B, H, N, D, dtype=dtype)

        def fwd_bwd():
            out = F.scaled_dot_product_attention(qg, kg, vg)
            out.backward(dout)

        name = str(dtype).replace("torch.", "")
        for label, fn, flops in (("fwd", fwd, flops_fwd), ("fwd+bwd", fwd_bwd, 2.5 * flops_fwd)):
            t = timed(fn, args.repeats)
            print(f"{name:<10} {label:<10} {t * 1e3:>10.1f} {flops / t / 1e9:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
