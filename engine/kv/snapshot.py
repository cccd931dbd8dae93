"""Snapshots of a session's prefix KV cache on disk, so a reopened document session (even after
a restart) does not re-read its documents.

One safetensors file per session with JSON metadata: format version, model identity, token
count, a digest of the prefix's token key and a checksum of the tensor bytes. A corrupt,
truncated or mismatched snapshot is detected, deleted and rebuilt, never used. A byte budget
evicts the least recently used snapshots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
FORMAT = "quire-kv-snapshot-v2"  # v2: checksums by CRC-32 of 64 MiB pieces


def digest_key(key: list[int]) -> str:
    return hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()


CHECKSUM_PIECE = 1 << 26  # bytes a thread checks at once


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of every tensor's bytes, to catch a corrupt or truncated file (not an attack:
    the folder is the user's own). CRC-32 of 64 MiB pieces on all cores (zlib releases the GIL):
    a 36-layer 100K-token snapshot is ~4 GB, which one BLAKE2 pass read at 0.8 GB/s."""
    pieces = []
    for name in sorted(tensors):
        data = tensors[name].contiguous().view(torch.uint8).reshape(-1).numpy()
        pieces += [(name, data[i : i + CHECKSUM_PIECE])
                   for i in range(0, max(len(data), 1), CHECKSUM_PIECE)]
    with ThreadPoolExecutor(max(1, min(len(pieces), os.cpu_count() or 1))) as pool:
        crcs = list(pool.map(lambda piece: zlib.crc32(piece[1]), pieces))
    h = hashlib.blake2b(digest_size=16)
    for (name, piece), crc in zip(pieces, crcs, strict=True):
        h.update(f"{name}:{len(piece)}:{crc:08x};".encode())
    return h.hexdigest()


SAMPLE_BYTES = 1 << 20


def model_identity(model_dir: Path, dtype: str) -> str:
    """Changes whenever the weights, the config or the cache's numeric format could.

    Hashing 120 GB of weights would take minutes, so each shard contributes its size and its
    first and last MiB (the header and real weight bytes): enough to tell checkpoints apart.
    """
    h = hashlib.blake2b(digest_size=16)
    for name in ("config.json", "model.safetensors.index.json", "params.json",
                 "consolidated.safetensors.index.json"):
        path = model_dir / name
        if path.is_file():
            h.update(path.read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}".encode())
        with shard.open("rb") as f:
            h.update(f.read(SAMPLE_BYTES))
            f.seek(max(0, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    h.update(dtype.encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    key: list[int]
    state: dict[str, torch.Tensor]


class SnapshotStore:
    def __init__(self, folder: Path, identity: str, budget_bytes: int = 20 * 2**30) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.budget_bytes = budget_bytes
        # Checksumming and writing a 100K-token prefix takes seconds: done off the engine thread.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="quire-snapshot")
        self._pending: dict[str, Future] = {}

    def save_in_background(self, session: str, key: list[int], state: dict[str, torch.Tensor]) -> None:
        """Queue a save (`state` must already be CPU tensors); errors are logged, not raised."""
        def save() -> None:
            try:
                self.save(session, key, state)
            except OSError as exc:  # disk full, read-only cache: the session just re-reads later
                log.warning("could not save the KV snapshot of %s: %s", session, exc)

        self._pending[session] = self._writer.submit(save)

    def flush(self) -> None:
        for future in list(self._pending.values()):
            future.result()
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)

    def path_for(self, session: str) -> Path:
        name = hashlib.blake2b(f"{self.identity}:{session}".encode(), digest_size=12).hexdigest()
        return self.folder / f"{name}.safetensors"

    def save(self, session: str, key: list[int], state: dict[str, torch.Tensor]) -> Path:
        """Write atomically (temp file + rename), then apply the byte budget."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_for(session)
        meta = {"format": FORMAT, "identity": self.identity, "num_tokens": str(len(key)),
                "key": json.dumps(key), "key_digest": digest_key(key),
                "checksum": tensors_checksum(state)}
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self._evict(keep=path)
        return path

    def load(self, session: str) -> Snapshot | None:
        """The session's snapshot, or None; anything unusable is deleted (and rebuilt later)."""
        pending = self._pending.pop(session, None)
        if pending is not None:
            pending.result()
        path = self.path_for(session)
        if not path.is_file():
            return None
        try:
            snap = self._read(path)
        except Exception as exc:  # corrupt or foreign file: never use it
            log.warning("discarding KV snapshot %s: %s", path.name, exc)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recently used: survives eviction longer
        return snap

    def _read(self, path: Path) -> Snapshot:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("identity") != self.identity:
                raise ValueError("made by another model or format")
            state = {name: f.get_tensor(name) for name in f.keys()}
        key = json.loads(meta["key"])
        if digest_key(key) != meta["key_digest"] or len(key) != int(meta["num_tokens"]):
            raise ValueError("token key does not match its digest")
        if tensors_checksum(state) != meta["checksum"]:
            raise ValueError("checksum mismatch")
        if any(t.shape[0] != len(key) for t in state.values()):
            raise ValueError("tensor lengths do not match the token count")
        return Snapshot(key, state)

    def _evict(self, keep: Path) -> None:
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.budget_bytes:
                break
            if p == keep:
                continue
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
