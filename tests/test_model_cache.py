"""The converted-model cache: damaged files are refused, concurrent conversions agree, and a
bad ``LMCASCADE_HOME`` is a clear error.

Every test runs the registry's real code (pinned carrier package, GGUF checksum, conversion,
manifest, atomic publication, load) on a tiny registered model in a temporary
``LMCASCADE_HOME``; only transformers' reading of the GGUF is replaced by the random-weight
tiny model of ``tiny_hf.py``, so nothing large is converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from tiny_hf import tiny_hf_model, tiny_tokenizer

from lmcascade.errors import ModelError, ModelIntegrityError, ModelNotFoundError
from lmcascade.models import registry

NAME = "tiny-cache-test"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registered tiny model, installed (its carrier package is importable), not converted."""
    monkeypatch.setenv("LMCASCADE_HOME", str(tmp_path / "home"))
    carrier = tmp_path / "site" / "lmc_tiny_carrier"
    (carrier / "data").mkdir(parents=True)
    (carrier / "__init__.py").write_text("")
    gguf = b"GGUF stand-in for the tiny test model\n" * 10
    (carrier / "data" / "part01.bin").write_bytes(gguf)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = registry.ModelSpec(
        name=NAME,
        description="a tiny random model for the cache tests",
        license="Apache-2.0",
        packages=("lmc-tiny-carrier==0",),
        parts=(("lmc_tiny_carrier", "data/part01.bin"),),
        gguf_name="tiny.gguf",
        sha256=hashlib.sha256(gguf).hexdigest(),
        size=len(gguf),
    )
    monkeypatch.setitem(registry.MODELS, NAME, spec)
    conversions = []
    for auto, make in [
        (transformers.AutoTokenizer, lambda: tiny_tokenizer.__wrapped__()),
        (transformers.AutoModelForCausalLM, tiny_hf_model),
    ]:
        real = auto.from_pretrained

        def from_pretrained(path, *args, _real=real, _make=make, **kwargs):
            if "gguf_file" in kwargs:  # the conversion reading the GGUF
                if _make is tiny_hf_model:
                    conversions.append(path)
                return _make()
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", from_pretrained)
    return SimpleNamespace(spec=spec, conversions=conversions)  # GGUF reads, counted


@pytest.fixture
def converted(tiny):
    """The tiny model's converted folder (written by ``fetch``, so with its manifest)."""
    folder = registry.fetch(NAME, quiet=True)
    assert registry.is_converted(NAME)
    return folder


def corrupt_in_place(path: Path, offset: int, data: bytes, *, keep_mtime: bool) -> None:
    """Overwrites bytes of ``path`` without changing its size; the modification time moves on
    (as it would, a moment later) or, with ``keep_mtime``, is set back to what it was."""
    before = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    mtime = before.st_mtime_ns if keep_mtime else before.st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(before.st_atime_ns, mtime))
    assert path.stat().st_size == before.st_size


