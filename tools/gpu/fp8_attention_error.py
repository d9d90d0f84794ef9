#!/usr/bin/env python3
"""Expected error of FP8 attention (VIDGEN_ATTENTION=cudnn_fp8) against exact attention, in f64.

Emulates the numerics of cuDNN's per-tensor FP8 flash-attention graph as vidgen drives it: q, k and
v rounded to e4m3 with scale 448/amax each, the unnormalised probabilities exp(s - rowmax) times
scale_s rounded to e4m3, their product with v accumulated as Hopper's FP8 tensor cores do (stage
`acc`: groups of 32 keys added into an accumulator that keeps ~14 significant bits, truncating, as
the DeepSeek-V3 report measured), the product divided by the f32 row sum, and the output rounded to
e4m3 with scale 224/amax(v). Prints the total error per logit spread and what each rounding adds
alone.
Needs only numpy:  python3 tools/gpu/fp8_attention_error.py

With `--dump DIR` it studies real inputs instead: the files `VIDGEN_FP8_ATTENTION_DUMP=DIR` writes
(bf16 q, k, v of two heads of each large FP8 attention shape): their statistics (amax, RMS, the share
of k and v every key carries, the logits' spread, the probability mass below e4m3's normal range) and
the emulated error, whole and per stage, with and without k's and v's means subtracted (v's is added
back to the output, as vidgen does). The per-tensor scales
are taken over the dumped head (the GPU takes them over all heads; e4m3's relative step is the same).
"""
import argparse
import glob
import json
import os
import re
import struct

import numpy as np


def e4m3(x):
    """Round to the nearest e4m3fn value (ties to even), saturating at 448; subnormals below 2^-6."""
    a = np.minimum(np.abs(x), 448.0)
    exponent = np.maximum(np.floor(np.log2(np.maximum(a, 2.0**-9))), -6)
    step = 2.0 ** (exponent - 3)
    return np.sign(x) * np.minimum(np.round(a / step) * step, 448.0)


def bf16(x):
    """Round f64 values to bf16 (through f32, ties to even), returned as f64."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def truncating_product(p, v, bits=13, group=32):
    """p·v with every group of `group` keys added into an accumulator kept to `bits` fractional
    bits below the leading bit of the larger of it and the group's sum, truncated toward zero: a
    model of Hopper's FP8 MMA accumulation (exact within a group)."""
    acc = np.zeros((p.shape[0], v.shape[1]))
    for start in range(0, p.shape[1], group):
        part = p[:, start : start + group] @ v[start : start + group]
        top = np.floor(np.log2(np.maximum(np.maximum(np.abs(acc), np.abs(part)), 1e-300)))
        step = 2.0 ** (top - bits)
        acc = np.trunc(acc / step) * step + np.trunc(part / step) * step
    return acc


def attention(q, k, v, rounded=(), scale_s=256.0, smooth_k=False, smooth_v=False):
    """softmax(q·kᵀ/√128)·v with the named stages rounded to e4m3 (`qk`, `v`, `p`, `o`) and the
    P·V accumulation truncated (`acc`); `smooth_k`: k's mean over the keys subtracted first
    (exact: softmax ignores a per-query constant); `smooth_v`: v's mean subtracted and added back
    to the output (exact: probabilities sum to 1), as vidgen does."""
    if smooth_k:
        k = k - k.mean(0)
    v_mean = v.mean(0) if smooth_v else np.zeros(v.shape[1])
    v = v - v_mean
    if "qk" in rounded:
        sq, sk = np.abs(q).max() / 448, np.abs(k).max() / 448
        q, k = e4m3(q / sq) * sq, e4m3(k / sk) * sk
    v_amax = np.abs(v).max()
    if "v" in rounded:
        sv = v_amax / 448
        v = e4m3(v / sv) * sv
    s = q @ k.T / np.sqrt(128)
    p = np.exp(s - s.max(1, keepdims=True))
    pq = e4m3(p * scale_s) if "p" in rounded else p * scale_s
    if "acc" in rounded:
        # The accumulator holds e4m3 values times their scales, as the tensor cores see them.
        sv = v_amax / 448
        product = truncating_product(pq, v / sv) * sv
    else:
        product = pq @ v
    o = product / scale_s / p.sum(1, keepdims=True)
    if "o" in rounded:
        so = 224.0 / v_amax
        o = e4m3(o * so) / so
    return o + v_mean


