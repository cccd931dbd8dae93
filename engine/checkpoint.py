"""Opens a model folder: validates it, maps tensor names to shards, reads tensors lazily.

Every problem a user can cause (wrong folder, missing or truncated shard, unknown
architecture, config that does not match the tensors) becomes one CheckpointError sentence
that says what is wrong and what to do. Weights are read only from safetensors (mmap).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError
from engine.model.config import ModelConfig
from engine.model.names import expected_tensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_DTYPES = ("BF16", "F32", "F16")
DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4, "U8": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str  # in the file
    file: Path | None  # None: derived (Checkpoint.derived forms it)
    dtype: str
    shape: tuple[int, ...]
    num_bytes: int
    file_offset: int  # where the tensor's bytes start in `file` (for zero-copy memory maps)


class Checkpoint:
    """A validated model folder. `get()` reads one tensor, memory-mapped, on demand."""

    def __init__(self, path: Path, config: ModelConfig, raw_config: dict[str, Any],
                 tensors: dict[str, TensorInfo], derived: dict[str, Callable[[], Any]] | None = None,
                 native: dict[str, TensorInfo] | None = None) -> None:
        """`derived`: tensors formed from others when read (a Mistral-native folder's NVFP4
        shared experts, dequantised to fp32), listed in `tensors` with their shape, the bf16
        size the engine holds them in, and no file. `native`: every tensor under the folder's own names, where they differ
        (the host store reads the NVFP4 experts as shipped); `tensors` holds the engine's names."""
        self.path = path
        self.config = config
        self.raw_config = raw_config
        self.tensors = tensors
        self.derived = derived or {}
        self.native = native or {}
        self._handles: dict[Path, Any] = {}

    @property
    def total_bytes(self) -> int:
        """Bytes of the files' tensors (derived ones are views of these)."""
        stored = self.native.values() if self.native else self.tensors.values()
        return sum(t.num_bytes for t in stored if t.file is not None)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def open(cls, path: Path | str) -> Checkpoint:
        """Validate the folder and index its tensors (reads only headers). Raises CheckpointError.
        Mistral's native layout (params.json, consolidated-*.safetensors: the NVFP4 release) is
        read through engine.checkpoint_native under the engine's names."""
        folder = _check_folder(Path(path).expanduser())
        if _is_native(folder):
            from engine.checkpoint_native import open_native

            return open_native(folder)
        raw = _read_json(folder / "config.json", "config.json")
        config = ModelConfig.from_hf(raw, where=str(folder / "config.json"))
        tensors = index_tensors(folder, INDEX_FILE, SINGLE_FILE)
        _check_against_config(folder, config, tensors)
        return cls(folder, config, raw, tensors)

    def get(self, name: str, device: str = "cpu"):
        """One tensor as stored (FP8 stays FP8), memory-mapped from its shard; a derived one as
        formed on reading. `name` is the engine's (or, for `native` tensors, the folder's)."""
        if name in self.derived:
            return self.derived[name]()
        info = self.tensors.get(name) or self.native.get(name)
        if info is None or info.file is None:
            raise CheckpointError(f"{self.path} has no tensor {name}; the checkpoint is incomplete.")
        return self._read(info, device)

    def _read(self, info: TensorInfo, device: str = "cpu"):
        from safetensors import safe_open

        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(str(info.file), framework="pt", device=device)
            self._handles[info.file] = handle
        name = info.name  # the name in the file, which a native folder's renaming keeps
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # I/O error on a removable drive, a shard replaced on disk
            raise CheckpointError(
                f"Reading {name} from {info.file.name} failed ({exc}). "
                "Check that the drive is still connected and the file is intact."
            ) from exc

    def close(self) -> None:
        self._handles.clear()


def _check_folder(folder: Path) -> Path:
    if not folder.exists():
        raise CheckpointError(f"The folder {folder} does not exist. Choose the model folder again.")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is a file, not a folder. Choose the folder that holds config.json and "
            "the model-0000x-of-0000y.safetensors files."
        )
    if not (folder / "config.json").is_file() and not (folder / "params.json").is_file():
        hint = ""
        subdirs = [p for p in folder.iterdir() if p.is_dir() and
                   ((p / "config.json").is_file() or (p / "params.json").is_file())]
        if subdirs:
            hint = f" It looks like the model is in {subdirs[0]}."
        raise CheckpointError(
            f"{folder} has no config.json (nor params.json), so it is not a model folder.{hint} "
            "Choose the folder that holds config.json and the model-0000x-of-0000y.safetensors "
            "files (or, for the NVFP4 release, params.json and the consolidated files)."
        )
    return folder


