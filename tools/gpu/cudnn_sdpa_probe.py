"""Probe cuDNN's fused attention through the backend (graph) C API with ctypes, on the GPU machine.

Builds the same operation graph vidgen's Rust code builds (dit/cudnn_attention.rs): Q·Kᵀ, scale,
softmax as max / sub / exp / sum / div, then ·V, in bf16 with f32 intermediates; optionally with the
padding-mask sub-graph that cuDNN <= 9.15 needs when the key length is not a multiple of 128.
Checks the output against PyTorch's SDPA and times it against PyTorch's cuDNN SDPA backend.

    python3 tools/gpu/cudnn_sdpa_probe.py [--tokens 32760] [--heads 40] [--kv 0]
"""

import argparse
import ctypes
import glob
import os
import site
import sys

import torch

# enum values (cudnn_backend.h, cuDNN 9)
T_HANDLE, T_DATA_TYPE, T_BOOLEAN, T_INT64, T_FLOAT = 0, 1, 2, 3, 4
T_VOID_PTR, T_HEUR_MODE, T_POINTWISE_MODE, T_BACKEND_DESCRIPTOR = 6, 8, 14, 15
T_REDUCTION_OPERATOR = 18
D_POINTWISE, D_ENGINECFG, D_ENGINEHEUR, D_EXECUTION_PLAN = 0, 3, 4, 5
D_OP_POINTWISE, D_OPERATIONGRAPH, D_VARIANT_PACK, D_TENSOR = 13, 15, 16, 17
D_MATMUL, D_OP_MATMUL, D_REDUCTION, D_OP_REDUCTION = 18, 19, 21, 22
DT_FLOAT, DT_INT32, DT_BF16, DT_BOOL = 0, 4, 9, 11
PW_ADD, PW_MUL, PW_DIV, PW_SUB, PW_EXP, PW_LOG = 0, 1, 6, 9, 13, 15
PW_CMP_LT, PW_AND, PW_GEN_INDEX, PW_SELECT = 304, 400, 501, 601
RED_ADD, RED_MAX = 0, 3
A_PW_MODE, A_PW_PREC, A_PW_AXIS = 0, 1, 9
A_HEUR_MODE, A_HEUR_GRAPH, A_HEUR_RESULTS = 200, 201, 202
A_PLAN_HANDLE, A_PLAN_CFG, A_PLAN_WS = 400, 401, 402
A_OPPW_DESC, A_OPPW_X, A_OPPW_B, A_OPPW_Y, A_OPPW_T = 750, 751, 752, 753, 758
A_GRAPH_HANDLE, A_GRAPH_OPS = 800, 801
A_T_ALIGN, A_T_DTYPE, A_T_DIMS, A_T_STRIDES, A_T_UID, A_T_VIRTUAL, A_T_BYVALUE = 900, 901, 902, 903, 906, 907, 908
A_VP_UIDS, A_VP_PTRS, A_VP_WS = 1000, 1001, 1003
A_MM_COMP = 1500
A_OPMM_A, A_OPMM_B, A_OPMM_C, A_OPMM_DESC = 1520, 1521, 1522, 1523
A_RED_OP, A_RED_COMP = 1600, 1601
A_OPRED_X, A_OPRED_Y, A_OPRED_DESC = 1610, 1611, 1612
HEUR_A = 3


def load_cudnn():
    for base in site.getsitepackages():
        for path in glob.glob(os.path.join(base, "nvidia", "cudnn", "lib", "libcudnn.so.9")):
            return ctypes.CDLL(path)
    return ctypes.CDLL("libcudnn.so.9")


lib = load_cudnn()
lib.cudnnGetVersion.restype = ctypes.c_size_t
lib.cudnnGetErrorString.restype = ctypes.c_char_p


def check(status, what):
    if status != 0:
        buf = ctypes.create_string_buffer(4096)
        try:
            lib.cudnnGetLastErrorString(buf, ctypes.c_size_t(4096))
        except AttributeError:
            pass
        raise RuntimeError(f"{what}: {lib.cudnnGetErrorString(status).decode()} ({status}) {buf.value.decode()}")


