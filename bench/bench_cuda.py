#!/usr/bin/env python3
"""spattn's CUDA backend beside PyTorch's attention kernels on one shape, one table.

Peers, measured in the same run: SDPA with the FlashAttention-2 and cuDNN backends (dense), and
compiled FlexAttention (dense, and with the same random block masks spattn runs). spattn's own
timings come from the bench_cuda executable (CUDA events), whose JSON lines are merged here.

    python3 bench/bench_cuda.py --spattn build/bench/bench_cuda [--seq 32768] [--heads 12]

Block masks: a counter hash (splitmix64) of (head, query block, kv block) against the density,
identical in bench_cuda.cpp, so both sides compute exactly the same tiles. Effective TFLOP/s =
4 * N^2 * D * H * (share of the N x N grid computed), times 2.5 for forward+backward.
"""
import argparse
import json
import math
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

M64 = (1 << 64) - 1


def splitmix64(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(M64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_mask_bits(heads, nqb, nkb, density, seed, causal, bq, bk):
    """(heads, nqb, nkb) bool: kept tiles, tiles the causal rule empties removed."""
    with np.errstate(over="ignore"):
        i = np.arange(heads * nqb * nkb, dtype=np.uint64) + np.uint64(seed * 0x1000000000)
        u = (splitmix64(i) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    keep = (u < density).reshape(heads, nqb, nkb)
    if causal:
        qb = np.arange(nqb)[:, None]
        kb = np.arange(nkb)[None, :]
        keep &= (kb * bk) <= (qb * bq + bq - 1)
    return keep


def bench(fn, cooldown_s, warmup=25, rep=100):
    import triton.testing
    # Idle first, as bench_cuda does: each row starts from the same clocks instead of those the
    # previous row's load left.
    torch.cuda.synchronize()
    time.sleep(cooldown_s)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def flex_block_mask(keep, causal, bq, bk, n):
    from torch.nn.attention.flex_attention import BlockMask
    keep_t = torch.from_numpy(keep).cuda()[None]  # (1, H, nqb, nkb)
    nkb = keep.shape[-1]
    kb = torch.arange(nkb, device="cuda")
    qb = torch.arange(keep.shape[1], device="cuda")[:, None]
    # Full tiles need no mask_mod; causal diagonal tiles are partial.
    partial = keep_t & ((kb + 1) * bk - 1 > qb * bq) if causal else torch.zeros_like(keep_t)
    full = keep_t & ~partial

    def runs(m):
        num = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    pn, pi = runs(partial)
    fn_, fi = runs(full)
    mask_mod = (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx) if causal else None
    return BlockMask.from_kv_blocks(pn, pi, fn_, fi, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spattn", help="path to the bench_cuda executable")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--densities", default="0.15,0.10,0.05")
    ap.add_argument("--causal", default="both", choices=["0", "1", "both"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--spattn-blocks", default="128x64,128x128",
                    help="plan blocks spattn runs, each against FlexAttention's mask of the same "
                         "blocks")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--cooldown", type=float, default=1.0,
                    help="idle seconds before each measurement (spattn's and the peers')")
    ap.add_argument("--json-out", help="write all rows here as JSON")
    ap.add_argument("--replay", help="print the table of an earlier --json-out file, measure nothing")
    args = ap.parse_args()
    if args.cooldown < 0:
        ap.error("--cooldown must be >= 0 seconds; got %g" % args.cooldown)
    N, H, D = args.seq, args.heads, args.dim
    densities = [float(x) for x in args.densities.split(",") if x]
    causals = [False, True] if args.causal == "both" else [args.causal == "1"]
    rows = []
    if args.replay:
        with open(args.replay) as fh:
            rows = json.load(fh)
        print_table(rows, N, H, D, next((r["gpu"] for r in rows if "gpu" in r), "?"))
        return

    # spattn first (its own process, so the peers' allocations do not disturb it).
    for n, blocks in enumerate(args.spattn_blocks.split(",") if args.spattn else []):
        bq, bk = (int(x) for x in blocks.split("x"))
        cmd = [args.spattn, "--seq", str(N), "--heads", str(H), "--dim", str(D),
               "--densities", args.densities, "--causal", args.causal, "--seed", str(args.seed),
               "--block-q", str(bq), "--block-k", str(bk), "--cooldown", str(args.cooldown)]
        if n > 0:
            cmd += ["--dense", "0"]  # measured once, with the first blocks
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stdout, res.stderr, file=sys.stderr)
            rows.append({"impl": "spattn", "error": "bench_cuda failed (rc %d)" % res.returncode})
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                r["impl"] = "spattn" + (" dense" if r["density"] < 0 else " " + blocks)
                rows.append(r)

    torch.manual_seed(args.seed)
    q, k, v, do = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timed(name, causal, computed, fwd, block="", note=""):
        row = {"impl": name, "causal": int(causal), "computed": computed, "block": block,
               "density": -1.0, "note": note}
        try:
            with torch.no_grad():
                row["fwd_ms"] = bench(fwd, args.cooldown)
        except Exception as e:  # noqa: BLE001 - report and go on
            row["error"] = "fwd: %s" % str(e).splitlines()[0][:80]
            return row

        def fb():
            out = fwd()
            torch.autograd.grad(out, (q, k, v), do)
        try:
            row["fwdbwd_ms"] = bench(fb, args.cooldown)
        except Exception as e:  # noqa: BLE001
            row["bwd_error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:80])
        return row

    for causal in causals:
        dense_share = 0.5 if causal else 1.0
        for name, backend in (("sdpa cuDNN", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa FA2", SDPBackend.FLASH_ATTENTION)):
            def f(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            rows.append(timed(name, causal, dense_share, f))
        if args.no_flex:
            continue
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        for dens in densities:
            for bq, bk in ((128, 64), (128, 128)):
                keep = block_mask_bits(H, math.ceil(N / bq), math.ceil(N / bk), dens, args.seed,
                                       causal, bq, bk)
                try:
                    bm = flex_block_mask(keep, causal, bq, bk, N)
                except Exception as e:  # noqa: BLE001
                    rows.append({"impl": "flex %dx%d" % (bq, bk), "causal": int(causal),
                                 "density": dens, "error": str(e).splitlines()[0][:80]})
                    continue
                r = timed("flex %dx%d" % (bq, bk), causal, float(keep.mean()),
                          lambda bm=bm: flex(q, k, v, block_mask=bm), block="%dx%d" % (bq, bk))
                r["density"] = dens
                rows.append(r)

    print_table(rows, N, H, D, torch.cuda.get_device_name())
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(rows, fh, indent=1)


def print_table(rows, N, H, D, gpu):
    def tflops(ms, share, mult):
        return 4.0 * N * N * D * H * share * mult / (ms * 1e-3) / 1e12

    base = {}
    for r in rows:
        if r.get("impl") == "sdpa cuDNN":
            base[r["causal"]] = (r.get("fwd_ms"), r.get("fwdbwd_ms"))
    flexref = {}  # (causal, density, blocks) -> (fwd ms, fwd+bwd ms)
    for r in rows:
        if r.get("impl", "").startswith("flex "):
            key = (r["causal"], round(r["density"], 4), r["impl"].split()[1])
            flexref[key] = (r.get("fwd_ms"), r.get("fwdbwd_ms"))

    # "x flex": FlexAttention's time over spattn's on the same block mask. FlexAttention's
    # backward fails for 128x64 blocks (PyTorch 2.11), so spattn's 128x64 fwd+bwd is set against
    # Flex's 128x128 mask of the same density instead, marked "*".
    hdr = ("impl", "causal", "density", "computed", "fwd ms", "fwd TF/s", "f+b ms", "f+b TF/s",
           "fwd x cuDNN", "f+b x cuDNN", "fwd x flex", "f+b x flex", "note")
    print("\nattention on %s, B=1 H=%d N=%d D=%d bf16 (TF/s = effective)" % (gpu, H, N, D))
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        if "error" in r and "fwd_ms" not in r:
            print("| %s | %s | %s | | | | | | | | | | %s |" % (r["impl"], r.get("causal", ""),
                                                             r.get("density", ""), r["error"]))
            continue
        share = r.get("computed", 1.0)
        is_spattn = r["impl"].startswith("spattn")
        f, fb = r.get("fwd_ms"), r.get("fwdbwd_ms")
        b = base.get(r["causal"], (None, None))
        blocks = r["impl"].split()[1] if is_spattn else ""
        fx = flexref.get((r["causal"], round(r.get("density", -1), 4), blocks), (None, None))
        fb_star = ""
        if fx[1] is None and is_spattn:
            alt = flexref.get((r["causal"], round(r.get("density", -1), 4), "128x128"))
            if alt and alt[1]:
                fx, fb_star = (fx[0], alt[1]), "*"
        cell = lambda x, fmt: (fmt % x) if x is not None else "-"
        note = r.get("note", "") or ""
        if "bwd_error" in r:
            note += " bwd failed: " + r["bwd_error"]
        print("| " + " | ".join([
            r["impl"], str(r["causal"]),
            "dense" if r.get("density", -1) < 0 else "%.0f%%" % (100 * r["density"]),
            "%.3f" % share, cell(f, "%.3f"), cell(tflops(f, share, 1) if f else None, "%.0f"),
            cell(fb, "%.3f"), cell(tflops(fb, share, 2.5) if fb else None, "%.0f"),
            cell(b[0] / f if f and b[0] else None, "%.2f"),
            cell(b[1] / fb if fb and b[1] else None, "%.2f"),
            cell(fx[0] / f if f and fx[0] and is_spattn else None, "%.2f"),
            cell(fx[1] / fb if fb and fx[1] and is_spattn else None, "%.2f") + fb_star,
            note.strip()]) + " |")
    print("\n* against FlexAttention's 128x128 mask of the same density: its backward fails for "
          "128x64 blocks")


if __name__ == "__main__":
    main()
