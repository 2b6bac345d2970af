"""Token shards on disk: raw ``.bin`` token files, document offsets, and ``manifest.json``.

A prepared data directory looks like::

    manifest.json             what is here and how it was made (written last, atomically)
    tokenizer/                the tokenizer the shards were made with
    train_00000.bin           tokens, raw little-endian uint16 (vocab <= 65,536) or uint32
    train_00000.idx           int64 start offset of each document in the .bin, plus the end
    train_origins.txt         one line per document: where it came from (file:line, row, task id)
    val_00000.bin ...         the held-out validation split, same layout

Every document is stored as ``[BOS] + tokens`` and lies in one shard; document ids are their
index within the split. The manifest lists each file with its size in bytes and sha256;
:class:`ShardSet` opens a split with ``np.memmap`` and refuses, naming the file, a shard that is
missing, truncated or altered, or a manifest made with a different tokenizer than the one given.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from nanoseek.atomic import write_atomic

MANIFEST = "manifest.json"
FORMAT = "nanoseek-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_UNESCAPE = re.compile(r"\\(.)")


class ShardError(ValueError):
    """A data directory is missing, corrupt, or does not match the tokenizer in use."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class SplitWriter:
    """Appends tokenized documents of one split to numbered shards of about ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int = 1 << 24):
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.tokens = 0
        self._bin = None
        self._origins = open(self.out_dir / f"{split}_origins.txt", "w", encoding="utf-8")

    def _open_shard(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}"
        self._name = name
        self._bin = open(self.out_dir / f"{name}.bin", "wb")
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def _close_shard(self) -> None:
        if self._bin is None:
            return
        self._bin.close()
        idx = np.asarray(self._offsets, dtype=np.int64)
        idx.tofile(self.out_dir / f"{self._name}.idx")
        n_tokens = int(idx[-1])
        self.shards.append({
            "file": f"{self._name}.bin", "tokens": n_tokens, "documents": len(idx) - 1,
            "bytes": n_tokens * self.dtype.itemsize, "sha256": self._hash.hexdigest(),
            "index": f"{self._name}.idx", "index_sha256": hashlib.sha256(idx.tobytes()).hexdigest(),
        })
        self._bin = None

    def add(self, tokens: Any, origin: str) -> int:
        """Append one document (its BOS included); returns its document id in this split."""
        arr = np.asarray(tokens, dtype=self.dtype)
        if self._bin is not None and self._offsets[-1] > 0 and self._offsets[-1] + len(arr) > self.shard_tokens:
            self._close_shard()
        if self._bin is None:
            self._open_shard()
        data = arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._offsets.append(self._offsets[-1] + len(arr))
        self._origins.write(origin.replace("\\", "\\\\").replace("\n", "\\n") + "\n")
        self.documents += 1
        self.tokens += len(arr)
        return self.documents - 1

    def close(self) -> dict[str, Any]:
        """Finish the last shard; the split's manifest entry."""
        self._close_shard()
        self._origins.close()
        origins = self.out_dir / f"{self.split}_origins.txt"
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards,
                "origins": origins.name, "origins_sha256": file_sha256(origins)}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (a crashed run leaves no manifest, so nothing loads)."""
    path = Path(out_dir) / MANIFEST
    return write_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(data: str | Path) -> tuple[Path, dict[str, Any]]:
    """(data directory, manifest) from a data directory or the path of its ``manifest.json``."""
    path = Path(data)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (run `nanoseek data prepare`; an interrupted prepare "
                         "leaves no manifest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt manifest: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})")
    return path.parent, manifest


def _tokenizer_hash(tokenizer: Any) -> str:
    return tokenizer if isinstance(tokenizer, str) else tokenizer.hash


class ShardSet:
    """One split of a prepared data directory, memory-mapped and checked against its manifest.

    ``tokenizer``: a :class:`~nanoseek.data.tokenizer.Tokenizer` (or its hash) the caller will
    use; a manifest made with another tokenizer is refused. ``verify``: "sha256" (default)
    re-hashes every file, "size" only checks sizes (for very large corpora).
    """

    def __init__(self, data: str | Path, split: str = "train", tokenizer: Any = None, verify: str = "sha256"):
        if verify not in ("sha256", "size"):
            raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
        self.dir, self.manifest = read_manifest(data)
        mpath = self.dir / MANIFEST
        if tokenizer is not None:
            want, have = _tokenizer_hash(tokenizer), self.manifest["tokenizer"]["hash"]
            if want != have:
                raise ShardError(
                    f"{mpath}: shards were tokenized with tokenizer {have[:16]}, but the tokenizer in use "
                    f"is {want[:16]}; use the tokenizer saved in {self.dir / 'tokenizer'} or re-run "
                    "`nanoseek data prepare` with this tokenizer")
        if split not in self.manifest["splits"]:
            raise ShardError(f"{mpath}: no split {split!r} (have: {', '.join(self.manifest['splits'])})")
        entry = self.manifest["splits"][split]
        if not entry["shards"]:
            raise ShardError(f"{mpath}: split {split!r} has no documents"
                             + (" (raise --val-fraction)" if split == "val" else ""))
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.bos_id = int(self.manifest["tokenizer"]["bos_id"])
        self._bins: list[np.memmap] = []
        starts, shard_of = [], []
        for k, shard in enumerate(entry["shards"]):
            path = self.dir / shard["file"]
            self._check_file(path, shard["bytes"], shard["sha256"], verify, mpath)
            idx_path = self.dir / shard["index"]
            self._check_file(idx_path, 8 * (shard["documents"] + 1), shard["index_sha256"], verify, mpath)
            idx = np.fromfile(idx_path, dtype="<i8")
            if idx[0] != 0 or idx[-1] != shard["tokens"] or np.any(np.diff(idx) <= 0):
                raise ShardError(f"{idx_path}: document offsets are inconsistent with {shard['file']}")
            self._bins.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
            starts.append(idx)
            shard_of.append(np.full(len(idx) - 1, k, dtype=np.int32))
        self._doc_start = np.concatenate([s[:-1] for s in starts])
        self.doc_lengths = np.concatenate([np.diff(s) for s in starts])
        self._doc_shard = np.concatenate(shard_of)
        self.n_docs = len(self.doc_lengths)
        self.n_tokens = int(self.doc_lengths.sum())
        if self.n_docs != entry["documents"] or self.n_tokens != entry["tokens"]:
            raise ShardError(f"{mpath}: split {split!r} totals ({entry['documents']} documents, "
                             f"{entry['tokens']} tokens) disagree with its shards ({self.n_docs}, {self.n_tokens})")
        self._origins_path = self.dir / entry["origins"]
        self._origins: list[str] | None = None
        self.fingerprint = hashlib.sha256(json.dumps(
            [self.manifest["tokenizer"]["hash"], [s["sha256"] for s in entry["shards"]]]).encode()).hexdigest()

    @staticmethod
    def _check_file(path: Path, size: int, sha: str, verify: str, mpath: Path) -> None:
        if not path.is_file():
            raise ShardError(f"{path}: missing (listed in {mpath})")
        actual = path.stat().st_size
        if actual != size:
            raise ShardError(f"{path}: {actual} bytes but {mpath} says {size}: the shard is truncated or "
                             "corrupt; re-run `nanoseek data prepare`")
        if verify == "sha256" and file_sha256(path) != sha:
            raise ShardError(f"{path}: sha256 differs from {mpath}: the shard was modified or is corrupt; "
                             "re-run `nanoseek data prepare`")

    def __len__(self) -> int:
        return self.n_docs

    def document(self, doc_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens ``[start:stop]`` of document ``doc_id`` (BOS first), a view into the memmap."""
        length = int(self.doc_lengths[doc_id])
        stop = length if stop is None else min(stop, length)
        base = int(self._doc_start[doc_id])
        return self._bins[self._doc_shard[doc_id]][base + start: base + stop]

    def origin(self, doc_id: int) -> str:
        """Where document ``doc_id`` came from (``file:line``, ``file: row N``, a task problem id)."""
        if self._origins is None:
            lines = self._origins_path.read_text(encoding="utf-8").split("\n")[:-1]
            self._origins = [_UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), line)
                             for line in lines]
        return self._origins[doc_id]