class Desc:
    def __init__(self, kind):
        self.h = ctypes.c_void_p()
        check(lib.cudnnBackendCreateDescriptor(kind, ctypes.byref(self.h)), f"create {kind}")

    def set(self, name, typ, values):
        ctype = {T_INT64: ctypes.c_int64, T_FLOAT: ctypes.c_float, T_BOOLEAN: ctypes.c_bool,
                 T_VOID_PTR: ctypes.c_void_p}.get(typ, ctypes.c_int32)
        if typ in (T_BACKEND_DESCRIPTOR, T_HANDLE):
            ctype = ctypes.c_void_p
            values = [v.h.value if isinstance(v, Desc) else getattr(v, "value", v) for v in values]
        arr = (ctype * len(values))(*values)
        check(lib.cudnnBackendSetAttribute(self.h, name, typ, ctypes.c_int64(len(values)), arr), f"set {name}")
        return self

    def fin(self):
        check(lib.cudnnBackendFinalize(self.h), "finalize")
        return self


class Graph:
    def __init__(self):
        self.ops, self.uid = [], 100

    def tensor(self, dims, strides, dtype, virtual=False, by_value=False, uid=None):
        if uid is None:
            self.uid += 1
            uid = self.uid
        t = Desc(D_TENSOR)
        t.set(A_T_DTYPE, T_DATA_TYPE, [dtype]).set(A_T_DIMS, T_INT64, dims).set(A_T_STRIDES, T_INT64, strides)
        t.set(A_T_UID, T_INT64, [uid]).set(A_T_ALIGN, T_INT64, [16])
        t.set(A_T_VIRTUAL, T_BOOLEAN, [virtual])
        if by_value:
            t.set(A_T_BYVALUE, T_BOOLEAN, [True])
        t.fin()
        t.uid = uid
        return t

    def pointwise(self, mode, x, y, b=None, t=None, prec=DT_FLOAT, axis=None):
        pw = Desc(D_POINTWISE).set(A_PW_MODE, T_POINTWISE_MODE, [mode]).set(A_PW_PREC, T_DATA_TYPE, [prec])
        if axis is not None:
            pw.set(A_PW_AXIS, T_INT64, [axis])
        pw.fin()
        op = Desc(D_OP_POINTWISE).set(A_OPPW_DESC, T_BACKEND_DESCRIPTOR, [pw]).set(A_OPPW_X, T_BACKEND_DESCRIPTOR, [x])
        if b is not None:
            op.set(A_OPPW_B, T_BACKEND_DESCRIPTOR, [b])
        if t is not None:
            op.set(A_OPPW_T, T_BACKEND_DESCRIPTOR, [t])
        op.set(A_OPPW_Y, T_BACKEND_DESCRIPTOR, [y]).fin()
        self.ops.append((op, pw))

    def reduction(self, red_op, x, y):
        r = Desc(D_REDUCTION).set(A_RED_OP, T_REDUCTION_OPERATOR, [red_op]).set(A_RED_COMP, T_DATA_TYPE, [DT_FLOAT]).fin()
        op = Desc(D_OP_REDUCTION).set(A_OPRED_X, T_BACKEND_DESCRIPTOR, [x]).set(A_OPRED_Y, T_BACKEND_DESCRIPTOR, [y])
        op.set(A_OPRED_DESC, T_BACKEND_DESCRIPTOR, [r]).fin()
        self.ops.append((op, r))

    def matmul(self, a, b, c):
        m = Desc(D_MATMUL).set(A_MM_COMP, T_DATA_TYPE, [DT_FLOAT]).fin()
        op = Desc(D_OP_MATMUL).set(A_OPMM_A, T_BACKEND_DESCRIPTOR, [a]).set(A_OPMM_B, T_BACKEND_DESCRIPTOR, [b])
        op.set(A_OPMM_C, T_BACKEND_DESCRIPTOR, [c]).set(A_OPMM_DESC, T_BACKEND_DESCRIPTOR, [m]).fin()
        self.ops.append((op, m))


