"""The Triton expert kernels against the per-expert loop: forward and every gradient.

Without a GPU they run in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1)
on small shapes; on a CUDA machine the same cases run compiled on the GPU, and the `gpu`
tests add larger bf16 shapes, the dispatch of `fused_experts` and the torch._grouped_mm path."""

import json

import pytest
import torch
from moecluster.workers import kernel_tuning
from moecluster.workers.kernels import fused_experts, reference_experts
from moecluster.workers.triton_experts import interpreting, triton_fused_experts
from moecluster.workers.triton_routing import align

from tests.test_kernels import H, grads, make_case, rel

pytest.importorskip("triton")
DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("triton compiled mode needs a GPU; set TRITON_INTERPRET=1 to run on a CPU", allow_module_level=True)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 5e-3), torch.bfloat16: (2e-2, 3e-2)}  # (forward, grads)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check(case, dtype, fn=triton_fused_experts, needs_grad=True):
    """Compare fn's output and the four gradients with the per-expert loop in float64."""
    x, gate_up, down, index, weights = case
    t, hid = x.shape
    grad_out = torch.randn(t, hid, dtype=torch.float64, generator=torch.Generator().manual_seed(t * hid))
    on = [v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for v in case]
    ref, g_ref = grads(reference_experts, *[v.double() if v.is_floating_point() else v for v in case], grad_out)
    if not needs_grad:
        with torch.no_grad():
            out = fn(*on)
        assert rel(out.double().cpu(), ref) <= TOL[dtype][0]
        return
    out, g = grads(fn, *on, grad_out.to(DEVICE, dtype))
    assert out.shape == (t, hid) and out.dtype == dtype and out.device.type == DEVICE
    assert torch.isfinite(out).all()
    assert rel(out.double().cpu(), ref) <= TOL[dtype][0]
    for name, a, b in zip(("hidden", "gate_up", "down", "weights"), g, g_ref):
        assert a.shape == b.shape, name
        if name != "weights" or index.numel() >= 64:
            assert rel(a.double().cpu(), b) <= TOL[dtype][1], name
    # dL/dw[t,k] = <dy[t], E_k(x[t])> can cancel to far below its terms (a few slots then fail a
    # norm-wise bound by chance in 16-bit), so each is also held to one that cannot cancel
    err = (g[3].double().cpu() - g_ref[3]).abs()
    assert torch.all(err <= TOL[dtype][1] / 3 * _slot_scale(case, grad_out) + 1e-12), "weights"
    assert torch.all(g[3].cpu()[index < 0] == 0)  # unserved slots get no routing-weight gradient
    return g


def _slot_scale(case, grad_out):
    """|dy[t]| * |E_k(x[t])| per slot, in float64: the size of dL/dw[t,k]'s terms."""
    x, gate_up, down, index, weights = [v.double() if v.is_floating_point() else v for v in case]
    scale = torch.zeros(index.shape, dtype=torch.float64)
    for k in range(index.shape[1]):
        only = torch.full_like(index, -1)
        only[:, k] = index[:, k]
        scale[:, k] = reference_experts(x, gate_up, down, only, torch.ones_like(weights)).norm(dim=1)
    return scale * grad_out.norm(dim=1, keepdim=True)


# (T, E, K, routing, dtype): T below one block (16), odd H=19 and I=13, prime E, K = 1 and K = E,
# all tokens on one expert, experts left empty, slots served elsewhere (-1); fp32 and fp16.
CASES = [
    (1, 7, 2, "topk", torch.float32),
    (7, 7, 1, "topk", torch.float32),
    (7, 7, 7, "neg", torch.float32),
    (33, 13, 2, "neg", torch.float32),
    (17, 13, 1, "neg", torch.float32),
    (20, 7, 2, "one", torch.float32),
    (20, 13, 3, "sparse", torch.float32),
    (1, 7, 2, "topk", torch.float16),
    (9, 7, 7, "topk", torch.float16),
    (33, 13, 13, "neg", torch.float16),
    (20, 7, 2, "one", torch.float16),
    (40, 5, 3, "sparse", torch.float16),
]


