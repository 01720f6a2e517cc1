"""Semantic ids over parquet files: collision statistics and unique suffixes computed by polars'
streaming engine, without bringing rows into Python (the in-memory versions are
:mod:`vq_pipeline.compute.semantic_ids`), and the suffixes of a folder of code tables: ranked over the
folder (:func:`folder_suffixes`) or issued through an id registry (:func:`registry_suffixes`).

Code tables of scalar and binary codebooks (packed codes, one per dimension) are refused: they are
compression, not semantic ids.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vq_pipeline.compute.semantic_ids import SUFFIX_COLUMN, collision_record
from vq_pipeline.errors import InvalidInputError, StateError
from vq_pipeline.io.fileio import polars_path
from vq_pipeline.io.table_writer import CODEC_KEY, SUFFIX_DTYPE
from vq_pipeline.jobs.encode_state import prefix_table_path
from vq_pipeline.jobs.registry import Registry

Files = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _scan(files: Files, storage_options: dict[str, Any] | None) -> pl.LazyFrame:

    paths = [os.fspath(f) for f in files] if isinstance(files, Sequence) and not isinstance(files, str) else files
    if isinstance(paths, list) and not paths:
        raise InvalidInputError(
            "files=[] names no table; expected at least one parquet file. Fix: pass the encoded files."
        )
    return _query(files, lambda: pl.scan_parquet(paths, storage_options=storage_options))


def _query(files: Files, run: Any) -> Any:
    """Run ``run()`` and turn what reading the files raises into an :class:`InvalidInputError`."""

    try:
        return run()
    except InvalidInputError:
        raise
    except (Exception, pl.exceptions.PanicException) as exc:
        lines = str(exc).strip().splitlines()
        cause = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise InvalidInputError(
            f"files={_short(files)} cannot be read ({cause}); expected readable parquet files with one schema. "
            f"Fix: check the paths, and that every file has the same id and codes column types."
        ) from None


def _short(files: Files) -> str:
    if isinstance(files, Sequence) and not isinstance(files, str):
        names = [os.fspath(f) for f in files]
        return repr(names) if len(names) <= 3 else f"[{names[0]!r}, ... {len(names)} files]"
    return repr(os.fspath(files))


def _refuse_packed(files: Files, storage_options: dict[str, Any] | None) -> None:
    """Refuse code tables of a scalar or binary codebook (their footer names the codec,
    :data:`vq_pipeline.io.table_writer.CODEC_KEY`): one code per dimension, compression, not semantic ids.
    Only the first named file is read (a glob is left to the scan); a file that cannot be read is left to it too."""
    first = files if isinstance(files, str | os.PathLike) else next(iter(files), None)
    if first is None or any(ch in os.fspath(first) for ch in "*?["):
        return
    try:
        codec = pl.read_parquet_metadata(polars_path(os.fspath(first)), storage_options=storage_options).get(CODEC_KEY)
    except Exception:  # unreadable: the scan reports it
        return
    if codec is not None:
        raise InvalidInputError(
            f"files={_short(files)} hold {codec} codes (one code per dimension: compression, not semantic ids); "
            f"expected the codes of a residual, product or flat codebook. Fix: encode the rows with such a "
            f"codebook for semantic ids."
        )


def _codes_layout(files: Files, schema: Any, codes_column: str) -> tuple[str, int | None]:
    """The codes column's kind ('flat', 'array' or 'list') and its levels (None for a list: read later)."""

    if codes_column not in schema:
        raise InvalidInputError(
            f"codes_column={codes_column!r} is not a column of files={_short(files)} (columns: {list(schema)}); "
            f"expected the column of codes. Fix: pass codes_column= the name of the codes column."
        )
    dtype = schema[codes_column]
    if dtype == pl.Binary:
        raise InvalidInputError(
            f"codes_column={codes_column!r} has type Binary in files={_short(files)}: packed binary codes (one bit "
            f"per dimension) are not semantic ids; expected an integer column or Array(integer, levels). Fix: pass "
            f"the codes of a residual, product or flat codebook."
        )
    if dtype.is_integer():
        return "flat", 1
    if isinstance(dtype, (pl.Array, pl.List)) and dtype.inner.is_integer():
        if isinstance(dtype, pl.Array):
            if len(dtype.shape) != 1 or dtype.shape[0] == 0:
                raise InvalidInputError(
                    f"codes_column={codes_column!r} has type {dtype}; expected Array(integer, levels) with "
                    f"levels >= 1. Fix: store one 1-D array of codes per row."
                )
            return "array", dtype.shape[0]
        return "list", None
    raise InvalidInputError(
        f"codes_column={codes_column!r} has type {dtype}; expected an integer column or Array(integer, levels). "
        f"Fix: pass the column of codes the codec wrote, or cast it, e.g. pl.col({codes_column!r}).cast(pl.UInt32)."
    )


