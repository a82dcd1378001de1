"""Models from Hugging Face: what a reference names, and fetching it into the models folder.

A *reference* is what a user may type after ``--model`` besides a local path: a catalog name
(``catalog``), a hub URL (``https://huggingface.co/ORG/REPO/resolve/REV/FILE.gguf``; another host with
the same path shape is taken as a hub of its own), or the shorthand ``ORG/REPO/FILE.gguf``. A split GGUF
(``NAME-00001-of-00003.gguf``) is one model of several files; llama-server is given the first.

Every file lands flat in the models folder (``models_dir()``), under its own file name, and only after:
- a lock (``.locks/FILE.lock``, an OS file lock) is held, so two nodes on one machine fetch it once: the
  second waits, then finds the file there;
- the disk has room for what is left to fetch;
- huggingface_hub fetched it into ``.partial/`` (it honours ``HF_ENDPOINT`` and ``HF_TOKEN``, resumes
  from what it wrote), retried with backoff when the transfer breaks;
- its sha256 equals the hub's (the LFS ``X-Linked-Etag``): a file that differs is deleted, never used.
Then it is renamed into place (atomic on one file system). A file present in the models folder is
therefore complete and checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshllm.engine.catalog import CatalogEntry, find_entry
from meshllm.errors import ModelError

__all__ = [
    "HubFile", "ModelReference", "check_remote", "fetch", "local_bytes", "parse_reference", "progress_line",
]

HUB_HOST = "huggingface.co"
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
RETRIES = 5
DISK_MARGIN = 64 << 20  # bytes kept free beyond the download


@dataclass(frozen=True)
class HubFile:
    repo: str  # ORG/REPO
    path: str  # in the repository
    revision: str = "main"
    endpoint: str = ""  # empty: $HF_ENDPOINT, else huggingface.co

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self) -> str:
        base = self.endpoint or os.environ.get("HF_ENDPOINT") or f"https://{HUB_HOST}"
        return f"{base.rstrip('/')}/{self.repo}/resolve/{self.revision}/{self.path}"


@dataclass(frozen=True)
class ModelReference:
    """A model that lives on a hub: its name, its files (first part first) and, from the catalog, its
    approximate size and draft."""

    name: str
    files: tuple[HubFile, ...]
    size_bytes: int = 0
    entry: CatalogEntry | None = None

    def local_path(self, folder: Path) -> Path:
        """The file llama-server opens (the first part of a split GGUF)."""
        return folder / self.files[0].filename

    def present(self, folder: Path) -> bool:
        return all((folder / f.filename).is_file() for f in self.files)


def parse_reference(text: str) -> ModelReference | None:
    """The hub model ``text`` names, or None when it names none (a local path, an embedded model, an
    unknown word). ``ModelError`` for a partial catalog name that fits several entries."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        return _from_url(text)
    parts = text.split("/")
    if len(parts) >= 3 and text.endswith(".gguf") and not text.startswith(("/", ".", "~")) \
            and not Path(text).exists():
        return _model("/".join(parts[:2]), "/".join(parts[2:]))
    if "/" in text or text.endswith(".gguf"):
        return None
    entry = find_entry(text)
    if entry is None:
        return None
    files = tuple(HubFile(entry.repo, path) for path in entry.files)
    return ModelReference(name=entry.name, files=files, size_bytes=entry.size_bytes, entry=entry)


def _from_url(url: str) -> ModelReference:
    split = urlsplit(url)
    match = re.fullmatch(r"/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+\.gguf)", split.path)
    if match is None:
        raise ModelError(f"{url} is not a model file URL; expected https://{HUB_HOST}/ORG/REPO/resolve/main/FILE.gguf")
    endpoint = "" if split.netloc == HUB_HOST else f"{split.scheme}://{split.netloc}"
    return _model(match[1], match[3], revision=match[2], endpoint=endpoint)


