"""Atomic, self-checking save directories.

A save writes every file into a staging directory beside the target, adds ``manifest.json`` (the size and
SHA-256 of every file) last, and only then renames the staging directory into place; a directory that
already held a save is first renamed aside and removed once the new one is in place. So a process killed at
any moment leaves one complete save, never a mix: a kill between the two renames leaves the target missing
and the previous save beside it as ``.NAME.replaced-*``, which a load then reads (with a warning naming it) and
the next save clears. A load checks the manifest (its format known, every file present, sizes and checksums
equal) before reading anything.

Saving into a directory that already holds something refuses unless ``overwrite=True``; a symbolic link is
refused (the rename would replace the link, not the directory it points to). Staging and set-aside directories
carry the writer's process id, so a save clears only its own and those of writers that are no longer running,
never another live writer's. A write that fails (a full disk, a quota) raises an ``OSError`` naming the target
and leaves the previous save as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class SaveError(OSError):
    """Writing a save failed (a full disk, a quota, a permission): the message names the target and the cause;
    the target was left as it was."""

    def __init__(self, errno: int | None, directory: Path, cause: str) -> None:
        super().__init__(
            errno,
            f"saving to {directory} failed: {cause}; nothing was replaced (a previous save there is intact): free "
            "space or choose another directory",
        )
        self.cause = cause

    def __str__(self) -> str:
        return self.strerror


def check_target(directory: str | Path, *, overwrite: bool) -> Path:
    """Refuse, before any work, a save target that is a file, unwritable, or holds something (unless
    ``overwrite``); ``.NAME.replaced-*`` leftovers of an interrupted save count as holding something."""
    directory = Path(directory)
    if directory.is_symlink():
        raise ValueError(
            f"cannot save to {directory}: it is a symbolic link (to {os.readlink(directory)}); a save replaces the "
            f"directory by a rename, so give the real directory ({directory.resolve()}) instead"
        )
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save to {directory}: it is a file, not a directory")
    _check_writable(directory)
    occupied = (directory.is_dir() and any(directory.iterdir())) or bool(_leftovers(directory, "replaced"))
    if occupied and not overwrite:
        raise ValueError(
            f"{directory} already holds a save (or an interrupted save's previous copy); pass overwrite=True "
            "(CLI: --overwrite) to replace it, or choose another directory"
        )
    return directory


def check_output_file(path: str | Path) -> Path:
    """Refuse, before any work, an output file path that is a directory or lies in an unwritable directory."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory; give a file name such as {path / 'report.html'}")
    _check_writable(path)
    return path


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: Path, *, directory: bool = False) -> int:
    """The permission bits a plain ``open()`` (or ``mkdir``) would leave at ``path``: an existing file's own, else
    0o666 (0o777 for a directory) less the umask. Temporary files are made 0o600 (directories 0o700), which would
    otherwise survive the rename and keep colleagues and web servers out."""
    if path.exists() and not path.is_symlink():
        return path.stat().st_mode & 0o7777
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old file or the new,
    with the mode a plain ``open()`` would give it (``plain_mode``)."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = plain_mode(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temporary, mode)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise SaveError(error.errno, path, error.strerror or str(error)) from error
        raise
    return path


