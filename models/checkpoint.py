"""A Hugging Face MoE checkpoint seen as experts + the dense rest.

Nothing is loaded up front: the index maps each (layer, expert) to the tensor
names that make it, and each dense parameter to its tensor, so a worker reads
only its own experts and the frontend only the dense part. The names come from
`transformers`' own checkpoint conversion mapping (the rules it uses to stack
per-expert tensors into `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`),
so every family it knows is read the way it reads it.

Indexing needs transformers and torch (seconds to import); the index written by
`save_index` does not, so workers and a restarted controller start from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from moecluster.models.families import family
from safetensors import safe_open

if TYPE_CHECKING:
    import torch

_EXPERT_PARAM = re.compile(r"^(?P<module>.*\.layers\.(?P<layer>\d+)\..*experts)\.(?P<param>gate_up_proj|down_proj)$")
_EXPERT_NUMBER = re.compile(r"experts\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be served; the text says what is wrong and where."""


@dataclass(frozen=True)
class TensorRef:
    file: str  # safetensors file name inside the checkpoint folder
    key: str  # tensor name in that file
    row: int | None = None  # index along dim 0 when the file stores all experts stacked


@dataclass
class ExpertRefs:
    gate_up: list[TensorRef] = field(default_factory=list)  # concatenated along dim 0, in order
    down: list[TensorRef] = field(default_factory=list)


@dataclass(frozen=True)
class Geometry:
    """Shapes every worker and frontend must agree on."""

    moe_layers: tuple[int, ...]  # decoder layer indices that have routed experts
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int