@pytest.mark.parametrize("t,e,k,routing,dtype", CASES)
def test_matches_per_expert_loop(t, e, k, routing, dtype):
    g = check(make_case(t, e, k, routing), dtype)
    if routing in ("one", "sparse"):  # idle experts: exactly zero weight gradients
        used = set(make_case(t, e, k, routing)[3].flatten().tolist())
        for x in range(e):
            if x not in used:
                assert torch.count_nonzero(g[1][x]) == 0 and torch.count_nonzero(g[2][x]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,e,k,routing", [(33, 5, 2, "neg"), (20, 7, 3, "sparse")])
def test_tma_descriptor_loads(t, e, k, routing, dtype):
    """Every GEMM loading through TMA descriptors (rows 16-byte aligned: H 32, I 24), x and dy
    gathered into sorted order first or not, matches the loop."""
    cfg = kernel_tuning.default_config(e, t, k, dtype, interpret=interpreting())
    for kernel in ("gate_up", "down", "grad_act", "grad_x"):
        cfg[kernel]["TMA"] = True
    cfg["gate_up"]["GATHER"] = cfg["grad_act"]["GATHER"] = routing == "neg"
    check(make_case(t, e, k, routing, hid=32, inter=24), dtype,
          fn=lambda *a: triton_fused_experts(*a, config=cfg))


DECODE = dict(BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, DOWN_BLOCK_N=16, DOWN_BLOCK_K=8, down_warps=4)


@pytest.mark.parametrize("t,e,k,routing,dtype", [(1, 7, 2, "topk", torch.float32), (3, 7, 7, "neg", torch.float32),
                                                 (5, 13, 1, "neg", torch.float16), (4, 5, 3, "one", torch.float16)])
def test_decode_path_without_routing(t, e, k, routing, dtype):
    """Inference on a few tokens through the two routing-free GEMV kernels (odd H and I: ragged blocks)."""
    cfg = dict(kernel_tuning.default_config(e, t, k, dtype, interpret=interpreting()), decode=DECODE)
    check(make_case(t, e, k, routing), dtype, fn=lambda *a: triton_fused_experts(*a, config=cfg), needs_grad=False)
    check(make_case(t, e, k, routing, hid=32, inter=16), dtype, fn=lambda *a: triton_fused_experts(*a, config=cfg),
          needs_grad=False)


def test_no_grad_and_int32_index():
    x, gate_up, down, index, weights = make_case(33, 13, 2, "neg")
    check((x, gate_up, down, index.int(), weights), torch.float32, needs_grad=False)


def test_all_unserved_and_no_tokens():
    x, gate_up, down, index, weights = [v.to(DEVICE) for v in make_case(9, 7, 2)]
    index = torch.full_like(index, -1)
    out, gs = grads(triton_fused_experts, x, gate_up, down, index, weights, torch.randn(9, H, device=DEVICE))
    assert torch.count_nonzero(out) == 0 and all(torch.count_nonzero(g) == 0 for g in gs)
    x, gate_up, down, index, weights = [v.to(DEVICE) for v in make_case(0, 7, 2)]
    out, (gx, ggu, gdn, gw) = grads(triton_fused_experts, x, gate_up, down, index, weights,
                                    torch.zeros(0, H, device=DEVICE))
    assert out.shape == (0, H) and gx.shape == (0, H) and gw.shape == (0, 2)
    assert ggu.shape == gate_up.shape and torch.count_nonzero(ggu) == 0


def test_frozen_weights_only_requested_grads():
    x, gate_up, down, index, weights = [v.to(DEVICE) for v in make_case(20, 7, 2, "neg")]
    xr, wr = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    triton_fused_experts(xr, gate_up, down, index, wr).sum().backward()
    ref_x, ref_w = x.cpu().double().requires_grad_(True), weights.cpu().double().requires_grad_(True)
    reference_experts(ref_x, gate_up.cpu().double(), down.cpu().double(), index.cpu(), ref_w).sum().backward()
    assert rel(xr.grad.double().cpu(), ref_x.grad) <= 1e-5 and rel(wr.grad.double().cpu(), ref_w.grad) <= 1e-5


@pytest.mark.parametrize("method", ["kernel", "chunks", "torch"])
@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("routing", ["topk", "one", "sparse", "neg"])
def test_align_pads_each_expert_to_whole_blocks(block_m, routing, method, monkeypatch):
    """Every served assignment is in exactly one row, in assignment order within its expert,
    each block holds one expert's rows, and unserved or padding rows carry the sentinel n
    ("chunks": 7 chunks of 16 assignments, the last one ragged)."""
    from moecluster.workers import triton_routing

    monkeypatch.setattr(triton_routing, "ALIGN_CHUNK_MIN", 16)
    _, _, _, index, _ = make_case(33, 7, 3, routing)
    index = index.to(DEVICE)
    r = align(index, 7, block_m, method)
    r = type(r)(*[v.cpu() if isinstance(v, torch.Tensor) else v for v in vars(r).values()])
    index = index.cpu()
    n, ids = index.numel(), r.sorted_ids.long()
    served = sorted(i for i in range(n) if index.flatten()[i] >= 0)
    assert sorted(ids[ids < n].tolist()) == served
    used = int(r.rows_used)
    assert used % block_m == 0 and torch.all(ids[used:] == n)
    for b in range(used // block_m):
        rows = ids[b * block_m:(b + 1) * block_m]
        e = int(r.block_expert[b])
        assert torch.all(index.flatten()[rows[rows < n]] == e) and (rows < n).any()
        assert int(r.pad_start[e]) <= b * block_m < int(r.pad_start[e] + r.padded[e])
    for e in range(7):  # stable: an expert's rows keep assignment order
        rows = ids[int(r.pad_start[e]):int(r.pad_start[e] + r.padded[e])]
        assert rows[rows < n].tolist() == sorted(rows[rows < n].tolist())
    assert torch.all(r.block_expert[used // block_m:] == 7)


def test_tuned_table_nearest_entry_completed_by_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_tuning, "TUNED_DIR", tmp_path)
    kernel_tuning._load.cache_clear()
    path = kernel_tuning.table_path(8, 14336, 4096, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert path.name == "E8-I14336-H4096-bfloat16-NVIDIA_H100_80GB_HBM3.json"
    path.write_text(json.dumps({"16": {"BLOCK_M": 16, "down": {"BLOCK_N": 32}},
                                "4096": {"BLOCK_M": 128, "backend": "grouped_mm"}}))
    small = kernel_tuning.pick_config(8, 14336, 4096, 20, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    big = kernel_tuning.pick_config(8, 14336, 4096, 3000, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    other = kernel_tuning.pick_config(8, 14336, 4096, 3000, torch.bfloat16, "NVIDIA A100")
    assert small["BLOCK_M"] == 16 and small["down"]["BLOCK_N"] == 32 and small["down"]["BLOCK_K"] > 0
    assert small["backend"] == "triton" and big["backend"] == "grouped_mm" and big["BLOCK_M"] == 128
    assert other == kernel_tuning.default_config(8, 3000, None, torch.bfloat16, False)
    kernel_tuning._load.cache_clear()


def test_tuned_tables_shipped_are_complete():
    """Each shipped table parses and every entry names known kernels and parameters."""
    known = set(kernel_tuning.default_config(8, 64, 2, torch.bfloat16, False))
    for path in kernel_tuning.TUNED_DIR.glob("*.json"):
        for tokens, entry in json.loads(path.read_text()).items():
            assert int(tokens) > 0 and set(entry) <= known, path.name
            assert entry.get("backend", "triton") in ("triton", "grouped_mm"), path.name


# ----------------------------------------------------------------------------- on a GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k,hid,inter", [(512, 8, 2, 256, 384), (1000, 64, 8, 128, 96), (3, 16, 4, 200, 136)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_larger_shapes(t, e, k, hid, inter, dtype):
    check(make_case(t, e, k, "neg", hid=hid, inter=inter), dtype)


@gpu
@pytest.mark.gpu
def test_gpu_fused_experts_dispatches_to_triton(monkeypatch):
    from moecluster.workers import triton_experts

    calls = []
    real = triton_experts.triton_fused_experts
    monkeypatch.setattr(triton_experts, "triton_fused_experts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check(make_case(64, 8, 2, "topk", hid=128, inter=64), torch.bfloat16, fn=fused_experts)
    assert calls


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (300, 16, 4), (64, 8, 8)])
def test_gpu_grouped_mm_path(t, e, k):
    from moecluster.workers.grouped_mm_experts import grouped_mm_experts, grouped_mm_supported

    case = make_case(t, e, k, "neg", hid=128, inter=64)
    x = case[0].to(DEVICE, torch.bfloat16)
    if not grouped_mm_supported(x, case[1].to(DEVICE, torch.bfloat16), case[2].to(DEVICE, torch.bfloat16)):
        pytest.skip("torch._grouped_mm needs bf16 on an sm90+ GPU with this PyTorch")
    check(case, torch.bfloat16, fn=grouped_mm_experts)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["neg", "one", "sparse"])
def test_gpu_tma_and_grouped_mm_weight_grads(routing):
    """TMA loads, gathered A operands and torch._grouped_mm weight gradients, with idle experts."""
    from moecluster.workers.grouped_mm_experts import grouped_mm_supported

    case = make_case(300, 16, 4, routing, hid=256, inter=192)
    if not grouped_mm_supported(*[v.to(DEVICE, torch.bfloat16) for v in case[:3]]):
        pytest.skip("torch._grouped_mm needs bf16 on an sm90+ GPU with this PyTorch")
    cfg = kernel_tuning.default_config(16, 300, 4, torch.bfloat16, interpret=False)
    for kernel in ("gate_up", "down", "grad_act", "grad_x"):
        cfg[kernel].update(TMA=True, GATHER=True)
    cfg["grad_w"]["backend"] = "grouped_mm"
    g = check(case, torch.bfloat16, fn=lambda *a: triton_fused_experts(*a, config=cfg))
    used = set(case[3].flatten().tolist())
    for x in range(16):
        if x not in used:
            assert torch.count_nonzero(g[1][x]) == 0 and torch.count_nonzero(g[2][x]) == 0