def build(handle, b, h, sq, skv, d, q_stride, k_stride, v_stride, padding_mask, stats):
    """q/k/v in [B, L, H, D] memory with the given token stride; output [B, Lq, H, D] contiguous.
    `stats`: also compute max + log(sum) into a virtual tensor, as cudnn-frontend's inference graph does."""
    g = Graph()
    q = g.tensor([b, h, sq, d], [sq * q_stride, d, q_stride, 1], DT_BF16, uid=1)
    kt = g.tensor([b, h, d, skv], [skv * k_stride, d, 1, k_stride], DT_BF16, uid=2)
    v = g.tensor([b, h, skv, d], [skv * v_stride, d, v_stride, 1], DT_BF16, uid=3)
    o = g.tensor([b, h, sq, d], [sq * h * d, d, h * d, 1], DT_BF16, uid=4)
    scale = g.tensor([1, 1, 1, 1], [1, 1, 1, 1], DT_FLOAT, by_value=True, uid=5)
    full = ([b, h, sq, skv], [h * sq * skv, sq * skv, skv, 1])
    row = ([b, h, sq, 1], [h * sq, sq, 1, 1])
    s = g.tensor(*full, DT_FLOAT, virtual=True)
    g.matmul(q, kt, s)
    s1 = g.tensor(*full, DT_FLOAT, virtual=True)
    g.pointwise(PW_MUL, s, s1, b=scale)
    extra = []
    if padding_mask:
        seq_q = g.tensor([b, 1, 1, 1], [1, 1, 1, 1], DT_INT32, uid=6)
        seq_kv = g.tensor([b, 1, 1, 1], [1, 1, 1, 1], DT_INT32, uid=7)
        neg_inf = g.tensor([1, 1, 1, 1], [1, 1, 1, 1], DT_FLOAT, by_value=True, uid=8)
        ri = g.tensor(*full, DT_INT32, virtual=True)
        g.pointwise(PW_GEN_INDEX, s1, ri, prec=DT_INT32, axis=2)
        ci = g.tensor(*full, DT_INT32, virtual=True)
        g.pointwise(PW_GEN_INDEX, s1, ci, prec=DT_INT32, axis=3)
        rm = g.tensor(*full, DT_BOOL, virtual=True)
        g.pointwise(PW_CMP_LT, ri, rm, b=seq_q, prec=DT_BOOL)
        cm = g.tensor(*full, DT_BOOL, virtual=True)
        g.pointwise(PW_CMP_LT, ci, cm, b=seq_kv, prec=DT_BOOL)
        m = g.tensor(*full, DT_BOOL, virtual=True)
        g.pointwise(PW_AND, rm, m, b=cm, prec=DT_BOOL)
        s2 = g.tensor(*full, DT_FLOAT, virtual=True)
        g.pointwise(PW_SELECT, s1, s2, b=neg_inf, t=m)
        s1 = s2
        extra = [seq_q, seq_kv, neg_inf]
    mx = g.tensor(*row, DT_FLOAT, virtual=True)
    g.reduction(RED_MAX, s1, mx)
    sub = g.tensor(*full, DT_FLOAT, virtual=True)
    g.pointwise(PW_SUB, s1, sub, b=mx)
    e = g.tensor(*full, DT_FLOAT, virtual=True)
    g.pointwise(PW_EXP, sub, e)
    z = g.tensor(*row, DT_FLOAT, virtual=True)
    g.reduction(RED_ADD, e, z)
    if stats:
        lz = g.tensor(*row, DT_FLOAT, virtual=True)
        g.pointwise(PW_LOG, z, lz)
        lse = g.tensor(*row, DT_FLOAT, virtual=True)
        g.pointwise(PW_ADD, mx, lse, b=lz)
    p = g.tensor(*full, DT_BF16, virtual=True)
    g.pointwise(PW_DIV, e, p, b=z)
    g.matmul(p, v, o)
    graph = Desc(D_OPERATIONGRAPH).set(A_GRAPH_HANDLE, T_HANDLE, [handle]).set(
        A_GRAPH_OPS, T_BACKEND_DESCRIPTOR, [op for op, _ in g.ops]).fin()
    heur = Desc(D_ENGINEHEUR).set(A_HEUR_GRAPH, T_BACKEND_DESCRIPTOR, [graph]).set(A_HEUR_MODE, T_HEUR_MODE, [HEUR_A]).fin()
    cfgs = [Desc(D_ENGINECFG) for _ in range(8)]
    n = ctypes.c_int64()
    arr = (ctypes.c_void_p * 8)(*[c.h.value for c in cfgs])
    check(lib.cudnnBackendGetAttribute(heur.h, A_HEUR_RESULTS, T_BACKEND_DESCRIPTOR, ctypes.c_int64(8), ctypes.byref(n), arr), "heur results")
    print(f"  heuristics offered {n.value} engine configs", flush=True)
    errors = []
    for i in range(n.value):
        try:
            plan = Desc(D_EXECUTION_PLAN).set(A_PLAN_HANDLE, T_HANDLE, [handle]).set(A_PLAN_CFG, T_BACKEND_DESCRIPTOR, [cfgs[i]]).fin()
        except RuntimeError as err:
            errors.append(str(err))
            continue
        ws = ctypes.c_int64()
        check(lib.cudnnBackendGetAttribute(plan.h, A_PLAN_WS, T_INT64, ctypes.c_int64(1), ctypes.byref(n), ctypes.byref(ws)), "ws")
        print(f"  plan from config {i}: workspace {ws.value} bytes", flush=True)
        return plan, ws.value, extra, (g, graph, heur, cfgs)
    raise RuntimeError("no config finalised: " + " | ".join(errors))


