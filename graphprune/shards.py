"""Streaming read and write of Hugging Face safetensors weight directories.

Pruning a checkpoint larger than RAM goes one decoder layer at a time: ShardReader reads only the headers up
front and each tensor on request; ShardWriter writes each tensor's bytes as soon as it is given. Neither maps the
files (pages of a mapped file that have been touched count in the process's RSS until unmapped), so memory stays at
about the tensors the caller holds.

The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data block, tensors contiguous, row-major,
little-endian, offsets relative to the start of the data block.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from typing import Any

import torch

from .errors import UsageError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference reader's limit: a larger length means a corrupt file
COPY_CHUNK = 16 * 1024 * 1024

# The one torch <-> safetensors dtype table.
_TO_ST: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _TO_ST[getattr(torch, _name)] = _code
_FROM_ST: dict[str, torch.dtype] = {code: dtype for dtype, code in _TO_ST.items()}


def _check_little_endian() -> None:
    # Bytes are moved as they are stored in memory; the format is little-endian.
    if sys.byteorder != "little":
        raise UsageError("safetensors data is little-endian and this host is big-endian; run on a little-endian host")


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a flat uint8 tensor sharing its storage (bf16 and 0-dim included)."""
    return tensor.reshape(-1).view(torch.uint8)


class _Entry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: str, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def _read_header(path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(absolute offset of the data block, {name: header entry}, __metadata__), checked against the file's size."""
    where = f"{path} is not a valid safetensors file"
    fix = "re-download or re-save the checkpoint"
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UsageError(f"{where}: it is {size} bytes, shorter than the 8-byte header length (truncated?); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise UsageError(f"{where}: header length {n} is implausible (corrupt, or not safetensors); {fix}")
        if 8 + n > size:
            raise UsageError(f"{where}: the header needs {n} bytes but the file has {size - 8} after the length "
                             f"(truncated?); {fix}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: its header is not UTF-8 JSON ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise UsageError(f"{where}: its header is not a JSON object; {fix}")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    available = size - data_start
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                  and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"{where}: the header entry of {name!r} is malformed ({info!r}); {fix}")
        if dtype not in _FROM_ST:
            raise UsageError(f"{path}: tensor {name!r} has dtype {dtype!r}, which graphprune does not read "
                             f"(known: {', '.join(sorted(_FROM_ST))}); convert the checkpoint to one of these")
        expected = math.prod(shape) * _FROM_ST[dtype].itemsize
        if end - begin != expected:
            raise UsageError(f"{where}: tensor {name!r} ({dtype} {shape}) should take {expected} bytes but its "
                             f"offsets span {end - begin}; {fix}")
        if end > available:
            raise UsageError(f"{where}: tensor {name!r} ends at data byte {end} but the file holds only {available} "
                             f"bytes of data (truncated?); {fix}")
    return data_start, header, metadata


class ShardReader:
    """The weights of a Hugging Face model directory: model.safetensors, or model.safetensors.index.json and the
    shards it lists. Only headers are read at construction.

    Without an index, every *.safetensors file in the directory is read (names must not repeat across files).
    Each get() opens the file, reads the tensor's bytes straight into a new tensor and closes it again: nothing
    is mapped and nothing is kept, so RSS grows only by the tensors the caller holds on to.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise UsageError(f"{self.directory} is not a directory; pass the model directory that holds the "
                             f"*.safetensors weights")
        files, weight_map = self._find_files()
        self._entries: dict[str, _Entry] = {}
        self._data_start: dict[str, int] = {}
        self.metadata: dict[str, str] = {}
        """The __metadata__ of the first file's header (e.g. {"format": "pt"})."""
        names: list[str] = []
        for file in files:
            start, header, metadata = _read_header(os.path.join(self.directory, file))
            self._data_start[file] = start
            if not self.metadata:
                self.metadata = dict(metadata)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if weight_map is not None and weight_map.get(name, file) != file:
                    continue  # the index says another shard holds this name
                if name in self._entries:
                    raise UsageError(f"tensor {name!r} is in both {self._entries[name].file} and {file} in "
                                     f"{self.directory}; remove the stale file, or add a {INDEX_FILE} that says "
                                     f"which one to use")
                begin, end = info["data_offsets"]
                self._entries[name] = _Entry(file, _FROM_ST[info["dtype"]], tuple(info["shape"]), begin, end)
                names.append(name)
        if weight_map is not None:
            missing = [name for name in weight_map if name not in self._entries]
            if missing:
                raise UsageError(f"{INDEX_FILE} in {self.directory} maps {len(missing)} tensor(s) to shards whose "
                                 f"headers do not hold them (first: {missing[0]!r} in {weight_map[missing[0]]}); "
                                 f"the index and shards are from different saves: re-download or re-save")
        self.names: list[str] = names
        self._stored: dict[str, str] = {}  # name -> key in the files, where rename() gave it another name
        self.total_bytes: int = sum(e.end - e.begin for e in self._entries.values())

    def _find_files(self) -> tuple[list[str], dict[str, str] | None]:
        """The shard files to read, and the index's weight_map when there is an index."""
        index_path = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not {name: file}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{index_path} is not a valid safetensors index ({exc}); re-download or re-save "
                                 f"the checkpoint") from None
            files = sorted(set(weight_map.values()))
            for file in files:
                if os.path.basename(file) != file or file in ("", ".", ".."):
                    raise UsageError(f"{index_path} names shard {file!r}, which is not a file name in the same "
                                     f"directory; fix the index")
                if not os.path.isfile(os.path.join(self.directory, file)):
                    raise UsageError(f"{index_path} names shard {file}, which is missing from {self.directory}; "
                                     f"the download is incomplete: fetch the missing shard or re-save the model")
            return files, weight_map
        files = sorted(f for f in os.listdir(self.directory)
                       if f.endswith(".safetensors") and os.path.isfile(os.path.join(self.directory, f)))
        if not files:
            pickles = sorted(f for f in os.listdir(self.directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            found = f" (found {', '.join(pickles[:3])}{' ...' if len(pickles) > 3 else ''})" if pickles else ""
            raise UsageError(f"{self.directory} holds no *.safetensors weights{found}; graphprune does not read "
                             f".bin / .pt pickles: convert with model.save_pretrained(directory, "
                             f"safe_serialization=True)")
        return files, None

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(f"no tensor named {name!r} in {self.directory}; ShardReader.names lists the "
                             f"{len(self._entries)} it holds") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        entry = self._entry(name)
        return entry.end - entry.begin

    def file(self, name: str) -> str:
        """The name of the file (in the directory) that holds the tensor."""
        return self._entry(name).file

    def get(self, name: str) -> torch.Tensor:
        """A new CPU tensor of the stored dtype and shape, read with one seek and readinto; nothing stays open."""
        _check_little_endian()
        entry = self._entry(name)
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        want = entry.end - entry.begin
        if want == 0:
            return tensor
        path = os.path.join(self.directory, entry.file)
        view = memoryview(_byte_view(tensor).numpy())
        with open(path, "rb", buffering=0) as fh:
            fh.seek(self._data_start[entry.file] + entry.begin)
            got = 0
            while got < want:  # unbuffered reads may return less than asked
                n = fh.readinto(view[got:])
                if not n:
                    raise UsageError(f"{path} ended inside tensor {name!r} ({got} of {want} bytes read): the file "
                                     f"was truncated or replaced after it was opened; re-download or re-save it")
                got += n
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def rename(self, stored: dict[str, str]) -> None:
        """Address tensors by other names, {name: stored key}: a model's parameter names where its checkpoint keys
        differ (transformers renames some while loading, e.g. GPT-NeoX's embed_out is lm_head)."""
        moved = {name: self._entry(key) for name, key in stored.items()}
        for key in stored.values():
            del self._entries[key]
        self._entries.update(moved)
        back = {key: name for name, key in stored.items()}
        self.names = [back.get(n, n) for n in self.names]
        self._stored.update(stored)

    def stored_name(self, name: str) -> str:
        """The key `name` has in the files (see rename)."""
        return self._stored.get(name, name)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Nothing to release (files are opened per get); here so ShardReader reads like any other resource."""

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardReader({self.directory!r}: {len(self._entries)} tensors, {self.total_bytes} bytes)"


class _Shard:
    __slots__ = ("temp", "entries", "size")

    def __init__(self, temp: str):
        self.temp = temp
        self.entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype code, shape, begin, end
        self.size = 0


class ShardWriter:
    """Writes tensors to safetensors shards as they come, so no more than one tensor is held for writing.
    Shards hold at most max_shard_bytes of data (a larger single tensor gets a shard of its own).

    Tensors go to the files in the order they are added. Each shard's data goes to a temporary file first
    (its header, and so where its data starts, is known only at the end); close() writes each shard as header
    plus data and removes the temporary file, so the disk briefly holds one shard twice. The directory must
    exist and must not already hold safetensors weights: write to a new temporary directory and rename it when
    done. `metadata` goes into every header, on top of {"format": "pt"} (which transformers requires).
    """

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3,
                 metadata: dict | None = None):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise UsageError(f"cannot write shards to {self.directory}: it is not a directory; create it first "
                             f"(e.g. a temporary directory renamed into place when the writer is closed)")
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise UsageError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
        stale = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors") or f == INDEX_FILE)
        if stale:
            raise UsageError(f"{self.directory} already holds {', '.join(stale[:3])}"
                             f"{' ...' if len(stale) > 3 else ''}; old and new shards would mix: write to an empty "
                             f"directory")
        self.metadata: dict[str, str] = {"format": "pt", **(metadata or {})}
        bad = [k for k, v in self.metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise UsageError(f"safetensors metadata must map str to str; {bad[0]!r} does not: convert the values "
                             f"with str() or json.dumps()")
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self._fh = None  # the current shard's temporary data file
        self._written: list[str] = []  # final files written so far (removed if closing fails)
        self._closed = self._aborted = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the tensor's bytes now; the caller may drop the tensor as soon as this returns."""
        if self._closed:
            raise UsageError(f"cannot add {name!r}: the ShardWriter is closed; add every tensor before close()")
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor names must be non-empty strings other than '__metadata__', got {name!r}")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already added to this ShardWriter; each name is written once "
                             f"(tied weights: add the shared tensor under one name)")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in _TO_ST:
            raise UsageError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store here "
                             f"(storable: {', '.join(str(d) for d in _TO_ST)}); convert it with .to(...)")
        if tensor.is_sparse or tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
            raise UsageError(f"tensor {name!r} is not a dense tensor with data ({tensor.layout}, device "
                             f"{tensor.device}); materialize it (e.g. .to_dense(), or load real weights) first")
        _check_little_endian()
        data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        nbytes = data.numel() * data.element_size()
        shard = self._shards[-1] if self._shards else None
        if shard is None or (shard.size and shard.size + nbytes > self.max_shard_bytes):
            shard = self._start_shard()
        begin = shard.size
        if nbytes:
            self._fh.write(memoryview(_byte_view(data).numpy()))
        shard.entries.append((name, _TO_ST[data.dtype], list(data.shape), begin, begin + nbytes))
        shard.size += nbytes
        self._names.add(name)

    def _start_shard(self) -> _Shard:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shard = _Shard(os.path.join(self.directory, f".graphprune-shard-{len(self._shards) + 1:05d}.data.tmp"))
        self._shards.append(shard)
        self._fh = open(shard.temp, "wb")  # noqa: SIM115 -- stays open across add() calls
        return shard

    def close(self) -> list[str]:
        """Write the shard files (and the index when there are several); returns their names, index last."""
        if self._aborted:
            raise UsageError("this ShardWriter was aborted and its files removed; write the tensors again with a "
                             "new ShardWriter")
        if self._closed:
            return list(self._written)
        try:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            shards = self._shards or [None]  # nothing added: one file with only metadata
            count = len(shards)
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, 1):
                file = SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
                self._write_shard(file, shard)
                for entry in shard.entries if shard else ():
                    weight_map[entry[0]] = file
            if count > 1:
                total = sum(shard.size for shard in self._shards)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                self._written.append(INDEX_FILE)
                with open(os.path.join(self.directory, INDEX_FILE), "w", encoding="utf-8") as fh:
                    fh.write(json.dumps(index, indent=2) + "\n")
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return list(self._written)

    def _write_shard(self, file: str, shard: _Shard | None) -> None:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        for name, code, shape, begin, end in shard.entries if shard else ():
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # the data block starts on an 8-byte boundary, as the reference writes
        self._written.append(file)
        with open(os.path.join(self.directory, file), "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            if shard is not None:
                with open(shard.temp, "rb") as src:
                    shutil.copyfileobj(src, out, COPY_CHUNK)
        if shard is not None:
            os.unlink(shard.temp)

    def abort(self) -> None:
        """Remove every file this writer made (temporary data and any shards already written)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for path in [s.temp for s in self._shards] + [os.path.join(self.directory, f) for f in self._written]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._written.clear()
        self._closed = self._aborted = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without close() would leave its temporary data files behind.
        if getattr(self, "_fh", None) is not None and not getattr(self, "_closed", True):
            self.abort()
