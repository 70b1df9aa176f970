"""fused_experts against reference_experts and transformers' own eager MixtralExperts."""

import pytest
import torch
from moecluster.workers import kernels
from moecluster.workers.kernels import fused_experts, reference_experts
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

H, I = 19, 13  # odd on purpose
FWD_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def make_case(t, e, k, routing="topk", dtype=torch.float32, seed=0, hid=H, inter=I):
    """x (T, H), gate_up (E, 2I, H), down (E, H, I), index (T, K) int64, weights (T, K)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hid, generator=gen, dtype=dtype)
    gate_up = torch.randn(e, 2 * inter, hid, generator=gen, dtype=dtype) / hid**0.5
    down = torch.randn(e, hid, inter, generator=gen, dtype=dtype) / inter**0.5
    logits = torch.randn(t, e, generator=gen)
    weights, index = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    if routing == "one":  # every slot of every token -> expert 1 (duplicates per token too)
        index = torch.ones_like(index)
    elif routing == "sparse":  # only experts 0 and e-1 get tokens; the others must stay zero
        index = torch.where(index % 2 == 0, 0, e - 1)
    elif routing == "neg":  # some assignments are served elsewhere
        index = index.masked_fill(torch.rand(t, k, generator=gen) < 0.3, -1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    return x, gate_up, down, index, weights


def rel(a, b):
    """Norm-wise relative error ||a - b|| / ||b|| (0 if both are zero)."""
    denom = b.norm()
    if denom == 0:
        return a.norm().item()
    return ((a - b).norm() / denom).item()


def grads(fn, x, gate_up, down, index, weights, grad_out):
    """Output and autograd grads of fn w.r.t. (x, gate_up, down, weights)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    out = fn(leaves[0], leaves[1], leaves[2], index, leaves[3])
    if not out.requires_grad:  # the reference builds no graph when nothing is served
        return out, [torch.zeros_like(leaf) for leaf in leaves]
    return out, torch.autograd.grad(out, leaves, grad_out, materialize_grads=True)


