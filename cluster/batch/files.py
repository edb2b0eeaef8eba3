"""Parquet in and out for batch jobs (:mod:`cluster.batch`), through ``pyarrow.fs``; no Ray here.

* :func:`list_inputs`: the Parquet files behind a URI (a file, a directory, or a glob), with their row counts.
* :func:`to_tensor`: one Arrow column -> a numpy batch of a plan input, and a reason for every row that does not
  fit (null, wrong length, a value the dtype cannot hold). Fixed-size lists (nested or flat), variable lists,
  Arrow tensor extension arrays (``pa.fixed_shape_tensor``, Ray's) and plain numeric columns are read.
* :func:`output_array`: a numpy batch -> an Arrow column: a fixed-size list when each row is a vector,
  ``pa.fixed_shape_tensor`` when it has more dimensions (both are stored as fixed-size lists in Parquet).
* :class:`FileSink`: one output file per input file, written under a temporary name and renamed when the
  last row is in, so a file under its final name is complete; rejected rows go to ``_rejected/`` first.

Nothing here imports torch: read tasks run this module in many worker processes.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from partitions import storage
from partitions.dtypes import arrow_type, from_words, wire_array
from partitions.errors import ArtifactError, PartserveError
from partitions.types import TensorSpec

REJECTED_DIR = "_rejected"
ROW = "_row"
"""Rejected outputs: the row's index in its input file."""
REASON = "_reason"
"""Why a row was rejected (null in the dataset for rows that ran)."""
INPUT = "_input"
"""The input file a row came from (the dataset of :func:`partserve.batch`)."""
PARTIAL = ".partial"
GLOB_CHARS = "*?["


class BatchInputError(PartserveError):
    """The input or output of a batch job cannot be used as given."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    """The file's URI (a local path, or ``s3://bucket/key``)."""
    path: str
    """As ``pyarrow.fs`` names it (absolute local path, or ``bucket/key``)."""
    rel: str
    """Relative to the input's base: the output's name under the output directory."""
    rows: int
    row_groups: tuple[int, ...]
    """Rows in each row group."""
    schema: pa.Schema = field(compare=False)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path behind ``uri`` (:func:`partitions.storage.resolve`), a failure as the job's
    input error."""
    try:
        return storage.resolve(uri)
    except ArtifactError as exc:
        raise BatchInputError(exc.message, "pass a local path or an s3://, gs:// URI") from exc


def _uri_base(uri: str) -> tuple[str, str]:
    """``(base, pattern)``: the directory part of ``uri`` before its first glob character, and the rest."""
    cut = min((uri.index(c) for c in GLOB_CHARS if c in uri), default=-1)
    if cut < 0:
        return uri, ""
    base = uri[:cut].rsplit("/", 1)[0] if "/" in uri[:cut] else "."
    return base, uri[len(base) + 1 :]


def glob_match(rel: str, pattern: str) -> bool:
    """Shell-style matching of a relative path: ``*`` and ``?`` stay within one directory, ``**`` spans any."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.fullmatch("".join(out), rel) is not None