def _model(repo: str, path: str, *, revision: str = "main", endpoint: str = "") -> ModelReference:
    name = re.sub(r"\.gguf$", "", SPLIT_PART.sub(".gguf", path.rsplit("/", 1)[-1]))
    part = SPLIT_PART.search(path)
    paths = [path] if part is None else [
        SPLIT_PART.sub(f"-{i:05d}-of-{part[2]}.gguf", path) for i in range(1, int(part[2]) + 1)]
    return ModelReference(name=name, files=tuple(HubFile(repo, p, revision, endpoint) for p in paths))


# -- fetching ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    size: int
    sha256: str  # empty when the hub gives none (not an LFS file)


def check_remote(ref: ModelReference) -> list[RemoteFile]:
    """Ask the hub about every file of ``ref`` (HEAD): one-line ``ModelError`` on 404, 401/403, no network."""
    return [_metadata(f) for f in ref.files]


def _token() -> str | bool | None:
    return os.environ.get("HF_TOKEN") or None


def _metadata(f: HubFile) -> RemoteFile:
    from huggingface_hub import get_hf_file_metadata

    try:
        meta = get_hf_file_metadata(f.url(), token=_token())
    except Exception as exc:  # every hub error becomes one line
        raise _hub_error(f, exc) from None
    etag = (meta.etag or "").strip('"').lower()
    return RemoteFile(size=meta.size or 0, sha256=etag if SHA256.match(etag) else "")


