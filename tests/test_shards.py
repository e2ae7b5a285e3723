"""graphprune.shards against the reference implementation: safetensors' own reader and writer, and transformers."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from graphprune.errors import UsageError
from graphprune.shards import INDEX_FILE, ShardReader, ShardWriter


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # bitwise, NaN-safe


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=gen),
        "a.mask": torch.rand(7, generator=gen) > 0.5,  # 7 bytes: what follows is off 4-byte alignment
        "b.weight": torch.randn(33, 17, generator=gen).to(torch.bfloat16),
        "b.half": torch.randn(5, 3, 2, generator=gen).half(),
        "c.scalar": torch.tensor(3.25),
        "c.empty": torch.empty(0, 4),
        "d.index": torch.randint(-(2**40), 2**40, (50,), generator=gen),
        "e.weight": torch.randn(40, 40, generator=gen).t(),  # non-contiguous
        "f.f64": torch.randn(9, generator=gen, dtype=torch.float64),
        "g.i8": torch.randint(-128, 127, (13,), generator=gen, dtype=torch.int8),
    }


def test_round_trip_sharded(tmp_path):
    tensors = sample_tensors()
    with ShardWriter(tmp_path, max_shard_bytes=4096, metadata={"source": "test"}) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    files = writer.close()  # idempotent after the with block closed it
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and files[-1] == INDEX_FILE
    assert sorted(os.listdir(tmp_path)) == sorted(files)  # no temporary files left
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        data = (tmp_path / shard).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        assert (8 + n) % 8 == 0
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "source": "test"}
        part = load_file(str(tmp_path / shard))
        assert all(index["weight_map"][name] == shard for name in part)
        loaded.update(part)
    assert set(loaded) == set(tensors) == set(index["weight_map"])
    for name, t in tensors.items():
        assert_same(loaded[name], t)

    with ShardReader(tmp_path) as reader:
        assert reader.names == list(tensors)  # file order is the order added
        assert reader.total_bytes == index["metadata"]["total_size"]
        assert reader.metadata == {"format": "pt", "source": "test"}
        for name, t in tensors.items():
            assert name in reader
            assert reader.shape(name) == tuple(t.shape) and reader.dtype(name) == t.dtype
            assert reader.nbytes(name) == t.numel() * t.element_size()
            assert reader.file(name) == index["weight_map"][name]
            assert_same(reader.get(name), t)
        assert "nope" not in reader
        with pytest.raises(UsageError, match="no tensor named 'nope'"):
            reader.get("nope")


def test_one_shard_gives_model_safetensors(tmp_path):
    tensors = sample_tensors()
    with ShardWriter(tmp_path) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert_same(loaded[name], t)


def test_large_tensor_gets_its_own_shard(tmp_path):
    with ShardWriter(tmp_path, max_shard_bytes=100) as writer:
        writer.add("small1", torch.zeros(10, dtype=torch.uint8))
        writer.add("big", torch.arange(1000, dtype=torch.int32))
        writer.add("small2", torch.ones(10, dtype=torch.uint8))
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) == 3
    assert_same(ShardReader(tmp_path).get("big"), torch.arange(1000, dtype=torch.int32))


def test_reads_reference_writer_output(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reader = ShardReader(tmp_path)
    assert set(reader.names) == set(tensors)
    for name, t in tensors.items():
        got = reader.get(name)
        assert_same(got, t)
        got.zero_()  # a fresh, writable tensor owned by the caller
    assert reader.metadata == {"format": "pt"}


def test_reads_unindexed_files_and_rejects_duplicates(tmp_path):
    save_file({"x": torch.ones(3)}, str(tmp_path / "part-a.safetensors"))
    save_file({"y": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "part-b.safetensors"))
    reader = ShardReader(tmp_path)
    assert reader.names == ["x", "y"]
    assert_same(reader.get("y"), torch.zeros(2, dtype=torch.int64))
    save_file({"x": torch.ones(3)}, str(tmp_path / "part-c.safetensors"))
    with pytest.raises(UsageError, match="'x' is in both part-a.safetensors and part-c.safetensors"):
        ShardReader(tmp_path)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers, transformers.LlamaForCausalLM(config).eval()


def test_reads_transformers_sharded_checkpoint(tmp_path):
    _, model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / INDEX_FILE).exists()
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3
    state = model.state_dict()
    reader = ShardReader(tmp_path)
    assert set(reader.names) == set(weight_map) and set(reader.names) <= set(state)
    assert len(reader.names) >= len(state) - 1  # at most lm_head tied to the embedding is left out
    for name in reader.names:
        assert_same(reader.get(name), state[name])


def test_writer_output_loads_in_transformers(tmp_path):
    transformers, model = tiny_llama()
    state = model.state_dict()
    with ShardWriter(tmp_path, max_shard_bytes=64 * 1024) as writer:
        for name, t in state.items():
            writer.add(name, t)
    model.config.save_pretrained(tmp_path)
    assert (tmp_path / INDEX_FILE).exists()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for name, t in loaded.state_dict().items():
        assert_same(t, state[name])
    ids = torch.tensor([[1, 5, 17, 99, 3, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_errors_for_directories_without_weights(tmp_path):
    with pytest.raises(UsageError, match=r"no \*\.safetensors weights"):
        ShardReader(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UsageError, match=r"found pytorch_model\.bin.*safe_serialization=True"):
        ShardReader(tmp_path)
    with pytest.raises(UsageError, match="not a directory"):
        ShardReader(tmp_path / "missing")


def test_error_for_index_naming_missing_shard(tmp_path):
    with ShardWriter(tmp_path, max_shard_bytes=16) as writer:
        writer.add("a", torch.ones(4))
        writer.add("b", torch.ones(4))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(UsageError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        ShardReader(tmp_path)


@pytest.mark.parametrize("keep", [5, 20, -3])
def test_error_for_truncated_file(tmp_path, keep):
    save_file({"w": torch.randn(16, 16), "b": torch.randn(16)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # inside the length, inside the JSON header, inside the data
    with pytest.raises(UsageError, match=r"model\.safetensors is not a valid safetensors file.*truncated"):
        ShardReader(tmp_path)


def test_error_for_corrupt_header(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(UsageError, match="should take 16 bytes but its offsets span 8"):
        ShardReader(tmp_path)


def test_writer_rejects_duplicates_and_bad_arguments(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.add("w", torch.ones(2))
        with pytest.raises(ValueError, match="'w' was already added"):
            writer.add("w", torch.zeros(2))
        with pytest.raises(UsageError, match="dtype torch.complex64"):
            writer.add("c", torch.ones(2, dtype=torch.complex64))
    assert_same(load_file(str(tmp_path / "model.safetensors"))["w"], torch.ones(2))  # the first one stays
    with pytest.raises(UsageError, match="already holds model.safetensors"):
        ShardWriter(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="max_shard_bytes must be a positive"):
        ShardWriter(tmp_path / "empty", max_shard_bytes=0)
    with pytest.raises(UsageError, match="not a directory; create it first"):
        ShardWriter(tmp_path / "missing")


def test_writer_exception_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_shard_bytes=16) as writer:
            for i in range(5):
                writer.add(f"t{i}", torch.ones(4))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(UsageError, match="aborted"):
        writer.close()


def test_index_decides_between_files_holding_the_same_name(tmp_path):
    save_file({"x": torch.zeros(3), "y": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.ones(3)}, str(tmp_path / "b.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {"x": "b.safetensors",
                                                                                  "y": "a.safetensors"}}))
    reader = ShardReader(tmp_path)
    assert sorted(reader.names) == ["x", "y"] and reader.file("x") == "b.safetensors"
    assert_same(reader.get("x"), torch.ones(3))
