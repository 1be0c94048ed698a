"""Build a datanet version's attribution index: an infini-gram suffix array over base-model token ids.

One index directory per datanet version, in infini-gram's on-disk layout (version 4, one shard) plus
two files of ours:

    tokenized.0         the token stream: for each document, the separator token (all bits set: 0xFFFF
                        for u16) followed by the document's token ids, little-endian, no padding
    offset.0            u64 little-endian byte offset in tokenized.0 of each document's separator
    table.0             the suffix array over tokenized.0 (one pointer per token, `ratio` bytes each,
                        little-endian byte offsets), built by infini-gram's own Rust indexer
    unigram.0           "token_id count" lines (separator included), so the engine can load unigram
                        log-probabilities without a pass over the vocabulary
    contributions.json  ordered list of contribution ids: document number i -> contributions[i]
    manifest.json       IndexManifest below; written last (a directory without it is not an index)

No metadata.0/metaoff.0: the engine treats them as optional and the document -> contribution map is
contributions.json. The directory is built in a hidden sibling and renamed into place, so a
half-built index is never visible under its final name.

infini-gram's engine classifies the files of an index directory by substring match on the whole path,
so an index path must not contain "tokenized", "table", "offset", "metadata", "metaoff" or "unigram"
anywhere (not even in a parent directory's name).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from statedir.durable_files import fsync_path, write_durably

FORMAT = "datanet-gateway/attribution-index"
FORMAT_VERSION = 1
LAYOUT_VERSION = 4  # infini-gram's index version: forward token order, documents preceded by a separator

TOKENS_FILE = "tokenized.0"
SUFFIX_ARRAY_FILE = "table.0"
OFFSETS_FILE = "offset.0"
UNIGRAM_FILE = "unigram.0"
CONTRIBUTIONS_FILE = "contributions.json"
MANIFEST_FILE = "manifest.json"

RESERVED_PATH_WORDS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")

TOKEN_DTYPES = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
BATCH_DOCUMENTS = 4096
# Parts of the suffix array are sorted with `hack` bytes of right context past their end; infini-gram
# uses 100 000. We also make it longer than any document, so every comparison that a query can
# observe (queries never contain the separator) is exact.
MIN_HACK_BYTES = 100_000
# From this many bytes of token stream on, the input is sorted as one part per core (then merged):
# on 2 cores, 100k contributions (14 MB) took 7.6 s as one part and 6.5 s as two. Smaller inputs
# are one part: no merge work, and no need for parts longer than the borrowed context below.
PARALLEL_PARTS_MIN_BYTES = 8 * 1024 * 1024

_HEX = re.compile(r"[0-9a-fA-F]+")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class IndexManifest:
    """What an index holds and how it was built (manifest.json)."""

    format: str
    format_version: int
    engine: str  # "infini-gram"
    engine_version: str
    layout_version: int  # the engine's `version` argument
    token_dtype: str  # "u16" or "u32": the engine's `token_dtype` argument
    doc_separator: int  # the token that precedes every document in tokenized.0 (all bits set)
    vocab_size: int  # base tokenizer's vocabulary, added tokens included: the engine's `vocab_size`
    eos_token_id: int  # the engine's `eos_token_id` (what a separator reads as in next-token queries)
    tokenizer_sha256: str  # sha256 of the base tokenizer's tokenizer.json
    doc_count: int
    token_count: int  # content tokens, separators excluded (tokenized.0 holds token_count + doc_count)
    build_seconds: float
    built_at: str  # ISO 8601, UTC
    contributions_sha256: str  # sha256 of contributions.json as written

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexManifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"not an attribution index manifest (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported attribution index format version {data.get('format_version')!r}; "
                             f"this code reads version {FORMAT_VERSION}")
        names = cls.__dataclass_fields__.keys()
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"attribution index manifest lacks {', '.join(missing)}")
        return cls(**{name: data[name] for name in names})

    @classmethod
    def load(cls, index_dir: Path) -> IndexManifest:
        path = Path(index_dir) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{index_dir} is not an attribution index (no {MANIFEST_FILE})")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class BaseTokenizer:
    """The base model's tokenizer as the index needs it."""

    tokenizer: Any  # tokenizers.Tokenizer
    sha256: str
    vocab_size: int
    eos_token_id: int
    token_dtype: str

    @property
    def separator(self) -> int:
        return int(np.iinfo(TOKEN_DTYPES[self.token_dtype]).max)


def tokenizer_sha256(tokenizer_dir: Path) -> str:
    """The tokenizer identity recorded in manifests: sha256 of its tokenizer.json."""
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()