def _hub_error(f: HubFile, exc: BaseException) -> ModelError:
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    where = f"{f.repo}/{f.path}"
    if isinstance(exc, GatedRepoError):
        return ModelError(f"{where}: the repository is gated; accept its terms on the hub and set HF_TOKEN")
    if isinstance(exc, (EntryNotFoundError, RepositoryNotFoundError)):
        return ModelError(f"{where}: not found on {f.url().split('/' + f.repo)[0]} (check the name; "
                          "a private repository needs HF_TOKEN)")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        hint = "; set HF_TOKEN" if status in (401, 403) else ""
        return ModelError(f"{where}: the hub answered HTTP {status}{hint}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"{where}: cannot reach the hub ({first})")


def local_bytes(ref: ModelReference, folder: Path) -> int:
    """Bytes of ``ref`` already on disk: finished files and partial downloads (for progress)."""
    done = 0
    for f in ref.files:
        final = folder / f.filename
        if final.is_file():
            done += final.stat().st_size
            continue
        try:
            done += int(_progress_path(folder, f).read_text() or 0)
        except (OSError, ValueError):
            pass
    return done


def _progress_path(folder: Path, f: HubFile) -> Path:
    """Bytes of ``f`` received so far, as the fetching process last wrote them (huggingface_hub writes
    the file itself in 10 MB chunks: its size alone would lag)."""
    return _staging(folder, f) / f"{f.filename}.progress"


def _progress_bar(path: Path, *, show: bool) -> type[Any]:
    """A tqdm class for huggingface_hub that also writes the bytes received to ``path`` (a few times a
    second), shown on the terminal or not."""
    from huggingface_hub.utils.tqdm import tqdm

    class ProgressFile(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = not show
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self.received = int(kwargs.get("initial") or 0)
            self.written_at = 0.0
            self._write(force=True)

        def update(self, n: float | None = 1) -> bool | None:
            self.received += int(n or 0)
            self._write()
            return super().update(n)  # type: ignore[no-any-return]

        def close(self) -> None:
            self._write(force=True)
            super().close()

        def _write(self, *, force: bool = False) -> None:
            now = time.monotonic()
            if force or now - self.written_at >= 0.25:
                self.written_at = now
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(str(self.received))
                os.replace(tmp, path)

    return ProgressFile


def _staging(folder: Path, f: HubFile) -> Path:
    return folder / ".partial" / f.repo.replace("/", "--")


def fetch(ref: ModelReference, folder: Path, *, retries: int = RETRIES, backoff: float = 1.0,
          progress: bool = False, sleep: Callable[[float], None] = time.sleep) -> Path:
    """Fetch every missing file of ``ref`` into ``folder``; the path llama-server opens."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in ref.files:
        _fetch_file(f, folder, retries=retries, backoff=backoff, progress=progress, sleep=sleep)
    return ref.local_path(folder)


def _fetch_file(f: HubFile, folder: Path, *, retries: int, backoff: float, progress: bool,
                sleep: Callable[[float], None]) -> None:
    from filelock import FileLock

    final = folder / f.filename
    if final.is_file():
        return
    (folder / ".locks").mkdir(exist_ok=True)
    with FileLock(folder / ".locks" / f"{f.filename}.lock"):
        if final.is_file():
            return  # another process fetched it while this one waited
        remote = _metadata(f)
        staging = _staging(folder, f)
        _check_disk(f, folder, remote.size - local_bytes(ModelReference(f.filename, (f,)), folder))
        got = _download(f, staging, retries=retries, backoff=backoff, progress=progress, sleep=sleep)
        _verify(f, got, remote)
        os.replace(got, final)
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        _progress_path(folder, f).unlink(missing_ok=True)


def _check_disk(f: HubFile, folder: Path, missing: int) -> None:
    free = shutil.disk_usage(folder).free
    if missing + DISK_MARGIN > free:
        raise ModelError(f"{f.repo}/{f.path}: not enough disk space in {folder}: {_size(missing)} to fetch, "
                         f"{_size(free)} free")


def _download(f: HubFile, staging: Path, *, retries: int, backoff: float, progress: bool,
              sleep: Callable[[float], None]) -> Path:
    """huggingface_hub's download into ``staging``, again after a broken transfer (it resumes)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = f.endpoint or os.environ.get("HF_ENDPOINT") or None
    staging.mkdir(parents=True, exist_ok=True)
    bar = _progress_bar(_progress_path(staging.parent.parent, f), show=progress)
    for attempt in range(retries + 1):
        try:
            return Path(hf_hub_download(f.repo, f.path, revision=f.revision, local_dir=staging,
                                        endpoint=endpoint, token=_token(), tqdm_class=bar))
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status < 500 or attempt == retries:
                raise _hub_error(f, exc) from None
        except OSError as exc:  # httpx transport errors, a dropped connection (after hf's own retries)
            if attempt == retries or isinstance(exc, (PermissionError, FileNotFoundError)):
                raise _hub_error(f, exc) from None
        except Exception as exc:  # httpx errors are not OSErrors
            if attempt == retries or type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
                raise _hub_error(f, exc) from None
        sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


def _verify(f: HubFile, path: Path, remote: RemoteFile) -> None:
    if remote.size and path.stat().st_size != remote.size:
        path.unlink()
        raise ModelError(f"{f.repo}/{f.path}: fetched {path.stat().st_size if path.exists() else 0} bytes, "
                         f"the hub says {remote.size}; the file was deleted")
    if not remote.sha256:
        return
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    if digest.hexdigest() != remote.sha256:
        path.unlink()
        raise ModelError(f"{f.repo}/{f.path}: checksum mismatch (sha256 {digest.hexdigest()[:12]}..., the hub "
                         f"says {remote.sha256[:12]}...); the file was deleted and is not used")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def progress_line(done: int, total: int, rate: float) -> str:
    """``downloading 1.2 GB of 4.7 GB (25%), 48.0 MB/s, 1m13s left`` (a status message)."""
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    of = f" of {_size(total)}" if total else ""
    line = f"downloading {_size(done)}{of}{pct}"
    if rate > 0:
        line += f", {_size(rate)}/s"
        if total > done:
            left = int((total - done) / rate)
            line += f", {left // 60}m{left % 60:02d}s left" if left >= 60 else f", {left}s left"
    return line