def _is_native(folder: Path) -> bool:
    """Mistral's native layout: params.json without config.json, or beside a config.json that
    describes compressed-tensors weights (what a Hugging Face export of the NVFP4 release
    would say; Quire reads that release's own files)."""
    if not (folder / "params.json").is_file():
        return False
    if not (folder / "config.json").is_file():
        return True
    try:
        quant = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False  # config.json's own reading reports what is wrong with it
    return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{label} in {path.parent} cannot be read ({exc}). "
            f"Copy {label} again from the original model download."
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{label} in {path.parent} is not a JSON object; copy it again.")
    return data


def _weight_map(folder: Path, index_file: str, single_file: str) -> dict[str, str]:
    if (folder / index_file).is_file():
        index = _read_json(folder / index_file, index_file)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} in {folder} lists no tensors; copy it again.")
        return weight_map
    if (folder / single_file).is_file():
        return {}
    raise CheckpointError(
        f"{folder} has no weights: neither {index_file} nor {single_file} is there. "
        "Copy the whole model folder, including every .safetensors file."
    )


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header and check the file holds all the bytes it promises.

    Returns the tensor entries and the file offset where the data section starts.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{file.name} in {file.parent} is not a readable safetensors file ({exc}); it is "
            "damaged or truncated. Copy it again from the original model download."
        ) from exc
    header.pop("__metadata__", None)
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + data_end > size:
        missing = 8 + header_len + data_end - size
        raise CheckpointError(
            f"{file.name} in {file.parent} is truncated ({missing:,} bytes missing); the copy "
            "did not finish. Copy this file again from the original model download."
        )
    return header, 8 + header_len


def index_tensors(folder: Path, index_file: str, single_file: str) -> dict[str, TensorInfo]:
    """Every tensor of the folder's shards (listed by `index_file`, else the one `single_file`)
    by its name in the files, checked against the index."""
    weight_map = _weight_map(folder, index_file, single_file)
    files = sorted(set(weight_map.values())) or [single_file]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is missing {len(missing)} of {len(files)} weight files ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}). Copy the missing files into the folder."
        )
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        file = folder / fname
        header, data_start = read_header(file)
        for name, meta in header.items():
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (int(x) for x in meta["data_offsets"])
            tensors[name] = TensorInfo(name, file, str(meta["dtype"]), shape, end - start,
                                       data_start + start)
    for name, fname in weight_map.items():
        if name not in tensors or tensors[name].file.name != fname:
            raise CheckpointError(
                f"{index_file} says {name} is in {fname}, but it is not there; the folder mixes "
                "files from different downloads. Copy the whole model folder again."
            )
    return tensors


def _check_against_config(folder: Path, config: ModelConfig, tensors: dict[str, TensorInfo]) -> None:
    expected = expected_tensors(config)
    absent = [n for n in expected if n not in tensors]
    if absent:
        raise CheckpointError(
            f"{folder} lacks {len(absent)} tensor(s) that config.json calls for, e.g. {absent[0]}; "
            "the download is incomplete or config.json belongs to another model."
        )
    unused = [n for n in tensors if n not in expected]
    if unused:
        raise CheckpointError(
            f"{folder} holds {len(unused)} tensor(s) that config.json does not describe, e.g. "
            f"{unused[0]}; this is a different model variant or a damaged index."
        )
    for name, (dtype, shape) in expected.items():
        info = tensors[name]
        is_scale = name.endswith(("scale_inv", "activation_scale"))
        shape_ok = info.shape == shape or (is_scale and shape == () and info.shape == (1,))
        dtype_ok = info.dtype == dtype or (is_scale and info.dtype in SCALE_DTYPES)
        if not (shape_ok and dtype_ok):
            raise CheckpointError(
                f"{name} is {info.dtype}{list(info.shape)} but config.json implies "
                f"{dtype}{list(shape)}: config.json does not match the weights. Copy config.json "
                "again from the same download as the .safetensors files."
            )
