"""Use cases: fit a codebook from tables, encode tables into code tables resumably, measure drift.

The one place that joins table I/O (:mod:`vq_pipeline.tables`) with compute. No Prefect here:
``flows/`` wraps these functions. Each job has its own module; this one gathers their public names:

* :mod:`vq_pipeline.fit_tables`: :func:`fit_from_tables`;
* :mod:`vq_pipeline.partitioned`: the distributed fit's wire protocol and :func:`fit_partitioned`;
* :mod:`vq_pipeline.encode_folder`: :func:`encode_tables` and the steps of an encode run (plan,
  lock, per-file encode);
* :mod:`vq_pipeline.encode_state`: the output folder's bookkeeping (receipts, manifest, inventory);
* :mod:`vq_pipeline.drift`: :func:`drift_report`.
"""

from __future__ import annotations

from .drift import drift_report
from .encode_folder import EncodeResult, encode_lock, encode_source, encode_tables, plan_encode, remove_temporaries
from .encode_state import (
    LOCK_NAME,
    MANIFEST_NAME,
    FolderInventory,
    folder_inventory,
    manifest_path,
    output_path,
    prune_stale,
    state_dir,
    write_manifest,
)
from .errors import EncodeLockedError
from .fit_tables import DEFAULT_DATA_BUDGET, fit_from_tables
from .partitioned import (
    fit_partitioned,
    load_partition_stats,
    partition_e_step,
    partition_stats_file,
    reduce_partition_stats,
    save_centroids,
    save_partition_stats,
)
from .paths import folder_lock
from .settings import DEFAULT_BATCH_ROWS, EncodeOptions, EncodeSettings

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_DATA_BUDGET",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "EncodeLockedError",
    "EncodeOptions",
    "EncodeResult",
    "EncodeSettings",
    "FolderInventory",
    "drift_report",
    "encode_lock",
    "encode_source",
    "encode_tables",
    "fit_from_tables",
    "fit_partitioned",
    "folder_inventory",
    "folder_lock",
    "load_partition_stats",
    "manifest_path",
    "output_path",
    "partition_e_step",
    "partition_stats_file",
    "plan_encode",
    "prune_stale",
    "reduce_partition_stats",
    "remove_temporaries",
    "save_centroids",
    "save_partition_stats",
    "state_dir",
    "write_manifest",
]