@contextmanager
def atomic_directory(directory: str | Path, kind: str, *, overwrite: bool) -> Iterator[Path]:
    """Yield a staging directory to write into; on success add the manifest and move it to ``directory``."""
    directory = check_target(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    mode = plain_mode(directory, directory=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-{os.getpid()}-", dir=directory.parent))
    try:
        staging.chmod(mode)
        yield staging
        file_mode = 0o666 & ~_umask()
        for written in staging.rglob("*"):  # some writers (safetensors) make their files 0o600
            written.chmod(mode if written.is_dir() else file_mode)
        write_manifest(staging, kind)
        _swap(staging, directory)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, SaveError):  # a nested save (the model inside a run): name this target instead
            raise SaveError(error.errno, directory, error.cause) from error.__cause__
        if isinstance(error, OSError):
            raise SaveError(error.errno, directory, error.strerror or str(error)) from error
        if type(error).__name__ == "SafetensorError":  # safetensors reports its I/O failures (ENOSPC) as its own type
            raise SaveError(None, directory, f"writing the weights: {error}") from error
        raise
    for leftover in _leftovers(directory, "saving") + _leftovers(directory, "replaced"):
        if not _writer_alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def write_manifest(directory: Path, kind: str) -> None:
    """Record the size and SHA-256 of every file under ``directory`` (synced to disk) in ``manifest.json``."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT_VERSION, "kind": kind, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def verify(directory: str | Path, kind: str) -> dict[str, Any]:
    """Check that ``directory`` holds one complete ``kind`` save; return its manifest, or raise ``ValueError``
    naming the directory and the file at fault."""
    directory = Path(directory)
    if not directory.is_dir():
        previous = _leftovers(directory, "replaced")
        hint = f"; an interrupted save left the previous save at {previous[0]}" if previous else ""
        raise ValueError(f"{directory} is not a saved {kind}: the directory does not exist{hint}")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{directory} is not a complete saved {kind}: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, found_kind, found_format = manifest["files"], manifest["kind"], manifest["format"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{manifest_path} is unreadable ({type(error).__name__}: {error}); a manifest holds format, kind and files"
        ) from None
    if found_format != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path}: format {found_format!r} is not one this version reads (format {FORMAT_VERSION}); "
            "it was written by another version of ih_circuits, or edited"
        )
    valid_entry = {"bytes", "sha256"}
    if (
        not isinstance(files, dict)
        or not files
        or not all(isinstance(e, dict) and set(e) == valid_entry for e in files.values())
    ):
        raise ValueError(
            f"{manifest_path}: files must map every saved file to its bytes and sha256 (at least one file); "
            f"got {str(files)[:80]}"
        )
    if found_kind != kind:
        raise ValueError(f"{directory} holds a saved {found_kind}, not a saved {kind}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{directory} is incomplete: {name} is listed in {MANIFEST} but missing")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise ValueError(f"{path} does not match its checksum in {MANIFEST}: the file was changed or damaged")
    return manifest


def open_save(directory: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The directory holding the ``kind`` save at ``directory``, and its checked manifest (see ``verify``).

    That is ``directory`` itself, unless a save into it was killed between its two renames: then the directory
    is missing and its previous save lies beside it as ``.NAME.replaced-*``; that complete save is the one to
    read (the newest, if concurrent writers left several), with a warning naming it.
    """
    directory = Path(directory)
    previous = [] if directory.exists() else _leftovers(directory, "replaced")
    complete = [leftover for leftover in previous if (leftover / MANIFEST).is_file()]
    if not complete:
        return directory, verify(directory, kind)
    newest = max(complete, key=lambda leftover: leftover.stat().st_ctime_ns)
    warnings.warn(
        f"{directory} is missing: a save into it was interrupted between its two renames, so this loads the "
        f"previous save, set aside at {newest} (the next save to {directory} clears it)",
        stacklevel=3,
    )
    return newest, verify(newest, kind)


def read_weights(path: Path, expected: dict[str, torch.Tensor], config_file: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, refused (``ValueError`` naming the file and the parameter) unless they
    are exactly the names, shapes and dtypes of ``expected`` (the state dict that ``config_file`` builds) and
    finite (a tensor the model builds non-finite, such as a mask's -inf, must equal its built value)."""
    try:
        weights = load_file(path)
    except Exception as error:  # safetensors raises its own error types for a malformed file
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not match {config_file}: missing {missing}, unexpected {unexpected}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: parameter {name} has shape {tuple(tensor.shape)} but {config_file} needs "
                f"{tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            raise ValueError(
                f"{path}: parameter {name} is {tensor.dtype} but {config_file} needs {expected[name].dtype}"
            )
        constant = expected[name].is_floating_point() and not torch.isfinite(expected[name]).all()
        if constant and not torch.equal(tensor, expected[name].cpu()):  # e.g. a mask's -inf, built, never learned
            raise ValueError(f"{path}: buffer {name} differs from the value {config_file} builds")
        if not constant and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: parameter {name} holds non-finite values")
    return weights


def read_json(path: Path) -> Any:
    """Parse a JSON file of a save, or raise ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def check_fields(data: Any, fields: set[str], what: str, optional: set[str] = frozenset()) -> None:
    """Raise ``ValueError`` unless ``data`` is a dict with every name in ``fields``, and nothing outside
    ``fields | optional``: a missing field must not silently take a default when a save is read back."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object; got {type(data).__name__}")
    missing, unknown = sorted(fields - set(data)), sorted(set(data) - fields - optional)
    if missing:
        raise ValueError(f"{what} is missing {missing}; a save records every field")
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}; allowed: {sorted(fields | optional)}")


def _swap(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(staging, directory)
        return
    aside = directory.parent / f".{directory.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(directory, aside)
    os.rename(staging, directory)
    shutil.rmtree(aside, ignore_errors=True)  # the new save is in place; a leftover is cleared by the next save


def _writer_alive(leftover: Path) -> bool:
    """Whether the process named in a leftover's name (``.NAME.saving-PID-...``) is another one still running;
    a name without a process id (an older save) counts as finished."""
    parts = leftover.name.rsplit(".", 1)[-1].split("-")
    if len(parts) < 3 or not (parts[1].isascii() and parts[1].isdigit()) or int(parts[1]) in (0, os.getpid()):
        return False
    try:
        os.kill(int(parts[1]), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def _leftovers(directory: Path, what: str) -> list[Path]:
    return sorted(directory.parent.glob(f".{directory.name}.{what}-*")) if directory.parent.is_dir() else []


def _check_writable(target: Path) -> None:
    """Create and remove a file where ``target`` would go (its nearest existing ancestor): permission bits
    alone do not tell (root, read-only mounts, /proc)."""
    parent = _existing_ancestor(target.parent)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ValueError(f"cannot write {target}: {parent} is not a writable directory ({error.strerror})") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
