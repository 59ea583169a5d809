"""Paths that may be local or remote, and files written whole.

Every path a user gives (workdir, data, tokenizer, checkpoints, eval and synth outputs) comes in
through `as_path`: an `etils.epath.Path`, which is a local path or a URL such as gs://bucket/run. Without
TensorFlow, etils reaches gs:// through fsspec and gcsfs, which honours STORAGE_EMULATOR_HOST; Orbax
writes arrays through tensorstore, which `configure_storage` points at the same endpoint.

Some readers take local files only (the ArrayRecord C++ reader, Hugging Face `from_pretrained`):
`local_copy` stages a remote file or directory into a local cache, named by a hash of its URL and of
fsspec's key for its current version, so it is downloaded once and again only when it changes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import pathlib
import re
import shutil
import tempfile

import fsspec
from etils import epath

from fourd_jax.errors import InputError

PathLike = str | os.PathLike
CACHE_ENV = "FOURD_JAX_CACHE"  # where remote files are staged; default ~/.cache/fourd_jax
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path; a remote one runs `configure_storage` first, so the endpoints agree before
    any client (tensorstore above all, which reads its endpoint once) touches it."""
    if is_remote(path):
        configure_storage()
    return epath.Path(os.fspath(path))


def absolute(path: PathLike) -> epath.Path:
    """A local path made absolute; a URL as it is (epath would prefix it with the working directory)."""
    path = as_path(path)
    return path if is_remote(path) else path.absolute()


def configure_storage() -> None:
    """One storage endpoint for every client, set before the first remote read or write (`as_path` and
    `local_copy` call it; calling it again changes nothing).

    With STORAGE_EMULATOR_HOST set (a local GCS emulator), gcsfs and google-cloud-storage go there on
    their own; tensorstore (Orbax's arrays) reads TENSORSTORE_GCS_HTTP_URL instead, and only at its first
    GCS use, so it is set here to the same endpoint. A different TENSORSTORE_GCS_HTTP_URL is refused.
    """
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and emulator != "default":
        endpoint = emulator if "://" in emulator else f"http://{emulator}"
        given = os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", endpoint)
        if given.rstrip("/") != endpoint.rstrip("/"):
            raise InputError(f"TENSORSTORE_GCS_HTTP_URL={given} and STORAGE_EMULATOR_HOST={emulator} name different "
                             "GCS endpoints; unset TENSORSTORE_GCS_HTTP_URL to use the emulator for everything.")
        # The emulator ignores credentials; a placeholder token spares tensorstore the search for real ones.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        # gcsfs's bucket-layout probe speaks gRPC to the real control plane, which an emulator does not serve.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # Listings are not cached: another process (or tensorstore, beside gcsfs) may have written since.
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def find(directory: PathLike, pattern: str) -> list[pathlib.Path] | list[epath.Path]:
    """The paths under `directory` (recursively) whose names match `pattern` (fnmatch), sorted: pathlib
    paths for a local directory; for a URL, epath paths from one fsspec listing (epath's rglob refuses
    `**` on gs://)."""
    if not is_remote(directory):
        return sorted(pathlib.Path(directory).rglob(pattern))
    fs, root = fsspec.core.url_to_fs(os.fspath(as_path(directory)))
    return sorted(epath.Path(fs.unstrip_protocol(member)) for member in fs.find(root)
                  if fnmatch.fnmatch(pathlib.PurePosixPath(member).name, pattern))


def write_text_atomic(path: PathLike, text: str) -> epath.Path:
    """Write `text` to `path` whole: a reader, or a run cut off mid-write, never sees half of it.

    Locally: a hidden temporary file beside `path`, renamed into place. On object stores a rename is a
    copy and a delete, not atomic; but a single object upload is all-or-nothing, so it is written directly."""
    path = as_path(path)
    if is_remote(path):
        path.write_text(text)
        return path
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
    return path


def cache_root() -> pathlib.Path:
    """Where remote files are staged: $FOURD_JAX_CACHE, else ~/.cache/fourd_jax."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "fourd_jax")


def local_copy(path: PathLike) -> pathlib.Path:
    """`path` itself when local; a remote file or directory staged under `cache_root()/staged`, reused
    while the remote version is unchanged. One sentence naming `path` when it does not exist."""
    if not is_remote(path):
        return pathlib.Path(path)
    configure_storage()
    url = os.fspath(path).rstrip("/")
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise InputError(f"{url} does not exist.")
    directory = fs.isdir(root)
    members = sorted(fs.find(root)) if directory else [root]
    version = hashlib.sha256(url.encode())
    for member in members:  # fsspec's key for each file's current version (size, checksum, generation)
        version.update(f"\0{member}\0{fs.ukey(member)}".encode())
    staged = cache_root() / "staged" / version.hexdigest()[:32] / pathlib.PurePosixPath(root).name
    if staged.exists():
        return staged
    staged.parent.mkdir(parents=True, exist_ok=True)
    # Downloaded beside its final name, then renamed: a cut download is never taken for a staged copy.
    partial = pathlib.Path(tempfile.mkdtemp(dir=staged.parent, prefix=".partial-")) / staged.name
    try:
        if directory:
            for member in members:
                target = partial / pathlib.PurePosixPath(member).relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(member, str(target))
        else:
            fs.get_file(root, str(partial))
        os.replace(partial, staged)
    except OSError:
        if not staged.exists():  # another process may have staged the same version meanwhile
            raise
    finally:
        shutil.rmtree(partial.parent, ignore_errors=True)
    return staged


def upload(local: PathLike, remote: PathLike, last: str | None = None) -> epath.Path:
    """Copy a local file, or a directory's files, to `remote` (each file one whole-object write);
    `last` names a file of the directory copied after all others, so its presence marks a complete copy."""
    local, remote = pathlib.Path(local), as_path(remote)
    if local.is_file():
        remote.parent.mkdir(parents=True, exist_ok=True)
        epath.Path(local).copy(remote, overwrite=True)  # streamed; the object appears when the upload closes
        return remote
    members = sorted(p for p in local.rglob("*") if p.is_file())
    members.sort(key=lambda p: p.relative_to(local).as_posix() == last)
    for member in members:
        upload(member, remote / member.relative_to(local).as_posix())
    return remote