class Checkpoint:
    """Index of a checkpoint folder (config.json + *.safetensors, optionally sharded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: no config.json; expected a Hugging Face checkpoint folder")
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(self.path)
        self.family = family(self.config.model_type)
        self.experts: dict[tuple[int, int], ExpertRefs] = {}
        self.dense: dict[str, TensorRef] = {}
        self._index(self._tensor_files())
        self.geometry = self._geometry()

    @classmethod
    def indexed(cls, path: str | Path, index_file: str | Path) -> "Checkpoint":
        """The checkpoint's expert index (`from_index`): read from `index_file` when it was written for these very
        files, else indexed anew and written there. A restarted controller so starts without transformers or torch."""
        path, index_file = Path(path).resolve(), Path(index_file)
        try:
            data = json.loads(index_file.read_text())
            if data.get("path") == str(path) and data.get("files") == _fingerprint(path):
                return cls.from_index(index_file)
        except (OSError, ValueError):  # missing or torn: index again
            pass
        cls(path).save_index(index_file)
        return cls.from_index(index_file)

    def save_index(self, file: str | Path) -> None:
        """Writes what `from_index` needs: a worker started from it never imports transformers (seconds saved)."""
        refs = lambda rs: [[r.file, r.key, r.row] for r in rs]  # noqa: E731
        data = {
            "path": str(self.path.resolve()),
            "files": _fingerprint(self.path),
            "geometry": {**self.geometry.__dict__, "moe_layers": list(self.geometry.moe_layers)},
            "experts": [[layer, expert, refs(r.gate_up), refs(r.down)] for (layer, expert), r in sorted(self.experts.items())],
        }
        Path(file).write_text(json.dumps(data))

    @classmethod
    def from_index(cls, file: str | Path) -> "Checkpoint":
        """A Checkpoint for reading experts only (no config, no dense tensors), from `save_index`'s file."""
        data = json.loads(Path(file).read_text())
        self = cls.__new__(cls)
        self.path = Path(data["path"])
        self.config = None
        self.dense = {}
        self.experts = {
            (layer, expert): ExpertRefs([TensorRef(*r) for r in gate_up], [TensorRef(*r) for r in down])
            for layer, expert, gate_up, down in data["experts"]
        }
        geometry = data["geometry"]
        self.geometry = Geometry(**{**geometry, "moe_layers": tuple(geometry["moe_layers"])})
        return self

    def skeleton(self) -> torch.nn.Module:
        """The model on the meta device: structure without memory."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)

    def _tensor_files(self) -> dict[str, str]:
        """tensor name -> file name, through model.safetensors.index.json when sharded."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        names = {}
        for f in files:
            with safe_open(f, "pt") as handle:
                names.update({k: f.name for k in handle.keys()})
        return names

    def _index(self, tensor_files: dict[str, str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        model = self.skeleton()
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        for key in sorted(tensor_files):
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
            ref = TensorRef(tensor_files[key], key)
            match = _EXPERT_PARAM.match(target)
            if match is None:
                self.dense[target] = ref
                continue
            layer, field_name = int(match["layer"]), "gate_up" if match["param"] == "gate_up_proj" else "down"
            if pattern is None:  # already stacked on disk: one row per expert
                with safe_open(self.path / ref.file, "pt") as handle:
                    count = handle.get_slice(key).get_shape()[0]
                for expert in range(count):
                    refs = self.experts.setdefault((layer, expert), ExpertRefs())
                    getattr(refs, field_name).append((0, TensorRef(ref.file, key, expert)))
                continue
            number = _EXPERT_NUMBER.search(key)
            if number is None:
                raise CheckpointError(f"{key}: expert tensor without an expert number")
            refs = self.experts.setdefault((layer, int(number[1])), ExpertRefs())
            converter = next(c for c in converters if pattern in c.source_patterns)
            # The converter concatenates its sources in order (gate before up): remember each part's rank.
            getattr(refs, field_name).append((converter.source_patterns.index(pattern), ref))
        for refs in self.experts.values():
            refs.gate_up = [ref for _, ref in sorted(refs.gate_up, key=lambda part: part[0])]
            refs.down = [ref for _, ref in sorted(refs.down, key=lambda part: part[0])]

    def _geometry(self) -> Geometry:
        if not self.experts:
            raise CheckpointError(f"{self.path}: no routed expert tensors found for a {self.config.model_type} model")
        layers = sorted({layer for layer, _ in self.experts})
        num_experts = getattr(self.config, self.family.experts_field)
        for layer in layers:
            missing = [e for e in range(num_experts) if (layer, e) not in self.experts]
            if missing:
                raise CheckpointError(f"{self.path}: layer {layer} lacks experts {missing[:8]}")
        return Geometry(
            moe_layers=tuple(layers),
            num_experts=num_experts,
            top_k=self.config.num_experts_per_tok,
            hidden=self.config.hidden_size,
            intermediate=getattr(self.config, self.family.intermediate_field),
        )

    @cached_property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights in fp32."""
        g = self.geometry
        return 3 * g.hidden * g.intermediate * 4

    def read_expert(self, layer: int, expert: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads one expert's tensors only: gate_up (2I, H) and down (H, I) in `dtype` (fp32 by default)."""
        import torch

        dtype = dtype or torch.float32
        refs = self.experts.get((layer, expert))
        if refs is None:
            raise CheckpointError(f"{self.path}: no expert {expert} in layer {layer}")
        gate_up = torch.cat([self._read(r) for r in refs.gate_up], dim=0).to(dtype)
        down = torch.cat([self._read(r) for r in refs.down], dim=0).to(dtype)
        g = self.geometry
        if gate_up.shape != (2 * g.intermediate, g.hidden) or down.shape != (g.hidden, g.intermediate):
            raise CheckpointError(
                f"expert ({layer}, {expert}): shapes {tuple(gate_up.shape)}, {tuple(down.shape)} do not match "
                f"hidden {g.hidden} / intermediate {g.intermediate}"
            )
        return gate_up.contiguous(), down.contiguous()

    def read_dense(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every non-expert tensor, keyed by the model's parameter names (floats in `dtype`, fp32 by default)."""
        import torch

        out = {}
        for name, ref in self.dense.items():
            tensor = self._read(ref)
            out[name] = tensor.to(dtype or torch.float32) if tensor.is_floating_point() else tensor
        return out

    def _read(self, ref: TensorRef) -> torch.Tensor:
        with safe_open(self.path / ref.file, "pt") as handle:
            if ref.row is None:
                return handle.get_tensor(ref.key)
            return handle.get_slice(ref.key)[ref.row]


def _fingerprint(path: Path) -> dict[str, list[int]]:
    """Size and modification time of each file an index is built from: an index outlives no change to them."""
    files = [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.safetensors.index.json"))]
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
