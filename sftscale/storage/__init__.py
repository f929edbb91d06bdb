"""Every byte that crosses to object storage or a node's own disk goes through this package.

    remote   pyarrow.fs, and only here: URIs, manifests on storage, downloads, uploads
    cache    the node's data cache: checked copies of prepared data, file locks, eviction
    runs     a run's own files: the committing rank of each disk, run files a checkpoint
             carries, checkpoints downloaded to resume from, what a run leaves on storage

Nothing else in sftscale knows whether a path is local.
"""

from sftscale.storage.cache import default_cache_dir, local_copy, locked
from sftscale.storage.remote import (
    filesystem,
    is_uri,
    join,
    load_manifest,
    read_remote_manifest,
    upload,
)
from sftscale.storage.runs import (
    FROM_STORAGE,
    RUN_FILES,
    RUN_FILES_ON_STORAGE,
    carry_run_files,
    claim_directory,
    fetch_checkpoint,
    local_data,
    restore_run_files,
    upload_run_files,
)

__all__ = [
    "FROM_STORAGE",
    "RUN_FILES",
    "RUN_FILES_ON_STORAGE",
    "carry_run_files",
    "claim_directory",
    "default_cache_dir",
    "fetch_checkpoint",
    "filesystem",
    "is_uri",
    "join",
    "load_manifest",
    "local_copy",
    "local_data",
    "locked",
    "read_remote_manifest",
    "restore_run_files",
    "upload",
    "upload_run_files",
]
