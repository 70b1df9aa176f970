"""Several inference forwards of one layer computed in one kernel call.

Each request is checked on its own against the layer's snapshot (an expert not held
here fails that request alone, FAILED_PRECONDITION); the rest are stacked, padded to
the widest top-k with skipped slots (-1, weight 0), computed by one `fused_experts`
call, and split back in order. Every expert's weights are read once per call instead
of once per request, which is what a decode step's small requests spend their time on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from moecluster.workers.expert_store import LayerExperts
from moecluster.workers.kernels import fused_experts
from moecluster.workers.request_error import RequestError
from moecluster.workers.validation import ForwardInputs, check_held


def forward_together(snapshot: LayerExperts | None, requests: Sequence[ForwardInputs], epoch: int, *,
                     device: torch.device, dtype: torch.dtype,
                     check: Callable[[ForwardInputs], None] | None = None) -> list[torch.Tensor | RequestError]:
    """One outcome per request, in order: its (T, H) output on the CPU in its own dtype, or the
    RequestError that refused it. `check` runs after a request's experts are found held."""
    outcomes: list[torch.Tensor | RequestError | None] = [None] * len(requests)
    computed: list[tuple[int, torch.Tensor]] = []  # (request, its local slots)
    for i, inputs in enumerate(requests):
        try:
            local = check_held(snapshot, inputs, epoch)
            if check is not None:
                check(inputs)
        except RequestError as err:
            outcomes[i] = err
            continue
        if bool((local >= 0).any()):
            computed.append((i, local))
        else:  # every entry is -1: nothing to compute here
            outcomes[i] = torch.zeros_like(inputs.hidden_states)
    if computed:
        width = max(local.shape[1] for _, local in computed)
        index = torch.cat([_widen(local, width, -1) for _, local in computed])
        weights = torch.cat([_widen(requests[i].top_k_weights.to(dtype), width, 0) for i, _ in computed])
        hidden = torch.cat([requests[i].hidden_states.to(dtype) for i, _ in computed])
        with torch.no_grad():
            output = fused_experts(hidden.to(device), snapshot.gate_up, snapshot.down, index.to(device),
                                   weights.to(device)).to("cpu")
        rows = [len(requests[i].hidden_states) for i, _ in computed]
        for (i, _), part in zip(computed, output.split(rows)):
            outcomes[i] = part.to(requests[i].hidden_states.dtype)
    return outcomes


def _widen(tensor: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """(T, K) -> (T, width), the new columns `fill`."""
    if tensor.shape[1] == width:
        return tensor
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], width - tensor.shape[1]), fill)], dim=1)