def load_base_tokenizer(tokenizer_dir: Path) -> BaseTokenizer:
    """Load a Hugging Face fast-tokenizer directory (tokenizer.json) for indexing.

    Truncation and padding configured in tokenizer.json are switched off: an index holds whole
    documents. Token ids must leave the separator (all bits of the token type set) free.
    """
    from tokenizers import Tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json (a Hugging Face fast tokenizer is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size < 0xFFFF:
        token_dtype = "u16"
    elif vocab_size < 0xFFFFFFFF:
        token_dtype = "u32"
    else:
        raise ValueError(f"vocabulary of {vocab_size} tokens does not fit the index's token types")
    return BaseTokenizer(tokenizer=tokenizer, sha256=tokenizer_sha256(tokenizer_dir), vocab_size=vocab_size,
                         eos_token_id=_eos_token_id(tokenizer_dir, tokenizer), token_dtype=token_dtype)


def _eos_token_id(tokenizer_dir: Path, tokenizer: Any) -> int:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = tokenizer_dir / name
        if not path.is_file():
            continue
        eos = json.loads(path.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return int(tokenizer.token_to_id(eos))
    return 0  # only used by the engine's next-token queries, to report a document end


def validate_index_path(path: Path) -> Path:
    """The absolute path the engine will see; ValueError if it contains a word the engine reserves."""
    resolved = Path(path).expanduser().resolve()
    reserved = [word for word in RESERVED_PATH_WORDS if word in str(resolved)]
    if reserved:
        raise ValueError(
            f"index path {resolved} contains {', '.join(repr(w) for w in reserved)}: infini-gram classifies "
            f"index files by substring of their full path, so an index path must not contain any of "
            f"{', '.join(RESERVED_PATH_WORDS)}"
        )
    return resolved


def indexer_binary() -> Path:
    """infini-gram's Rust suffix-array indexer, shipped inside the Python package."""
    import infini_gram

    binary = Path(infini_gram.__file__).parent / "rust_indexing"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"infini-gram's indexer is missing or not executable: {binary}")
    return binary


def build_index(
    documents: Iterable[tuple[str, str]],
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    progress: Progress | None = None,
) -> IndexManifest:
    """Index (contribution id, text) pairs, in the given order, into `out_dir`; return its manifest.

    Document i of the index is the i-th pair; texts are tokenized with the base tokenizer without
    special tokens. Raises ValueError for no documents, a bad or repeated contribution id, or an
    `out_dir` whose path contains a reserved word; FileExistsError if `out_dir` exists. On any error
    nothing is left behind.
    """
    started = time.perf_counter()
    say = progress or (lambda message: None)
    out_dir = validate_index_path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; an index is built once, into a new directory")
    base = load_base_tokenizer(tokenizer_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a hidden sibling on the same filesystem; hex has none of the reserved words' letters
    staging = out_dir.parent / f".{out_dir.name}.building-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        contributions, token_count, longest = _write_token_stream(documents, base, staging, say)
        if not contributions:
            raise ValueError("no documents to index: a datanet version needs at least one contribution")
        say(f"building the suffix array over {token_count + len(contributions)} tokens")
        width = TOKEN_DTYPES[base.token_dtype].itemsize
        build_suffix_array(staging / TOKENS_FILE, staging / SUFFIX_ARRAY_FILE, staging / "scratch",
                           token_width=width, longest_document_bytes=(longest + 1) * width, progress=say)
        contributions_bytes = json.dumps(contributions).encode()
        write_durably(staging / CONTRIBUTIONS_FILE, contributions_bytes)
        manifest = IndexManifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            engine="infini-gram",
            engine_version=importlib.metadata.version("infini-gram"),
            layout_version=LAYOUT_VERSION,
            token_dtype=base.token_dtype,
            doc_separator=base.separator,
            vocab_size=base.vocab_size,
            eos_token_id=base.eos_token_id,
            tokenizer_sha256=base.sha256,
            doc_count=len(contributions),
            token_count=token_count,
            build_seconds=round(time.perf_counter() - started, 3),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            contributions_sha256=hashlib.sha256(contributions_bytes).hexdigest(),
        )
        write_durably(staging / MANIFEST_FILE, manifest.to_json().encode())
        fsync_path(staging)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(out_dir.parent)
    say(f"indexed {manifest.doc_count} documents, {manifest.token_count} tokens in {manifest.build_seconds} s")
    return manifest


def _batches(documents: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    for item in documents:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_token_stream(
    documents: Iterable[tuple[str, str]], base: BaseTokenizer, staging: Path, say: Progress
) -> tuple[list[str], int, int]:
    """Write tokenized.0, offset.0 and unigram.0; return (contribution ids, content tokens, longest doc)."""
    dtype = TOKEN_DTYPES[base.token_dtype]
    contributions: list[str] = []
    seen: set[str] = set()
    offsets = array("Q")
    unigram = np.zeros(base.vocab_size, dtype=np.int64)
    position = token_count = longest = 0
    with open(staging / TOKENS_FILE, "wb") as tokens_out:
        for batch in _batches(documents, BATCH_DOCUMENTS):
            texts = []
            for item in batch:
                cid, text = _check_document(item, seen)
                contributions.append(cid)
                texts.append(text)
            id_lists = [encoding.ids for encoding in base.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
            lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
            content = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
            if len(content) and (content.min() < 0 or content.max() >= base.vocab_size):
                raise ValueError("the tokenizer produced ids outside its vocabulary")
            # document k's separator sits after the k previous separators and their documents' tokens
            separators = np.arange(len(lengths)) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
            stream = np.empty(len(lengths) + len(content), dtype=dtype)
            is_content = np.ones(len(stream), dtype=bool)
            is_content[separators] = False
            stream[separators] = base.separator
            stream[is_content] = content
            offsets.extend((position + separators * dtype.itemsize).tolist())
            position += len(stream) * dtype.itemsize
            longest = max(longest, int(lengths.max()))
            unigram += np.bincount(content, minlength=base.vocab_size)
            token_count += len(content)
            tokens_out.write(stream.tobytes())
            say(f"tokenized {len(contributions)} documents, {token_count} tokens")
        tokens_out.flush()
        os.fsync(tokens_out.fileno())
    write_durably(staging / OFFSETS_FILE, np.frombuffer(offsets, dtype=np.uint64).astype("<u8").tobytes())
    lines = [f"{token} {count}\n" for token, count in enumerate(unigram.tolist()) if count]
    lines.append(f"{base.separator} {len(contributions)}\n")
    write_durably(staging / UNIGRAM_FILE, "".join(lines).encode())
    return contributions, token_count, longest


def _check_document(item: Any, seen: set[str]) -> tuple[str, str]:
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise ValueError(f"documents must be (contribution id, text) pairs, got {type(item).__name__}")
    cid, text = item
    if not (isinstance(cid, str) and _HEX.fullmatch(cid)):
        raise ValueError(f"contribution id must be a hex string, got {cid!r}")
    if not isinstance(text, str):
        raise ValueError(f"text of contribution {cid} must be a str, got {type(text).__name__}")
    if cid in seen:
        raise ValueError(f"contribution {cid} appears twice")
    seen.add(cid)
    return cid, text


def build_suffix_array(
    tokens_path: Path,
    table_path: Path,
    scratch: Path,
    *,
    token_width: int,
    longest_document_bytes: int,
    parts: int | None = None,
    progress: Progress | None = None,
) -> None:
    """Run infini-gram's Rust indexer (make-part, merge, concat) over `tokens_path` into `table_path`.

    `parts` defaults to one per core for large inputs and one below PARALLEL_PARTS_MIN_BYTES.
    `scratch` is created and removed.
    """
    say = progress or (lambda message: None)
    binary = str(indexer_binary())
    size = os.path.getsize(tokens_path)
    if size == 0 or size % token_width:
        raise ValueError(f"{tokens_path} holds {size} bytes, not a whole number of {token_width}-byte tokens")
    ratio = max(1, (size.bit_length() + 7) // 8)  # bytes per suffix-array pointer (pointers are < size)
    hack = max(MIN_HACK_BYTES, longest_document_bytes + 2 * token_width)
    hack += -hack % token_width
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if parts is None:
        parts = cpus if size >= PARALLEL_PARTS_MIN_BYTES else 1
    part_bytes = size // parts
    part_bytes += -part_bytes % token_width
    if parts > 1 and part_bytes <= hack:
        parts, part_bytes = 1, size  # parts must be longer than the context they borrow from the next
    parts_dir, merged_dir = scratch / "parts", scratch / "merged"
    parts_dir.mkdir(parents=True)
    merged_dir.mkdir()
    common = ["--data-file", str(tokens_path), "--ratio", str(ratio), "--token-width", str(token_width)]
    try:
        say(f"suffix array: sorting {parts} part(s)")
        ranges = [(i * part_bytes, min((i + 1) * part_bytes + hack, size)) for i in range(parts)]
        _run_all(scratch, "make-part", [
            [binary, "make-part", *common, "--parts-dir", str(parts_dir), "--start-byte", str(start),
             "--end-byte", str(end)]
            for start, end in ranges if start < size
        ])
        say("suffix array: merging parts")
        _run_all(scratch, "merge", [[binary, "merge", *common, "--parts-dir", str(parts_dir), "--merged-dir",
                                     str(merged_dir), "--num-threads", str(cpus), "--hacksize", str(hack)]])
        # concat reads one file per merge thread; merge writes fewer than --num-threads for small inputs
        merged_files = len(os.listdir(merged_dir))
        say("suffix array: concatenating")
        _run_all(scratch, "concat", [[binary, "concat", *common, "--merged-dir", str(merged_dir), "--merged-file",
                                      str(table_path), "--num-threads", str(merged_files)]])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    expected = size // token_width * ratio
    if os.path.getsize(table_path) != expected:
        raise RuntimeError(f"infini-gram's indexer wrote {os.path.getsize(table_path)} bytes of suffix array, "
                           f"expected {expected}")
    with open(table_path, "rb") as table:
        os.fsync(table.fileno())


def _run_all(scratch: Path, step: str, commands: list[list[str]]) -> None:
    """Run commands concurrently; raise RuntimeError with the stderr of the first that fails."""
    running = []
    for i, command in enumerate(commands):
        log = open(scratch / f"{step}-{i}.log", "w+b")  # a file, not a pipe: no deadlock on long output
        running.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log), log))
    failures = []
    for process, log in running:
        code = process.wait()
        if code != 0:
            log.seek(0)
            failures.append(f"exit {code}: {log.read()[-2000:].decode(errors='replace').strip()}")
        log.close()
    if failures:
        raise RuntimeError(f"infini-gram indexer step {step} failed ({failures[0]})")