def _is_data(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith((".", "_")) and not base.endswith(PARTIAL)


def list_inputs(uri: str) -> tuple[pafs.FileSystem, list[InputFile]]:
    """The Parquet files at ``uri`` (a file, a directory searched recursively, or a glob such as
    ``data/*.parquet``), sorted by name, with their row counts read from the footers."""
    base_uri, pattern = _uri_base(uri)
    fs, base = resolve(base_uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise BatchInputError(f"input {uri!r} does not exist", "pass a Parquet file, a directory or a glob")
    if info.type == pafs.FileType.File and not pattern:
        paths = [(base, posixpath.basename(base))]
    else:
        selector = pafs.FileSelector(base, recursive=True)
        found = [f.path for f in fs.get_file_info(selector) if f.type == pafs.FileType.File]
        rels = [(p, posixpath.relpath(p, base)) for p in found]
        if pattern:
            rels = [(p, r) for p, r in rels if glob_match(r, pattern)]
        else:
            rels = [(p, r) for p, r in rels if r.endswith(".parquet")]
        paths = sorted((p, r) for p, r in rels if all(_is_data(part) for part in r.split("/")))
    if not paths:
        raise BatchInputError(f"no Parquet files at {uri!r}", "pass a Parquet file, a directory of them, or a glob")
    files = []
    for path, rel in paths:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowInvalid) as exc:
            raise BatchInputError(f"{path} is not a readable Parquet file ({exc})", "remove it or fix it") from exc
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        uri_of = f"{base_uri.split('://', 1)[0]}://{path}" if "://" in base_uri else path
        files.append(InputFile(uri_of, path, rel, meta.num_rows, groups, schema))
    return fs, files


def read_rows(fs: pafs.FileSystem, path: str, row_group: int, columns: Sequence[str]) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(row_group, columns=list(columns))


# ---- Arrow columns <-> numpy batches ----------------------------------------------------------------------


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _storage(arr: pa.Array) -> tuple[pa.Array, tuple[int, ...] | None]:
    """The array under an extension type, and the per-row shape the extension declares (if any)."""
    if isinstance(arr.type, pa.BaseExtensionType):
        shape = getattr(arr.type, "shape", None)
        return arr.storage, tuple(int(d) for d in shape) if shape is not None else None
    return arr, None


def _nesting(t: pa.DataType) -> tuple[int, pa.DataType]:
    """How many list levels ``t`` has (extension types read as their storage) and the type of its leaves."""
    depth = 0
    while True:
        if isinstance(t, pa.BaseExtensionType):
            t = t.storage_type
        if not _is_list(t):
            return depth, t
        t = t.value_type
        depth += 1


def column_problem(t: pa.DataType, spec: TensorSpec) -> str | None:
    """Why a column of type ``t`` can never hold input ``spec`` (checked once per file, before the job), or
    ``None`` when its rows can be read (each row may still be rejected)."""
    dims = spec.shape[1:]
    depth, leaf = _nesting(t)
    if not (pa.types.is_integer(leaf) or pa.types.is_floating(leaf) or pa.types.is_boolean(leaf)):
        return f"holds {leaf} values; {spec.name} takes {spec.dtype}"
    # Float columns for integer inputs pass here: integral floats are accepted row by row.
    declared = getattr(t, "shape", None) if isinstance(t, pa.BaseExtensionType) else None
    if declared is not None and math.prod(declared) != math.prod(dims):
        return f"holds tensors of shape {list(declared)}; {spec.name} takes {list(dims)} per row"
    if declared is not None:
        return None
    if depth != len(dims) and not (depth == 1 and dims):
        return f"has {depth} list levels; {spec.name} takes shape {list(dims)} per row (nested or flat lists)"
    return None


def to_tensor(arr: pa.Array | pa.ChunkedArray, spec: TensorSpec) -> tuple[np.ndarray, list[str | None]]:
    """The rows of ``arr`` as a ``[rows, *spec.shape[1:]]`` array of ``spec.dtype``, and per row ``None`` or
    the reason it cannot be used (its slot in the array is then zeros)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    dims = tuple(spec.shape[1:])
    size = math.prod(dims)
    dtype = spec.np_dtype
    reasons: list[str | None] = [None] * n
    arr, declared = _storage(arr)
    if declared is not None:
        levels = [size] if _nesting(arr.type)[0] == 1 else list(declared)
    elif dims and _nesting(arr.type)[0] == 1:
        levels = [size]
    else:
        levels = list(dims)

    def reject(rows: np.ndarray, why: str) -> None:
        for r in rows.tolist():
            if reasons[r] is None:
                reasons[r] = why

    row_of = np.arange(n)  # top-level row of each element at the current level
    level = arr
    for k, want in enumerate(levels):
        if level.null_count:
            nulls = np.asarray(level.is_null())
            reject(np.unique(row_of[nulls]), f"{spec.name}: null" if k == 0 else f"{spec.name}: null element")
        lengths = pc.list_value_length(level).fill_null(want).to_numpy(zero_copy_only=False)
        bad = lengths != want
        if bad.any():
            for r, length in zip(row_of[bad].tolist(), lengths[bad].tolist()):
                if reasons[r] is None:
                    reasons[r] = f"{spec.name}: {length} values at level {k}, expected shape {list(dims)}"
        parents = pc.list_parent_indices(level).to_numpy()
        row_of = row_of[parents]
        level = level.flatten()
    if level.null_count:
        why = f"{spec.name}: null element" if levels else f"{spec.name}: null"
        reject(np.unique(row_of[np.asarray(level.is_null())]), why)
        level = level.fill_null(0)
    values = level.to_numpy(zero_copy_only=False)
    good = np.array([r is None for r in reasons], dtype=bool)
    out = np.zeros((n, *dims), dtype=dtype)
    if not good.any():
        return out, reasons
    keep = good[row_of]
    picked = values[keep]
    cast = picked.astype(dtype)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(picked.dtype, np.integer):
        with np.errstate(invalid="ignore"):
            lossy = cast.astype(picked.dtype) != picked
        if lossy.any():
            rows_kept = row_of[keep]
            for r, v in zip(rows_kept[lossy].tolist(), picked[lossy].tolist()):
                if reasons[r] is None:
                    reasons[r] = f"{spec.name}: {v!r} is not a {dtype.name}"
            good = np.array([r is None for r in reasons], dtype=bool)
            keep = good[row_of]
            cast = values[keep].astype(dtype)
    elif np.issubdtype(dtype, np.integer) and np.issubdtype(picked.dtype, np.integer):
        info = np.iinfo(dtype)
        outside = (picked < info.min) | (picked > info.max)
        if outside.any():
            rows_kept = row_of[keep]
            reject(np.unique(rows_kept[outside]), f"{spec.name}: values outside the range of {dtype.name}")
            good = np.array([r is None for r in reasons], dtype=bool)
            keep = good[row_of]
            cast = values[keep].astype(dtype)
    out[good] = cast.reshape((int(good.sum()), *dims))
    return out, reasons


def flat_array(batch: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """A ``[rows, ...]`` batch as a fixed-size list of its flattened rows (``mask``: rows to store as null);
    bfloat16 as its raw words (``uint16``), which :func:`flat_view` reads back."""
    values = pa.array(wire_array(np.ascontiguousarray(batch), raw=True).reshape(-1))
    size = math.prod(batch.shape[1:])
    if mask is None or not mask.any():
        return pa.FixedSizeListArray.from_arrays(values, size)
    return pa.FixedSizeListArray.from_arrays(values, size, mask=pa.array(mask))


def flat_view(column: pa.ChunkedArray | pa.Array, spec: TensorSpec) -> np.ndarray:
    """A fixed-size list column written by :func:`flat_array` as a ``[rows, *spec.shape[1:]]`` array (no copy
    when it is one chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = column.flatten().to_numpy(zero_copy_only=False)
    words = from_words(values, spec.dtype)
    return (values if words is None else words).reshape((len(column), *spec.shape[1:]))


def output_type(spec: TensorSpec) -> pa.DataType:
    dims = spec.shape[1:]
    value = arrow_type(spec.dtype)
    if not dims:
        return value
    if len(dims) == 1:
        return pa.list_(value, dims[0])
    return pa.fixed_shape_tensor(value, list(dims))


def output_array(batch: np.ndarray, spec: TensorSpec, mask: np.ndarray | None = None) -> pa.Array:
    """A batch of model output ``spec`` as its Parquet column (:func:`output_type`; bfloat16 as float32, which
    holds it exactly); ``mask``: null rows."""
    batch = wire_array(batch, raw=False)
    dims = spec.shape[1:]
    if not dims:
        return pa.array(batch, mask=mask)
    flat = flat_array(batch, mask)
    if len(dims) == 1:
        return flat
    return pa.ExtensionArray.from_storage(output_type(spec), flat)


# ---- output files ---------------------------------------------------------------------------------------


def output_name(rel: str) -> str:
    return rel if rel.endswith(".parquet") else rel + ".parquet"


def final_paths(out_base: str, rel: str) -> tuple[str, str]:
    """``(output, rejected)`` paths of input ``rel`` under the output directory ``out_base``."""
    name = output_name(rel)
    return posixpath.join(out_base, name), posixpath.join(out_base, REJECTED_DIR, name)


def partial_path(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}{PARTIAL}")


def is_complete(fs: pafs.FileSystem, out_base: str, rel: str) -> bool:
    return fs.get_file_info(final_paths(out_base, rel)[0]).type == pafs.FileType.File


class FileSink:
    """The outputs of one input file: rows appended as they come, finished once ``expected`` rows are in."""

    def __init__(self, fs: pafs.FileSystem, out_base: str, source: InputFile, schema: pa.Schema) -> None:
        self.fs = fs
        self.source = source
        self.final, self.rejected_final = final_paths(out_base, source.rel)
        self.schema = schema
        self.seen = 0
        self.rows = 0
        self.rejected: list[pa.Table] = []
        self._writer: pq.ParquetWriter | None = None

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            self.fs.create_dir(posixpath.dirname(self.final), recursive=True)
            self._writer = pq.ParquetWriter(partial_path(self.final), self.schema, filesystem=self.fs)
        return self._writer

    def add(self, ok: pa.Table, rejected: pa.Table | None) -> None:
        if ok.num_rows:
            self._open().write_table(ok.select(self.schema.names).cast(self.schema))
            self.rows += ok.num_rows
        if rejected is not None and rejected.num_rows:
            self.rejected.append(rejected)
        self.seen += ok.num_rows + (rejected.num_rows if rejected is not None else 0)

    @property
    def done(self) -> bool:
        return self.seen >= self.source.rows

    @property
    def rejected_rows(self) -> int:
        return sum(t.num_rows for t in self.rejected)

    def finish(self) -> None:
        """Rejected rows first, then the output under its final name: an output file means both are whole."""
        if self.rejected:
            table = pa.concat_tables(self.rejected).sort_by(ROW)
            self.fs.create_dir(posixpath.dirname(self.rejected_final), recursive=True)
            tmp = partial_path(self.rejected_final)
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, self.rejected_final)
        else:
            self._delete(self.rejected_final)  # left by a run that stopped before this file's output
        self._open().close()
        self.fs.move(partial_path(self.final), self.final)

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._delete(partial_path(self.final))

    def _delete(self, path: str) -> None:
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)
