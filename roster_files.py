"""The roster as a file: reading the JSON or CSV file `girls_import` takes, and writing the one
`girls_export` makes (export, import into an empty database, export again gives the same bytes).

Called by the operator CLI (`enhanced_ipc_commands`, `cli_output`). A file that is missing or
unparsable is a `RosterFileError` naming the file (the CLI's usage status); checking the rows'
values is the roster's own work (`girls_manager`). Standard library only (csv is imported by the
functions that need it); imports nothing of DIMS.
"""

from __future__ import annotations

import io
import json
from typing import Any, TextIO


class RosterFileError(Exception):
    """A roster file that cannot be read or written; the message names it."""


CSV_COLUMNS = ("name", "bio", "tags", "photo", "visible", "created_at", "updated_at")


def render(rows: list[dict[str, Any]], file_format: str) -> str:
    """Exported rows as the text of a JSON or CSV file (which girls_import reads back)."""
    if file_format == "json":
        return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    import csv
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "tags": ",".join(row["tags"]), "photo": row["photo"] or "",
                         "visible": "true" if row["visible"] else "false"})
    return out.getvalue()


_CSV_OPTIONAL = ("visible", "created_at", "updated_at")  # an empty cell: keep or default


def read(path: str) -> tuple[list[Any], str]:
    """The rows of a JSON file (an array, or {"girls": [...]}) or, for *.csv, a CSV file with a
    header. A file that is missing or unparsable is a RosterFileError naming the file."""
    file_format = "csv" if path.lower().endswith(".csv") else "json"
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return (_csv_rows(path, fh) if file_format == "csv" else _json_rows(path, fh.read())), file_format
    except OSError as exc:
        raise RosterFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RosterFileError(f"{path}: not UTF-8 text") from None


def _json_rows(path: str, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RosterFileError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("girls"), list):
        data = data["girls"]  # what `girls_export --json` prints
    if not isinstance(data, list):
        raise RosterFileError(f"{path}: expected a JSON array of profiles")
    return data


def _csv_rows(path: str, fh: TextIO) -> list[dict[str, Any]]:
    import csv  # here, not at the top: only the roster file commands need it
    try:
        reader = csv.DictReader(fh, restkey="cells beyond the header")
        header = reader.fieldnames or []
        if "name" not in header or not set(header) <= set(CSV_COLUMNS):
            raise RosterFileError(f"{path}: the CSV header must have a name column and only these: "
                                  f"{', '.join(CSV_COLUMNS)} (it has: {', '.join(header) or 'nothing'})")
        return [{key: value for key, value in row.items()
                 if value is not None and not (value == "" and key in _CSV_OPTIONAL)} for row in reader]
    except csv.Error as exc:
        raise RosterFileError(f"{path}: not valid CSV: {exc}") from None


def write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    except OSError as exc:
        raise RosterFileError(f"cannot write {path}: {exc.strerror}") from None
