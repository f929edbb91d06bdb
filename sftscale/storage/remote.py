"""Object storage through pyarrow.fs (s3://, gs://, anything pyarrow.fs reads): the only
module of sftscale that talks to it.

S3-compatible endpoints other than AWS: `AWS_ENDPOINT_URL` (or `?endpoint_override=host:port&
scheme=http` in the URI), credentials from the usual AWS variables.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from data_tools import schema
from sftscale.config import ConfigError, redact


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def join(uri: str, *names: str) -> str:
    """`uri`/name/... , keeping a query (`?endpoint_override=...`) at the end."""
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI."""
    import pyarrow.fs as pafs  # heavy (pyarrow's C++ libraries): only object-storage runs

    return pafs.FileSystem.from_uri(uri)


def read_remote_manifest(uri: str) -> schema.Manifest:
    fs, root = filesystem(uri)
    try:
        with fs.open_input_stream(f"{root}/{schema.MANIFEST_NAME}") as f:
            raw = json.loads(f.read())
    except (OSError, FileNotFoundError) as e:
        raise schema.ShardFormatError(
            f"{redact(uri)}: cannot read {schema.MANIFEST_NAME} ({str(e).splitlines()[0]}); point data.path "
            "at a directory written by `sftscale prepare` and uploaded whole"
        ) from e
    try:
        manifest = schema.Manifest.from_dict(raw)
    except (KeyError, TypeError) as e:
        raise schema.ShardFormatError(
            f"{redact(uri)}: not a complete sftscale manifest ({e})"
        ) from e
    schema.check_names(manifest, where=redact(uri))
    return manifest


def load_manifest(path: str, *, field: str) -> schema.Manifest:
    """The manifest of a prepared directory, local or on object storage; `field` names the
    setting in the error."""
    try:
        return read_remote_manifest(path) if is_uri(path) else schema.read_manifest(path)
    except schema.ShardFormatError as e:
        raise ConfigError(f"{field}: {e}") from e


def list_files(uri: str) -> list[str]:
    """Names of the files directly inside the directory `uri`."""
    import pyarrow.fs as pafs  # heavy: see filesystem()

    fs, root = filesystem(uri)
    selector = pafs.FileSelector(root, recursive=False)
    return [Path(i.path).name for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]


def read_blocks(uri: str, *, block: int = 8 << 20) -> Iterator[bytes]:
    """The bytes of the file `uri`, `block` at a time."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as src:
        while data := src.read(block):
            yield data


def upload(src: Path, uri: str) -> None:
    """A local file or directory (recursively) to `uri`."""
    import pyarrow.fs as pafs  # heavy: see filesystem()

    fs, dest = filesystem(uri)
    if src.is_dir():
        pafs.copy_files(str(src), dest, destination_filesystem=fs)
    elif src.is_file():
        with fs.open_output_stream(dest) as out:
            out.write(src.read_bytes())