def _check_codes(files: Files, lf: pl.LazyFrame, codes_column: str, kind: str, levels: int | None) -> tuple[int, int]:
    """Check the codes column (no nulls, no negative codes, one length per list); return (n_rows, levels)."""

    col = pl.col(codes_column)
    values = col if kind == "flat" else col.arr.explode() if kind == "array" else col.list.explode()
    checks = [
        pl.len().alias("rows"),
        col.null_count().alias("nulls"),
        values.null_count().alias("inner_nulls"),
        values.min().cast(pl.Int64, strict=False).alias("low"),  # an unsigned minimum past int64 is no negative code
    ]
    if kind == "list":
        checks += [col.list.len().min().alias("short"), col.list.len().max().alias("long")]
    found = _query(files, lambda: lf.select(checks).collect(engine="streaming")).row(0, named=True)
    nulls = found["nulls"] + (found["inner_nulls"] if kind != "flat" else 0)
    if nulls:
        raise InvalidInputError(
            f"codes_column={codes_column!r} holds {nulls} null codes in files={_short(files)}; expected a code "
            f"at every level of every row. Fix: drop or re-encode the rows without codes."
        )
    if found["low"] is not None and found["low"] < 0:
        raise InvalidInputError(
            f"codes_column={codes_column!r} holds a negative code ({found['low']}) in files={_short(files)}; "
            f"expected codes >= 0. Fix: pass the codes the codec wrote (negative values are not indices)."
        )
    if levels is not None:
        return int(found["rows"]), levels
    if found["rows"] and (found["short"] != found["long"] or found["short"] == 0):
        raise InvalidInputError(
            f"codes_column={codes_column!r} holds lists of {found['short']} to {found['long']} codes in "
            f"files={_short(files)}; expected the same number of levels (>= 1) on every row. "
            f"Fix: re-encode the rows with one codec, or cast to pl.Array(pl.UInt32, levels)."
        )
    return int(found["rows"]), int(found["short"] or 1)


