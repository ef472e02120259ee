"""A data file's records as the Hugging Face datasets see them: its columns read from its start only (what
`launcher validate` asks of a file: its format parses, it holds a record, it has the columns the recipe names,
without loading, tokenizing or caching the whole of it; nothing is written), and the one line for what is wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from launcher.components import ArgumentProblem

CSV_ROWS_READ = 100  # records whose fields are counted against the header


class Unreadable(ValueError):
    """The file does not parse as its format (the message says why, in one line)."""


def first_columns(file: Path, builder: str) -> list[str] | None:
    """The columns of the file's first record (`builder`: json, csv, parquet or text, as `datasets` names them);
    None when it holds no record (an empty file, a CSV header alone, an empty JSON list)."""
    if file.stat().st_size == 0:
        return None
    try:
        if builder == "csv":
            return _csv_columns(file)
        if builder == "json":
            return _json_columns(file)
        if builder == "parquet":
            return _parquet_columns(file)
    except Unreadable:
        raise
    except Exception as e:  # a decoding error, a damaged Parquet footer
        raise Unreadable(f"{type(e).__name__}: {_first_line(e)}") from None
    return ["text"]  # a text file: each line a record of one column


def _csv_columns(file: Path) -> list[str] | None:
    """The header, once a record follows it; a record of more fields than the header, among the first few, is
    refused as the full read would refuse it (a file of another format read as CSV, most often)."""
    with open(file, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        rows = (row for row in reader if row)  # blank lines hold no record, as pandas reads them
        header = next(rows, None)
        records = 0
        for row in rows:
            records += 1
            if len(row) > len(header or []):
                raise Unreadable(f"line {reader.line_num} has {len(row)} fields, the header {len(header or [])}")
            if records == CSV_ROWS_READ:
                break
    return header if records else None


def _json_columns(file: Path) -> list[str] | None:
    """JSON lines (one object a line), else one JSON document: a list of objects, or an object of columns."""
    with open(file, encoding="utf-8") as f:
        line = next((line for line in f if line.strip()), "")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None  # the first line of a document spread over several lines
    if isinstance(record, dict):
        return list(record)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise Unreadable(f"neither JSON lines nor one JSON document: {e}") from None
    if isinstance(document, list):
        if not document:
            return None
        if not isinstance(document[0], dict):
            raise Unreadable(f"expected records (JSON objects), its first is {type(document[0]).__name__}")
        return list(document[0])
    if isinstance(document, dict):
        return list(document)
    raise Unreadable(f"expected JSON objects, got a {type(document).__name__}")


def _parquet_columns(file: Path) -> list[str] | None:
    import pyarrow.parquet as pq  # a dependency of `datasets`; reads the footer only

    meta = pq.ParquetFile(file)
    return list(meta.schema_arrow.names) if meta.metadata.num_rows else None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def empty(file: Path | str) -> ArgumentProblem:
    return ArgumentProblem("path", f"{file} is empty (no records)")


def check_columns(name: str, have: list[str], columns: tuple[str, ...]) -> None:
    """A column the records lack is refused, naming those they have."""
    for column in columns:
        if column not in have:
            raise ArgumentProblem(
                "column" if column == columns[0] else "label_column",
                f"{name} has no column {column!r} (its columns: {', '.join(have)})",
            )


def reason(e: BaseException) -> str:
    """The first line of what went wrong at the bottom: `datasets` wraps a parser's error in its own
    (DatasetGenerationError: An error occurred while generating the dataset)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0]}" if message else type(e).__name__