def rewrite(path: Path, text: str) -> None:
    """Replaces a file's content; its time moves on even where the clock is coarser than
    the time since the conversion wrote it."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before, before + 1_000_000_000))


def test_converted_folder_loads_and_records_every_file(converted):
    manifest = json.loads((converted / "lmcascade.json").read_text())
    on_disk = {p.name for p in converted.iterdir()} - {"lmcascade.json"}
    assert set(manifest["files"]) == on_disk
    weights = manifest["files"]["model.safetensors"]
    data = (converted / "model.safetensors").read_bytes()
    assert weights["sha256"] == hashlib.sha256(data).hexdigest()
    assert weights["size"] == len(data)
    lm = registry.load(NAME, device="cpu")
    assert lm.name == NAME and lm.vocab_size == 8
    state = registry.verify(NAME)
    assert state.ok and "config.json" in state.files and state.total_bytes > 0


def test_load_is_cheap_and_hashes_only_changed_files(converted, monkeypatch):
    hashed = []
    real = registry._sha256_file
    monkeypatch.setattr(registry, "_sha256_file", lambda p: hashed.append(p.name) or real(p))
    registry.load(NAME, device="cpu")
    assert hashed == []  # sizes and times only
    mtime = (converted / "config.json").stat().st_mtime_ns
    os.utime(converted / "config.json", ns=(mtime, mtime + 10**9))  # touched, content unchanged
    registry.load(NAME, device="cpu")
    assert hashed == ["config.json"]
    registry.load(NAME, device="cpu")  # the new time was recorded: cheap again
    assert hashed == ["config.json"]


def test_zeroed_weights_same_size_are_refused(converted):
    weights = converted / "model.safetensors"
    corrupt_in_place(weights, weights.stat().st_size // 2, bytes(4096), keep_mtime=False)
    with pytest.raises(
        ModelIntegrityError, match=r"model\.safetensors.*fetch tiny-cache-test --force"
    ):
        registry.load(NAME, device="cpu")
    row = next(r for r in registry.table() if r["name"] == NAME)
    assert row["converted"] == "corrupt" and "model.safetensors" in row["problem"]


def test_same_size_same_mtime_corruption_is_caught_by_verify(converted):
    weights = converted / "model.safetensors"
    corrupt_in_place(weights, weights.stat().st_size // 2, bytes(4096), keep_mtime=True)
    with pytest.raises(ModelIntegrityError, match=r"model\.safetensors was modified.*--force"):
        registry.verify(NAME)


def test_an_edit_that_restores_the_mtime_is_caught_on_load(converted):
    # the inode's change time cannot be set back, so the cheap check still hashes the file
    weights = converted / "model.safetensors"
    corrupt_in_place(weights, weights.stat().st_size // 2, bytes(4096), keep_mtime=True)
    with pytest.raises(ModelIntegrityError, match=r"model\.safetensors was modified"):
        registry.load(NAME, device="cpu")


@pytest.mark.parametrize("version", ['"2"', "null", "[2]", "true"])
def test_a_manifest_with_a_malformed_format_is_corrupt(converted, version):
    marker = converted / registry.MARKER
    text = marker.read_text()
    rewrite(marker, text.replace('"format": 2', f'"format": {version}'))
    assert registry.cache_state(NAME).state == "corrupt"
    with pytest.raises(ModelIntegrityError, match="malformed"):
        registry.load(NAME, device="cpu")


def test_a_home_that_cannot_be_expanded(monkeypatch):
    monkeypatch.setenv("LMCASCADE_HOME", "~nosuchuser_lmcascade/x")
    with pytest.raises(ModelError, match="LMCASCADE_HOME.*cannot be expanded"):
        registry.home()


def test_changed_layer_count_in_config_is_refused(converted):
    config = converted / "config.json"
    text = config.read_text()
    assert '"num_hidden_layers": 2' in text
    rewrite(config, text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    with pytest.raises(ModelIntegrityError, match=r"config\.json.*fetch tiny-cache-test --force"):
        registry.load(NAME, device="cpu")


def test_truncated_weights_are_refused(converted):
    weights = converted / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 3)
    with pytest.raises(ModelIntegrityError, match=r"model\.safetensors has .* bytes, expected"):
        registry.load(NAME, device="cpu")


def test_missing_tokenizer_file_is_refused(converted):
    (converted / "tokenizer.json").unlink()
    with pytest.raises(ModelIntegrityError, match=r"tokenizer\.json is missing.*--force"):
        registry.load(NAME, device="cpu")


def test_invalid_json_config_is_refused(converted):
    rewrite(converted / "config.json", "{not json")
    with pytest.raises(ModelIntegrityError, match=r"config\.json.*--force"):
        registry.load(NAME, device="cpu")


def test_invalid_config_the_cheap_check_misses_is_still_a_named_error(converted):
    # Same size, same time: the per-load check passes, transformers fails to parse the
    # config, and that failure runs the full check, which names the file.
    config = converted / "config.json"
    size = config.stat().st_size
    before = config.stat()
    config.write_bytes(b"{" * size)
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ModelIntegrityError, match=r"config\.json was modified.*--force"):
        registry.load(NAME, device="cpu")


def test_fetch_force_repairs_a_damaged_folder(converted, tiny):
    (converted / "tokenizer.json").unlink()
    assert not registry.is_converted(NAME)
    registry.fetch(NAME, force=True)
    assert registry.verify(NAME).ok
    registry.load(NAME, device="cpu")
    registry.fetch(NAME, force=True)  # forced on an intact folder: converted again
    assert len(tiny.conversions) == 3


def test_folder_from_an_older_version_is_converted_again(converted, tiny):
    marker = converted / "lmcascade.json"
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: old[k] for k in ("name", "sha256", "source")}))
    row = next(r for r in registry.table() if r["name"] == NAME)
    assert row["converted"] == "outdated"
    registry.load(NAME, device="cpu")  # converted again: an unverifiable folder is not trusted
    assert len(tiny.conversions) == 2
    assert "files" in json.loads(marker.read_text())


def test_local_folder_transformers_cannot_load_is_a_model_error(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": "x"}')
    with pytest.raises(ModelError, match="my-model"):
        registry.load(folder, device="cpu")
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        registry.load(str(tmp_path / "nowhere"), device="cpu")


def test_paths_resolve_against_a_given_folder_and_can_be_refused(converted, tmp_path):
    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    for f in converted.iterdir():  # a copy of the converted folder, manifest included
        (project / "weights" / f.name).write_bytes(f.read_bytes())
    lm = registry.load("weights", relative_to=project, device="cpu")
    assert lm.name == "weights"
    with pytest.raises(ModelNotFoundError, match="registered models only"):
        registry.load(project / "weights", allow_paths=False, device="cpu")
    assert registry.load(NAME, allow_paths=False, device="cpu").name == NAME
    (project / "weights" / "tokenizer.json").unlink()  # a damaged copy is refused too
    with pytest.raises(ModelIntegrityError, match="tokenizer.json is missing"):
        registry.load("weights", relative_to=project, device="cpu")


@pytest.mark.parametrize("kind", ["empty", "a file", "under a file", "read-only"])
def test_unusable_lmcascade_home_is_a_clear_error(kind, tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    home = {"empty": "", "a file": str(blocker), "under a file": str(blocker / "cache")}.get(kind)
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("permissions do not bind root")
        home = str(tmp_path / "ro")
        os.mkdir(home, 0o500)
    monkeypatch.setenv("LMCASCADE_HOME", home)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # never the real cache, whatever happens
    with pytest.raises(ModelError, match="LMCASCADE_HOME"):
        registry.fetch(NAME, quiet=True)
    with pytest.raises(ModelError, match="LMCASCADE_HOME"):
        registry.load(NAME, device="cpu")


@pytest.mark.parametrize("lock", [True, False], ids=["locked", "rename-only"])
def test_two_conversions_at_once_both_succeed(lock, tiny, monkeypatch):
    if not lock:  # as on a platform or filesystem without flock
        monkeypatch.setattr(registry, "fcntl", None, raising=False)
    target = registry.home() / NAME
    meet = threading.Barrier(2, timeout=2)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == target:  # both publish at the same moment, if both got there
            try:
                meet.wait()
            except threading.BrokenBarrierError:
                pass
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    results: list = [None, None]

    def fetch(i):
        try:
            results[i] = registry.fetch(NAME, quiet=True)
        except Exception as err:  # reported by the assertion below
            results[i] = err

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [target, target]
    assert registry.verify(NAME).ok
    assert len(tiny.conversions) == (1 if lock else 2)
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{NAME}")) == (
        [f".{NAME}.lock"] if lock else []
    )
    registry.load(NAME, device="cpu")


def test_real_default_model_check_stays_cheap(monkeypatch):
    monkeypatch.delenv("LMCASCADE_HOME", raising=False)
    state = registry.cache_state(registry.DEFAULT_MODEL)
    if not state.ok:
        pytest.skip(f"the default model is not converted with checksums here ({state.state})")
    hashed = []
    monkeypatch.setattr(registry, "_sha256_file", lambda p: hashed.append(p))
    assert registry.cache_state(registry.DEFAULT_MODEL).ok and hashed == []
    assert state.total_bytes > 100 << 20
