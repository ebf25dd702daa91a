"""Operator tasks on the database file: an online, consistent backup."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import BadRequest


def backup(source: str, target: Path) -> dict[str, int]:
    """Copy the live database with SQLite's backup API: one consistent snapshot while the
    receiver keeps writing (WAL readers never block the writer). The copy is checked before
    it is reported. Returns row counts of the copy."""
    if target.exists():
        raise BadRequest(f"{target} exists; choose a new path (a backup never overwrites)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(partial)
    try:
        src.backup(dst, pages=0)
        dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        (verdict,) = dst.execute("PRAGMA integrity_check").fetchone()
        if verdict != "ok":
            raise BadRequest(f"the backup failed its integrity check: {verdict}")
        counts = {
            table: dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("evaluations", "deliveries", "outbox")
        }
    finally:
        dst.close()
        src.close()
    partial.rename(target)
    return counts