def transformers_eager(gate_up, down):
    """transformers' MixtralExperts ('eager' implementation) holding these weights."""
    e, two_i, hid = gate_up.shape
    cfg = MixtralConfig(hidden_size=hid, intermediate_size=two_i // 2, num_local_experts=e)
    experts = MixtralExperts(cfg).to(gate_up.dtype)
    experts.config._experts_implementation = "eager"
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    return experts


# every (T, E, K) in fp32 with and without unserved (-1) entries, a subset in fp64
CASES = [
    (t, e, k, routing, torch.float32)
    for t in (1, 7, 33, 512) for e in (7, 13) for k in (1, 2, e) for routing in ("topk", "neg")
]
CASES += [(t, e, k, "neg", torch.float64) for t in (7, 512) for e in (7, 13) for k in (1, 2, e)]


@pytest.mark.parametrize("t,e,k,routing,dtype", CASES)
def test_matches_reference(t, e, k, routing, dtype):
    case = make_case(t, e, k, routing, dtype)
    grad_out = torch.randn(t, H, dtype=dtype)
    out, g = grads(fused_experts, *case, grad_out)
    ref, g_ref = grads(reference_experts, *case, grad_out)
    assert out.shape == (t, H) and out.dtype == dtype
    assert rel(out, ref) <= FWD_TOL[dtype]
    for name, a, b in zip(("hidden", "gate_up", "down", "weights"), g, g_ref):
        assert a.shape == b.shape, name
        assert rel(a, b) <= GRAD_TOL[dtype], name
    index = case[3]
    assert torch.all(g[3][index < 0] == 0)  # unserved assignments get no weight gradient


@pytest.mark.parametrize("routing", ["topk", "one", "sparse"])
@pytest.mark.parametrize("t,e,k", [(7, 7, 2), (33, 13, 13), (512, 13, 2), (512, 7, 7)])
def test_matches_transformers_eager(t, e, k, routing):
    x, gate_up, down, index, weights = make_case(t, e, k, routing)
    experts = transformers_eager(gate_up, down)
    grad_out = torch.randn(t, H)
    out, g = grads(fused_experts, x, gate_up, down, index, weights, grad_out)
    xr, wr = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    ref = experts(xr, index, wr)
    g_ref = torch.autograd.grad(ref, (xr, experts.gate_up_proj, experts.down_proj, wr), grad_out)
    assert rel(out, ref) <= 1e-5
    for name, a, b in zip(("hidden", "gate_up", "down", "weights"), g, g_ref):
        assert rel(a, b) <= 1e-4, name


@pytest.mark.parametrize("routing", ["one", "sparse", "neg"])
def test_idle_experts_get_exact_zero_stacked_grads(routing):
    x, gate_up, down, index, weights = make_case(33, 13, 2, routing)
    _, (_, g_gu, g_dn, _) = grads(fused_experts, x, gate_up, down, index, weights, torch.randn(33, H))
    assert g_gu.shape == gate_up.shape and g_dn.shape == down.shape
    used = set(index[index >= 0].tolist())
    for e in range(13):
        if e in used:
            assert g_gu[e].abs().sum() > 0 and g_dn[e].abs().sum() > 0
        else:
            assert torch.count_nonzero(g_gu[e]) == 0 and torch.count_nonzero(g_dn[e]) == 0


@pytest.mark.parametrize("tile_rows", [1, 3, 64])
@pytest.mark.parametrize("routing", ["topk", "one", "neg"])
def test_tiling_and_split_experts(monkeypatch, tile_rows, routing):
    """Small tiles: experts split over several tiles (accumulated weight grads) and tiles
    holding several experts."""
    monkeypatch.setattr(kernels, "TILE_ROWS", tile_rows)
    case = make_case(40, 7, 3, routing, torch.float64)
    grad_out = torch.randn(40, H, dtype=torch.float64)
    out, g = grads(fused_experts, *case, grad_out)
    ref, g_ref = grads(reference_experts, *case, grad_out)
    assert rel(out, ref) <= 1e-12
    for a, b in zip(g, g_ref):
        assert rel(a, b) <= 1e-10


@pytest.mark.parametrize("routing", ["topk", "one", "neg"])
@pytest.mark.parametrize("t,e,k,dtype", [(1, 7, 2, torch.float32), (8, 13, 13, torch.float32),
                                         (33, 7, 7, torch.float64), (512, 13, 2, torch.float32)])
def test_aligned_shapes_grouped_mm_path(monkeypatch, t, e, k, routing, dtype):
    """H, I multiples of 4: small problems may run their forward GEMMs via torch._grouped_mm."""
    calls = []
    if hasattr(torch, "_grouped_mm"):
        real = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    case = make_case(t, e, k, routing, dtype, hid=24, inter=12)
    grad_out = torch.randn(t, 24, dtype=dtype)
    out, g = grads(fused_experts, *case, grad_out)
    ref, g_ref = grads(reference_experts, *case, grad_out)
    with torch.no_grad():
        out_ng = fused_experts(*case)
    assert rel(out, ref) <= FWD_TOL[dtype] and rel(out_ng, ref) <= FWD_TOL[dtype]
    for a, b in zip(g, g_ref):
        assert rel(a, b) <= GRAD_TOL[dtype]
    if hasattr(torch, "_grouped_mm") and dtype == torch.float32 and (case[3] >= 0).any():
        assert calls  # the grouped path ran (it only takes fp32/bf16/fp16)


def test_all_unserved_and_empty():
    x, gate_up, down, index, weights = make_case(9, 7, 2)
    index = torch.full_like(index, -1)
    out, (gx, ggu, gdn, gw) = grads(fused_experts, x, gate_up, down, index, weights, torch.randn(9, H))
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(g) == 0 for g in (gx, ggu, gdn, gw))
    x, gate_up, down, index, weights = make_case(0, 7, 2)
    assert fused_experts(x, gate_up, down, index, weights).shape == (0, H)
    out, (gx, ggu, gdn, gw) = grads(fused_experts, x, gate_up, down, index, weights, torch.zeros(0, H))
    assert out.shape == (0, H) and gx.shape == (0, H) and gw.shape == (0, 2)
    assert ggu.shape == gate_up.shape and torch.count_nonzero(ggu) == 0


def test_no_grad_and_int32_index():
    x, gate_up, down, index, weights = make_case(33, 13, 2, "neg")
    ref = reference_experts(x, gate_up, down, index, weights)
    with torch.no_grad():
        out = fused_experts(x, gate_up, down, index.int(), weights.requires_grad_(True))
    assert out.grad_fn is None and not out.requires_grad
    assert rel(out, ref) <= 1e-5


def test_only_requested_grads():
    """Frozen expert weights: only hidden and routing-weight grads are produced."""
    x, gate_up, down, index, weights = make_case(33, 7, 2, "neg", torch.float64)
    xr, wr = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    fused_experts(xr, gate_up, down, index, wr).sum().backward()
    ones = torch.ones(33, H, dtype=torch.float64)
    _, g_ref = grads(reference_experts, x, gate_up, down, index, weights, ones)
    assert rel(xr.grad, g_ref[0]) <= 1e-10 and rel(wr.grad, g_ref[3]) <= 1e-10


def test_gradcheck_float64():
    x, gate_up, down, index, weights = make_case(6, 5, 3, "neg", torch.float64, hid=4, inter=3)
    index[0, 0] = index[0, 1] = 2  # a token routed twice to the same expert
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: fused_experts(a, b, c, index, d), leaves, eps=1e-6, atol=1e-7
    )