STAGES = ("qk", "v", "p", "acc", "o")


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def main():
    rng = np.random.default_rng(0)
    queries, keys = 256, 2048
    for label, spread in [("logits std 1", 1.0), ("logits std 4", 2.0), ("logits std 9", 3.0)]:
        q = bf16(rng.standard_normal((queries, 128)) * spread)
        k = bf16(rng.standard_normal((keys, 128)) * spread)
        v = bf16(rng.standard_normal((keys, 128)))
        exact = attention(q, k, v)
        parts = {stage: rel(attention(q, k, v, (stage,)), exact) for stage in STAGES}
        total = rel(attention(q, k, v, STAGES), exact)
        print(
            f"{label}: fp8 {total:.2e} (bf16 output rounding {rel(bf16(exact), exact):.2e}); alone: "
            + ", ".join(f"{s} {e:.2e}" for s, e in parts.items())
        )
    # Keys sharing one component (a bias every key carries): per-tensor e4m3 spends its steps on
    # the shared part unless k's mean is subtracted first.
    q = bf16(rng.standard_normal((queries, 128)))
    shared = rng.standard_normal(128) * 0.9
    k = bf16(rng.standard_normal((keys, 128)) * 0.45 + shared)
    v = bf16(rng.standard_normal((keys, 128)))
    exact = attention(q, k, v)
    print(
        f"keys with a shared component: fp8 {rel(attention(q, k, v, STAGES), exact):.2e}, "
        f"k's mean subtracted {rel(attention(q, k, v, STAGES, smooth_k=True), exact):.2e}"
    )


def load_bf16(path):
    """The one bf16 tensor of a safetensors file, as f64."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    ((_, meta),) = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if meta["dtype"] != "BF16":
        raise SystemExit(f"{path}: {meta['dtype']} is not BF16")
    start, end = meta["data_offsets"]
    bits = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype=np.uint16).astype(np.uint32)
    return (bits << 16).view(np.float32).astype(np.float64).reshape(meta["shape"])


def study_dump(directory, queries):
    """Statistics and emulated FP8 error of every dumped (shape, head)."""
    found = sorted(glob.glob(os.path.join(directory, "fp8attn_*_q.safetensors")))
    if not found:
        raise SystemExit(f"{directory}: no fp8attn_*_q.safetensors (VIDGEN_FP8_ATTENTION_DUMP's files)")
    for q_path in found:
        name = re.sub(r"_q\.safetensors$", "", os.path.basename(q_path))
        q, k, v = (load_bf16(os.path.join(directory, f"{name}_{t}.safetensors")) for t in "qkv")
        q = q[:queries]
        s = q @ k.T / np.sqrt(128)
        p = np.exp(s - s.max(1, keepdims=True))
        exact = attention(q, k, v)
        shared = lambda t: np.linalg.norm(t.mean(0)) / np.sqrt((t**2).sum(1).mean())
        small = (p * (p * 256 < 2.0**-6)).sum(1) / p.sum(1)
        print(
            f"{name}: amax q {np.abs(q).max():.2f} k {np.abs(k).max():.2f} v {np.abs(v).max():.2f}; "
            f"rms q {q.std():.2f} k {k.std():.2f} v {v.std():.2f}; shared part of k {shared(k):.3f}, "
            f"of v {shared(v):.3f}; logits std {s.std(1).mean():.2f}, max - mean "
            f"{(s.max(1) - s.mean(1)).mean():.2f}; effective keys "
            f"{np.mean(p.sum(1) ** 2 / (p**2).sum(1)):.0f}; probability mass below e4m3's normal "
            f"range {small.mean():.2e}"
        )
        parts = {stage: rel(attention(q, k, v, (stage,)), exact) for stage in STAGES}
        fp8 = lambda **smooth: f"{rel(attention(q, k, v, STAGES, **smooth), exact):.2e}"
        print(
            f"  fp8 {fp8()}, k's mean subtracted {fp8(smooth_k=True)}, k's and v's "
            f"{fp8(smooth_k=True, smooth_v=True)}; alone: "
            + ", ".join(f"{st} {e:.2e}" for st, e in parts.items())
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", help="a VIDGEN_FP8_ATTENTION_DUMP directory to study")
    parser.add_argument("--queries", type=int, default=256, help="dumped queries used (default 256)")
    args = parser.parse_args()
    if args.dump:
        study_dump(args.dump, args.queries)
    else:
        main()