def run(handle, plan, ws_bytes, q, k, v, o, scale, padding_mask, sq, skv):
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
    scale_v = ctypes.c_float(scale)
    uids = [1, 2, 3, 4, 5]
    ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), ctypes.addressof(scale_v)]
    keep = []
    if padding_mask:
        b = q.shape[0]
        sqt = torch.full((b,), sq, dtype=torch.int32, device="cuda")
        skvt = torch.full((b,), skv, dtype=torch.int32, device="cuda")
        neg = ctypes.c_float(float("-inf"))
        keep += [sqt, skvt, neg]
        uids += [6, 7, 8]
        ptrs += [sqt.data_ptr(), skvt.data_ptr(), ctypes.addressof(neg)]
    vp = Desc(D_VARIANT_PACK).set(A_VP_UIDS, T_INT64, uids).set(A_VP_PTRS, T_VOID_PTR, ptrs).set(A_VP_WS, T_VOID_PTR, [ws.data_ptr()]).fin()
    check(lib.cudnnBackendExecute(handle, plan.h, vp.h), "execute")
    return keep, vp, ws


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--kv", type=int, default=0, help="key length (0: same as tokens)")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print("cuDNN version", lib.cudnnGetVersion(), "torch", torch.__version__, torch.backends.cudnn.version(), flush=True)
    handle = ctypes.c_void_p()
    check(lib.cudnnCreate(ctypes.byref(handle)), "create handle")
    stream = torch.cuda.current_stream().cuda_stream
    check(lib.cudnnSetStream(handle, ctypes.c_void_p(stream)), "set stream")
    b, h, d = 1, args.heads, 128
    sq = args.tokens
    skv = args.kv or sq
    torch.manual_seed(0)
    # q/k/v as slices of one fused projection [B, L, 3, H, D] for q/k (token stride 3·H·D), v separate
    qk = torch.randn(b, max(sq, skv), 2, h, d, device="cuda", dtype=torch.bfloat16)
    q = qk[:, :sq, 0]
    k = qk[:, :skv, 1]
    v = torch.randn(b, skv, h, d, device="cuda", dtype=torch.bfloat16)
    o = torch.empty(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    # reference for the first 1024 query rows in f32: [B, H, Lq, Lk] scores, softmax, values
    qr, kr, vr = (x.transpose(1, 2).float() for x in (q[:, :min(sq, 1024)], k, v))
    ref = (torch.softmax(qr @ kr.transpose(-1, -2) * d ** -0.5, dim=-1) @ vr).transpose(1, 2)
    del qr, kr, vr
    flops = 4.0 * b * h * sq * skv * d
    for padding_mask, stats in ((False, True), (False, False), (True, True), (True, False)):
        print(f"graph with padding mask = {padding_mask}, softmax stats = {stats}", flush=True)
        try:
            plan, ws, _, keepalive = build(handle, b, h, sq, skv, d, q.stride(1), k.stride(1), v.stride(1), padding_mask, stats)
            o.zero_()
            keep = run(handle, plan, ws, q, k, v, o, scale, padding_mask, sq, skv)
            torch.cuda.synchronize()
            got = o[:, :ref.shape[1]].float()
            err = ((got - ref).norm() / ref.norm()).item()
            print(f"  rel err vs f32 SDPA: {err:.3e}  (finite: {torch.isfinite(o).all().item()})", flush=True)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.reps):
                keep = run(handle, plan, ws, q, k, v, o, scale, padding_mask, sq, skv)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.reps
            print(f"  ours via backend API: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
        except RuntimeError as err:
            print("  FAILED:", err, flush=True)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.reps):
                    torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.reps
            print(f"torch {name}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
        except RuntimeError as err:
            print(f"torch {name}: failed {err}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
