"""The checkpoint index reads each expert's own tensors, for every family, sharded or not."""

import json

import pytest
import torch
from moecluster.models.checkpoint import Checkpoint, CheckpointError
from moecluster.models.tiny import create_checkpoint
from shared import FAMILIES
from transformers import AutoModelForCausalLM


def experts_modules(model):
    return {int(name.split(".layers.")[1].split(".")[0]): m for name, m in model.named_modules()
            if name.endswith(".experts") and hasattr(m, "gate_up_proj")}


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_equal_what_transformers_loads(checkpoints, family):
    path = checkpoints[family]
    index = Checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    modules = experts_modules(model)
    assert tuple(sorted(modules)) == index.geometry.moe_layers
    for layer, module in modules.items():
        for expert in range(index.geometry.num_experts):
            gate_up, down = index.read_expert(layer, expert)
            assert torch.equal(gate_up, module.gate_up_proj[expert].detach())
            assert torch.equal(down, module.down_proj[expert].detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_part_has_no_expert_tensor_and_fits_the_model(checkpoints, family):
    index = Checkpoint(checkpoints[family])
    assert not any(".experts." in name for name in index.dense)
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in index.read_dense().items():
        assert torch.equal(tensor, params[name].detach()), name


def test_reading_one_expert_touches_only_its_tensors(checkpoints):
    index = Checkpoint(checkpoints["mixtral"])
    refs = index.experts[(1, 3)]
    keys = [r.key for r in refs.gate_up + refs.down]
    assert keys == ["model.layers.1.block_sparse_moe.experts.3.w1.weight",
                    "model.layers.1.block_sparse_moe.experts.3.w3.weight",
                    "model.layers.1.block_sparse_moe.experts.3.w2.weight"]


def test_sharded_checkpoint_through_its_index(tmp_path):
    path = create_checkpoint("qwen3_moe", tmp_path / "sharded", max_shard_size="40KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    index = Checkpoint(path)
    files = {r.file for refs in index.experts.values() for r in refs.gate_up + refs.down}
    assert len(files) > 1
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    module = experts_modules(model)[1]
    gate_up, down = index.read_expert(1, 7)
    assert torch.equal(gate_up, module.gate_up_proj[7].detach()) and torch.equal(down, module.down_proj[7].detach())


def test_stacked_checkpoint_format_is_read_row_by_row(tmp_path, checkpoints):
    """Checkpoints already in transformers' fused layout (gate_up_proj [E, 2I, H]) work too."""
    from safetensors.torch import save_file

    source = checkpoints["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    out = tmp_path / "stacked"
    out.mkdir()
    (out / "config.json").write_text((source / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    index = Checkpoint(out)
    module = experts_modules(model)[0]
    gate_up, down = index.read_expert(0, 5)
    assert torch.equal(gate_up, module.gate_up_proj[5].detach()) and torch.equal(down, module.down_proj[5].detach())


def test_clear_errors(tmp_path, checkpoints):
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model family 'llama'"):
        Checkpoint(tmp_path)
    index = Checkpoint(checkpoints["olmoe"])
    with pytest.raises(CheckpointError, match="no expert 99 in layer 0"):
        index.read_expert(0, 99)


def test_tiny_checkpoint_rejects_impossible_shapes(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        create_checkpoint("mixtral", tmp_path / "x", experts=2, top_k=3)
    with pytest.raises(ValueError, match="unsupported model family"):
        create_checkpoint("gpt2", tmp_path / "y")


def test_saved_index_reads_the_same_experts_without_transformers(tmp_path, checkpoints):
    import subprocess
    import sys

    index = Checkpoint(checkpoints["mixtral"])
    index.save_index(tmp_path / "index.json")
    loaded = Checkpoint.from_index(tmp_path / "index.json")
    assert loaded.geometry == index.geometry
    for key in [(0, 0), (1, 7)]:
        assert all(torch.equal(a, b) for a, b in zip(loaded.read_expert(*key), index.read_expert(*key)))
    probe = subprocess.run([sys.executable, "-c", "import sys; from moecluster.models.checkpoint import Checkpoint; "
                            f"Checkpoint.from_index({str(tmp_path / 'index.json')!r}).read_expert(0, 1); "
                            "print('transformers' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr


def test_indexed_reuses_an_index_of_the_same_files_without_torch_and_indexes_a_changed_checkpoint_again(tmp_path):
    import os
    import subprocess
    import sys

    model = create_checkpoint("qwen3_moe", tmp_path / "model", layers=2, experts=4, top_k=2)
    index = tmp_path / "index.json"
    assert Checkpoint.indexed(model, index).geometry.num_experts == 4
    # What a restarted controller does: no transformers, no torch (seconds of its restart).
    probe = subprocess.run([sys.executable, "-c", "import sys; from moecluster.models.checkpoint import Checkpoint; "
                            f"g = Checkpoint.indexed({str(model)!r}, {str(index)!r}).geometry; "
                            "print(g.num_experts, 'transformers' in sys.modules, 'torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["4", "False", "False"], probe.stderr
    # The checkpoint replaced in place (more experts, new files): the old index must not be trusted.
    create_checkpoint("qwen3_moe", model, layers=2, experts=6, top_k=2)
    config = model / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # even within one mtime tick
    assert Checkpoint.indexed(model, index).geometry.num_experts == 6
    index.write_text("{torn")
    assert Checkpoint.indexed(model, index).geometry.num_experts == 6
    assert json.loads(index.read_text())["path"] == str(model.resolve())
