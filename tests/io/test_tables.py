"""Reading tables: Array and List columns, batch boundaries, nulls, ragged rows, many files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_pipeline import InvalidInputError
from vq_pipeline.io.discovery import discover
from vq_pipeline.io.table_writer import code_dtype
from vq_pipeline.io.tables import inspect_source, iter_batches


def read_all(path: Path, **kwargs) -> tuple[torch.Tensor, list]:
    (source,) = discover([path])
    batches = list(iter_batches(source, column="emb", **kwargs))
    ids = [v for b in batches for v in (b.ids.to_list() if b.ids is not None else range(b.offset, b.offset + len(b)))]
    assert [b.offset for b in batches] == list(np.cumsum([0] + [len(b) for b in batches[:-1]]))
    return torch.cat([b.x for b in batches]), ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_rows=st.integers(1, 300),
    dim=st.integers(1, 9),
    batch_rows=st.integers(1, 128),
    kind=st.sampled_from(["array32", "array64", "list32", "list64", "array_int"]),
    data=st.data(),
)
def test_batches_reassemble_the_table_exactly(tmp_path: Path, n_rows: int, dim: int, batch_rows: int, kind: str, data) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n_rows, dim)) * 100
    if kind == "array_int":
        x = np.round(x).astype(np.int64)
    inner = {"array32": pl.Float32, "list32": pl.Float32, "array_int": pl.Int32}.get(kind, pl.Float64)
    outer = pl.List(inner) if kind.startswith("list") else pl.Array(inner, dim)
    frame = pl.DataFrame({"id": np.arange(n_rows) * 7, "emb": pl.Series(x.tolist(), dtype=outer)})
    path = tmp_path / f"{kind}-{n_rows}-{dim}-{batch_rows}.parquet"
    frame.write_parquet(path, row_group_size=data.draw(st.integers(1, 300)))
    got, ids = read_all(path, batch_rows=batch_rows, id_column="id")
    # float64 columns stay float64 until validation (which refuses values beyond float32's range).
    assert got.dtype == (torch.float64 if kind.endswith("64") else torch.float32) and got.shape == (n_rows, dim)
    assert torch.equal(got.float(), torch.from_numpy(x.astype(np.float32)))
    assert ids == list(range(0, 7 * n_rows, 7))


def test_null_embedding_null_element_ragged_and_empty_vectors(tmp_path: Path) -> None:
    cases = {
        "null_row": (pl.Series([[1.0, 2.0], None, [3.0, 4.0]], dtype=pl.List(pl.Float32)), r"is null at row 1"),
        "null_element": (pl.Series([[1.0, 2.0], [3.0, None]], dtype=pl.Array(pl.Float32, 2)), r"null element inside the vector at row 1"),
        "ragged": (pl.Series([[1.0, 2.0], [1.0, 2.0], [3.0]], dtype=pl.List(pl.Float32)), r"length 1 at row 2; expected every vector to have length 2"),
        "empty_vectors": (pl.Series([[], []], dtype=pl.List(pl.Float32)), r"zero-length vector at row 0; expected vectors of dim >= 1"),
    }
    for name, (series, pattern) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pl.DataFrame({"emb": series}).write_parquet(path)
        with pytest.raises(InvalidInputError, match=pattern):
            read_all(path, batch_rows=10)


def test_ragged_row_in_a_later_batch_names_its_global_row(tmp_path: Path) -> None:
    rows = [[1.0, 2.0]] * 25 + [[1.0, 2.0, 3.0]] + [[0.0, 0.0]] * 5
    path = tmp_path / "t.parquet"
    pl.DataFrame({"emb": pl.Series(rows, dtype=pl.List(pl.Float64))}).write_parquet(path)
    with pytest.raises(InvalidInputError, match=r"length 3 at row 25"):
        read_all(path, batch_rows=10)


def test_schema_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pl.DataFrame({"id": [1, 2], "emb": ["a", "b"], "v": pl.Series([[1.0], [2.0]], dtype=pl.List(pl.Float32))}).write_parquet(path)
    (source,) = discover([path])
    with pytest.raises(InvalidInputError, match=r"column='emb' of .* has dtype=String; expected Array\(Float32, dim\)"):
        inspect_source(source, column="emb")
    with pytest.raises(InvalidInputError, match=r"column='nope' is not a column of .*expected one of \['id', 'emb', 'v'\]"):
        inspect_source(source, column="nope")
    with pytest.raises(InvalidInputError, match=r"id_column='key' is not a column"):
        inspect_source(source, column="v", id_column="key")
    assert inspect_source(source, column="v").dim is None and inspect_source(source, column="v").n_rows == 2


def test_discovery_of_files_globs_folders_and_hive_partitions(tmp_path: Path) -> None:
    frame = pl.DataFrame({"emb": pl.Series([[1.0, 2.0]], dtype=pl.Array(pl.Float32, 2))})
    for rel in ["date=2026-11-01/part-0.parquet", "date=2026-11-01/part-1.parquet", "date=2026-11-02/a.arrow", "_tmp/x.parquet", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".arrow"):
            frame.write_ipc(tmp_path / rel)
        elif rel.endswith(".parquet"):
            frame.write_parquet(tmp_path / rel)
        else:
            (tmp_path / rel).write_text("not a table")
    keys = [s.key for s in discover([tmp_path])]
    assert keys == ["date=2026-11-01/part-0.parquet", "date=2026-11-01/part-1.parquet", "date=2026-11-02/a.arrow"]
    assert [s.key for s in discover([str(tmp_path / "date=*" / "*.parquet")])] == ["date=2026-11-01/part-0.parquet", "date=2026-11-01/part-1.parquet"]
    (one,) = discover([tmp_path / "date=2026-11-02" / "a.arrow"])
    assert one.format == "ipc" and torch.equal(read_all(Path(one.uri), batch_rows=5)[0], torch.tensor([[1.0, 2.0]]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"holds no table files.*Fix"):
        discover([tmp_path / "empty"])
    with pytest.raises(InvalidInputError, match=r"does not exist"):
        discover([tmp_path / "missing.parquet"])
    with pytest.raises(InvalidInputError, match=r"would both write output 'part-0.parquet'"):
        discover([tmp_path / "date=2026-11-01", _copy(tmp_path)])


def _copy(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    other.mkdir()
    (other / "part-0.parquet").write_bytes((tmp_path / "date=2026-11-01" / "part-0.parquet").read_bytes())
    return other


def test_corrupt_and_truncated_parquet(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pl.DataFrame({"emb": pl.Series([[1.0, 2.0]] * 100, dtype=pl.Array(pl.Float32, 2))}).write_parquet(good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (source,) = discover([bad])
    with pytest.raises(InvalidInputError, match=r"cannot be read .*Fix: rewrite or remove the file"):
        inspect_source(source, column="emb")
    with pytest.raises(InvalidInputError, match=r"cannot be read"):
        list(iter_batches(source, column="emb", batch_rows=10))


def test_code_dtype_is_the_smallest_that_holds_the_codes() -> None:
    assert code_dtype(256) == pl.UInt8 and code_dtype(257) == pl.UInt16
    assert code_dtype(65536) == pl.UInt16 and code_dtype(65537) == pl.UInt32
