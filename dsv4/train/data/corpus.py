"""Documents to train on, read locally (no network): the Python standard library's own sources as a built-in
corpus, or the user's text files, folders, JSONL and Parquet; and a held-out split by document."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sysconfig
from dataclasses import dataclass

log = logging.getLogger(__name__)

_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass
class Document:
    """One training document; `name` is stable across runs (it keys the train/val split and the token cache)."""
    name: str
    text: str


def stdlib_sources(max_bytes: int | None = None) -> list[Document]:
    """The stdlib's non-empty UTF-8 `.py` files (installed packages excluded), named by their relative POSIX
    path and sorted, so the corpus is the same on every machine with the same Python build.

    With `max_bytes`, the sample is spread over the whole library rather than its first few packages: every
    k-th file (k = total / max_bytes, rounded up), then the next stride offsets fill what budget is left; a
    file that would overflow it is skipped, so the total never exceeds `max_bytes` and lands close to it."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for name, file in _walk(root, exclude=_NOT_STDLIB):
        if name.endswith(".py") and (text := _read_text(file)) is not None and text.strip():
            docs.append(Document(name, text))
    if not docs:
        raise ValueError(f"no Python sources found in the standard library at {root}")
    if max_bytes is None:
        return docs
    sizes = [len(d.text.encode()) for d in docs]
    k = max(1, math.ceil(sum(sizes) / max_bytes))
    chosen, total = [], 0
    for i in sorted(range(len(docs)), key=lambda i: (i % k, i)):
        if total + sizes[i] <= max_bytes:
            chosen.append(i)
            total += sizes[i]
    if not chosen:
        raise ValueError(f"max_bytes={max_bytes} is smaller than every standard-library file")
    return [docs[i] for i in sorted(chosen)]


class MissingExtra(ImportError, RuntimeError):
    """An optional dependency is not installed (the message names the extra that installs it)."""


def read_documents(path: str | os.PathLike) -> list[Document]:
    """The documents in `path`: a UTF-8 text file (one document), a `.jsonl` file (the `text` field of each
    line), a `.parquet` file (its `text` column) or a folder of those (recursive, sorted; hidden entries, binary
    files and anything but regular files, such as FIFOs and sockets, which could block a read forever, skipped).
    Empty documents are dropped."""
    path = os.fspath(path)
    if os.path.isdir(path):
        docs, skipped = [], 0
        for name, file in _walk(path, warn_irregular=True):
            if file.endswith((".jsonl", ".parquet")):
                docs += _read_file(file, name)
            elif (text := _read_text(file)) is None:
                skipped += 1
            elif text.strip():
                docs.append(Document(name, text))
        if skipped:
            log.warning("%s: skipped %d binary or non-UTF-8 files", path, skipped)
    elif os.path.isfile(path):
        docs = _read_file(path, os.path.basename(path))
    elif os.path.exists(path):
        raise ValueError(f"{path} is neither a regular file nor a folder (a FIFO, socket or device?)")
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    if not docs:
        raise ValueError(f"no non-empty documents in {path}")
    return docs


def _walk(root: str, exclude: frozenset[str] = frozenset(), warn_irregular: bool = False) -> list[tuple[str, str]]:
    """(relative POSIX name, path) of the regular files under `root` (links to them included), sorted by name;
    hidden entries, folders named in `exclude` and anything else (FIFOs, sockets, devices, broken links) are
    skipped, the last with a warning where `warn_irregular`."""
    found, irregular = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in exclude]
        for f in files:
            if not f.startswith("."):
                file = os.path.join(folder, f)
                name = os.path.relpath(file, root).replace(os.sep, "/")
                if os.path.isfile(file):
                    found.append((name, file))
                else:
                    irregular.append(name)
    if irregular and warn_irregular:
        shown = ", ".join(sorted(irregular)[:5]) + (", ..." if len(irregular) > 5 else "")
        log.warning("%s: skipped %d entries that are not regular files (FIFOs, sockets, devices or broken "
                    "links): %s", root, len(irregular), shown)
    return sorted(found)


def _read_file(file: str, name: str) -> list[Document]:
    if file.endswith(".jsonl"):
        return _read_jsonl(file, name)
    if file.endswith(".parquet"):
        return _read_parquet(file, name)
    text = _read_text(file)
    if text is None:
        raise ValueError(f"{file} is not UTF-8 text")
    return [Document(name, text)] if text.strip() else []


def _read_text(file: str) -> str | None:
    """The file's text, or None for binary (a NUL byte) or non-UTF-8 content."""
    with open(file, "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _read_jsonl(file: str, name: str) -> list[Document]:
    docs = []
    with open(file, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} line {n}: not valid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{file} line {n}: expected a JSON object with a string 'text' field")
            if text.strip():
                docs.append(Document(f"{name}:{n}", text))
    return docs


def _read_parquet(file: str, name: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtra(f"reading {file} needs pyarrow, which is not installed: pip install 'dsv4[parquet]'"
                           ) from None
    columns = pq.read_schema(file).names
    if "text" not in columns:
        raise ValueError(f"{file}: no 'text' column (columns: {', '.join(columns)})")
    docs = []
    for row, text in enumerate(pq.read_table(file, columns=["text"]).column("text").to_pylist()):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{file} row {row}: 'text' is {type(text).__name__}, expected a string")
        if text and text.strip():
            docs.append(Document(f"{name}:{row}", text))
    return docs


def split_documents(docs: list[Document], val_fraction: float = 0.05,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, val): a document goes to val when a hash of (seed, name) falls below `val_fraction`, so adding
    documents never moves the others (and duplicates of a name land on the same side). With >= 2 documents
    each side gets at least one (the lowest / highest hash moves over). A single document is cut instead:
    its last `val_fraction` of characters is the validation document."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if not docs:
        raise ValueError("no documents to split")
    if len(docs) == 1:
        d = docs[0]
        cut = min(max(1, int(len(d.text) * (1 - val_fraction))), len(d.text) - 1)
        if cut < 1:
            raise ValueError(f"document {d.name!r} is too short to split ({len(d.text)} characters)")
        return [Document(f"{d.name}[train]", d.text[:cut])], [Document(f"{d.name}[val]", d.text[cut:])]
    keys = [_unit_hash(seed, d.name) for d in docs]
    is_val = [k < val_fraction for k in keys]
    if not any(is_val):
        is_val[keys.index(min(keys))] = True
    elif all(is_val):
        is_val[keys.index(max(keys))] = False
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])


def _unit_hash(seed: int, name: str) -> float:
    """A uniform number in [0, 1) from (seed, name), the same on every machine (unlike `hash`)."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