def collision_stats_table(
    files: Files, *, codes_column: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`collision_stats` of the codes in parquet files, computed by polars (group by the codes).

    Args:
        files: a parquet path or glob, or a list of them (local or object storage).
        codes_column: an integer column (one level), or ``Array(integer, levels)`` (``List`` with one
            length on every row also works).
        storage_options: polars' options for object storage.

    Returns:
        The same dict as :func:`collision_stats`.

    Raises:
        InvalidInputError: unreadable files, a missing codes column, codes that are not integers, null
            or negative.
    """

    lf = _scan(files, storage_options)
    _refuse_packed(files, storage_options)
    schema = _query(files, lf.collect_schema)
    kind, levels = _codes_layout(files, schema, codes_column)
    n_rows, levels = _check_codes(files, lf, codes_column, kind, levels)
    if n_rows == 0:
        return collision_record(0, 0, 0, 0, [0] * levels)
    size = pl.col("n")
    groups = (
        lf.group_by(codes_column)
        .agg(pl.len().alias("n"))
        .select(
            pl.len().alias("n_unique"),
            size.max().alias("largest"),
            size.filter(size > 1).sum().cast(pl.Int64).alias("collided"),
        )
    )
    found = _query(files, lambda: groups.collect(engine="streaming")).row(0, named=True)
    col = pl.col(codes_column)

    def level(i: int) -> pl.Expr:
        return col if kind == "flat" else col.arr.get(i) if kind == "array" else col.list.get(i)

    usage = _query(
        files,
        lambda: lf.select([level(i).n_unique().alias(f"level_{i}") for i in range(levels)]).collect(engine="streaming"),
    ).row(0)
    return collision_record(
        n_rows, int(found["n_unique"]), int(found["largest"]), int(found["collided"]), [int(u) for u in usage]
    )


def suffix_table(
    files: Files, *, id_column: str, codes_column: str, storage_options: dict[str, Any] | None = None
) -> pl.DataFrame:
    """:func:`unique_suffix` of the rows in parquet files, computed by polars (rank of the id within
    each group of equal codes).

    Args:
        files: a parquet path or glob, or a list of them (local or object storage).
        id_column: a column of unique, non-null ids (integers or strings) that order the rows within a
            tuple of codes.
        codes_column: an integer column (one level), or ``Array(integer, levels)`` (``List`` with one
            length on every row also works).
        storage_options: polars' options for object storage.

    Returns:
        A DataFrame with ``id_column`` and ``suffix`` (UInt32), one row per input row in the order
        the files are read; join it to the codes on ``id_column``.

    Raises:
        InvalidInputError: unreadable files, missing columns, a null or repeated id, or codes that are
            not integers, null or negative.
    """

    if id_column in (codes_column, SUFFIX_COLUMN):
        raise InvalidInputError(
            f"id_column={id_column!r} is also the name of the codes or suffix column; expected distinct names. "
            f"Fix: pass id_column= the column of row ids."
        )
    lf = _scan(files, storage_options)
    _refuse_packed(files, storage_options)
    schema = _query(files, lf.collect_schema)
    if id_column not in schema:
        raise InvalidInputError(
            f"id_column={id_column!r} is not a column of files={_short(files)} (columns: {list(schema)}); "
            f"expected a column of unique row ids. Fix: pass id_column= the name of the id column."
        )
    kind, levels = _codes_layout(files, schema, codes_column)
    _check_codes(files, lf, codes_column, kind, levels)
    ident = pl.col(id_column)
    rows, nulls, n_unique = _query(
        files,
        lambda: (
            lf.select(pl.len().alias("rows"), ident.null_count().alias("nulls"), ident.n_unique().alias("ids"))
            .collect(engine="streaming")
            .row(0)
        ),
    )
    if nulls:
        raise InvalidInputError(
            f"id_column={id_column!r} is null on {nulls} rows of files={_short(files)}; expected an id on every "
            f"row. Fix: fill or drop the rows without ids."
        )
    if n_unique < rows:
        dup, count = _query(
            files,
            lambda: lf.group_by(id_column).len().filter(pl.col("len") > 1).head(1).collect(engine="streaming").row(0),
        )
        raise InvalidInputError(
            f"{id_column}={dup!r} occurs {count} times in files={_short(files)} ({rows - n_unique} repeated rows); "
            f"expected unique ids, which order the rows that share codes. Fix: deduplicate the rows by "
            f"{id_column!r} before computing suffixes."
        )
    # Ordinal ranks of unique ids are the ids' order: the same suffix whatever the order of rows and files.
    suffix = (ident.rank("ordinal").over(codes_column) - 1).cast(pl.UInt32).alias(SUFFIX_COLUMN)
    return _query(files, lambda: lf.select(ident, suffix).collect(engine="streaming"))


def folder_suffixes(
    paths: Sequence[str | os.PathLike[str]], *, id_column: str | None
) -> tuple[list[pl.Series], dict[str, Any]]:
    """Semantic-id suffixes over multi-level code tables (``codes`` column), and their collision statistics.

    Every row gets its rank among the rows of all ``paths`` that share its tuple of codes, ordered by
    its id: the ``id_column`` values (unique over all files; :func:`vq_pipeline.jobs.semantic_ids.suffix_table`),
    or, when ``id_column`` is None, the pair (position of its file in ``paths``, its ``row``), i.e.
    the files' order first, then row positions within a file.

    Args:
        paths: the code tables, in the order that breaks ties when there is no id column.

    Returns:
        (one (n_rows_of_file,) UInt32 Series per file, in row order;
        :func:`vq_pipeline.compute.semantic_ids.collision_stats` of the codes of all files, before suffixes).

    Raises:
        InvalidInputError: unreadable files, or an id that occurs twice among the files.
    """
    files = [os.fspath(p) for p in paths]
    files = [polars_path(f) for f in files]
    counts = [pl.scan_parquet(f, glob=False).select(pl.len()).collect().item() for f in files]
    if id_column is not None:
        found = suffix_table(files, id_column=id_column, codes_column="codes")  # rows in the order files are read
        suffix = found[SUFFIX_COLUMN]
    else:
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # (n_files,) first global row
        order = pl.concat(
            [
                pl.scan_parquet(f, glob=False).select("codes", (pl.col("row").cast(pl.Int64) + int(o)).alias("__order"))
                for f, o in zip(files, offsets)
            ]
        )
        rank = (pl.col("__order").rank("ordinal").over("codes") - 1).cast(SUFFIX_DTYPE).alias(SUFFIX_COLUMN)
        suffix = order.select(rank).collect()[SUFFIX_COLUMN]
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (n_files + 1,)
    parts = [suffix.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    return parts, collision_stats_table(files, codes_column="codes")


def other_codebook_error(registry: Path, version: int, issued_by: str, fingerprint: str) -> StateError:
    """The refusal of codes from the codebook ``fingerprint``, which did not issue the current id version
    ``version`` of the id registry in ``registry`` (``issued_by`` did)."""
    return StateError(
        f"codebook {fingerprint[:12]}… did not issue the current id version {version} of the id registry "
        f"{str(registry)!r} (issued by codebook {issued_by[:12]}…); expected the codebook that issued it: issued "
        f"ids never change. Fix: encode with that codebook; or publish a new id version from this codebook (the "
        f"scheduled pipeline's id_policy='publish', or Registry.new_version), or use another output folder."
    )


def registry_suffixes(
    paths: Sequence[str | os.PathLike[str]],
    *,
    id_column: str,
    registry: str | os.PathLike[str],
    codebook: Any,
    publish: bool = False,
) -> tuple[list[pl.Series], dict[str, Any]]:
    """Semantic-id suffixes of multi-level code tables (the id column, ``codes``, ``suffix``), issued
    through the id registry in ``registry`` (:class:`vq_pipeline.jobs.registry.Registry`, under its lock).

    * A registry that holds no id version yet adopts the suffixes the tables already have (rows whose
      ``suffix`` is not null: a folder written with ``unique`` alone) as id version 1.
    * When another codebook issued the current id version: with ``publish``, every row (which must hold
      every item of that version) is published as a new id version, with its old->new tables; without,
      :func:`other_codebook_error` is raised.
    * One ``issue`` of every row: an item already issued keeps its suffix, a new one takes the next free
      suffix of its tuple (new items ordered by id).
    * The prefix table of the current id version is written beside the registry
      (:func:`vq_pipeline.jobs.encode_state.prefix_table_path`).

    Args:
        codebook: the Codebook that encoded the tables (its ``fingerprint`` and ``n_codes``).

    Returns:
        (one (n_rows_of_file,) UInt32 Series per file, in row order; statistics:
        :func:`collision_stats_table`'s (``max_suffix`` the largest suffix issued), ``rows_with_suffix``
        and ``id_registry``: ``registry``, ``id_version``, ``items`` (of the version), ``issued`` (items
        new to the registry in this call), ``kept`` (items it already held), ``adopted``,
        ``prefix_table`` and ``published`` (:meth:`~vq_pipeline.jobs.registry.Registry.new_version`'s
        record, or None)).
    """
    files = [polars_path(os.fspath(p)) for p in paths]
    folder = Path(registry)
    frames = [
        pl.read_parquet(f, columns=[id_column, "codes", SUFFIX_COLUMN]).with_columns(
            pl.col(SUFFIX_COLUMN).cast(pl.UInt32)
        )
        for f in files
    ]
    rows = pl.concat(frames, how="vertical_relaxed")
    stats = collision_stats_table(files, codes_column="codes")
    with Registry.open(folder, id_column=id_column) as reg:
        adopted, published = 0, None
        if reg.current_version is None:
            had = rows.filter(pl.col(SUFFIX_COLUMN).is_not_null())
            if had.height:
                adopted = reg.adopt(had, codebook.fingerprint)
        if reg.current_version is not None and reg.fingerprint() != codebook.fingerprint:
            if not publish:
                raise other_codebook_error(folder, reg.current_version, reg.fingerprint(), codebook.fingerprint)
            published = reg.new_version(rows[id_column], rows["codes"], codebook.fingerprint)
        kept = 0
        if reg.current_version is not None:
            kept = int(reg.lookup(rows[id_column])[SUFFIX_COLUMN].is_not_null().sum())
        suffix = pl.Series(SUFFIX_COLUMN, reg.issue(rows[id_column], rows["codes"], codebook.fingerprint), pl.UInt32)
        version = int(reg.current_version)  # type: ignore[arg-type]
        items = reg.frame().height
        prefix = reg.write_prefix_table(prefix_table_path(folder, version), n_codes=codebook.n_codes)
    bounds = [0, *itertools.accumulate(f.height for f in frames)]
    parts = [suffix.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    stats = {k: stats[k] for k in ("n_rows", "n_unique", "collision_rate", "largest_group", "usage")}
    stats["max_suffix"] = int(suffix.max() or 0)
    stats["rows_with_suffix"] = int((suffix > 0).sum())
    stats["id_registry"] = {
        "registry": str(folder),
        "id_version": version,
        "items": items,
        "issued": suffix.len() - kept,
        "kept": kept,
        "adopted": adopted,
        "prefix_table": str(prefix),
        "published": published,
    }
    return parts, stats


__all__ = [
    "collision_stats_table",
    "folder_suffixes",
    "other_codebook_error",
    "registry_suffixes",
    "suffix_table",
]
