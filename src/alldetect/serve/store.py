"""A record of every prediction in SQLite: time, file hash, probabilities, model id.

The record must never cost an answer: if the database file is deleted it is recreated; if it cannot be
written, the prediction is answered anyway, the failure is logged, and ``/api/health`` says so.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from ..errors import AlldetectError

logger = logging.getLogger(__name__)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    request_id TEXT NOT NULL,
    file_name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    prob_all REAL,
    member_probs TEXT NOT NULL,
    model_id TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '',
    domain_note TEXT
);
CREATE INDEX IF NOT EXISTS predictions_request ON predictions (request_id);
"""


class PredictionStore:
    """One connection per call, so request threads never share a cursor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise AlldetectError(f"{self.path}: is a folder; --db takes the SQLite file to write "
                                 f"(e.g. {self.path / 'alldetect-predictions.sqlite'})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create()
        except (OSError, sqlite3.Error) as e:
            raise AlldetectError(f"{self.path}: cannot be used as the prediction record ({e})") from None

    def _connect(self, timeout: float = 30) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=timeout)

    def _create(self) -> None:
        with closing(self._connect()) as db, db:
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
            for added, kind in (("subject", "NOT NULL DEFAULT ''"), ("client", "NOT NULL DEFAULT ''"),
                                ("domain_note", "")):  # a record from before these were kept
                if added not in columns:
                    db.execute(f"ALTER TABLE predictions ADD COLUMN {added} TEXT {kind}")
            # a private /history reads one client's latest rows: found through this index, not a scan of the table
            db.execute("CREATE INDEX IF NOT EXISTS predictions_client ON predictions (client, id)")

    def record(self, request_id: str, model_id: str, cells: list[dict], *, client: str = "") -> bool:
        """Record a request's cells (``client``: who sent it, for a private history); False (and a logged error)
        when the record cannot be written."""
        now = time.time()
        rows = [(now, request_id, c["name"], c["sha256"], c["prob_all"], json.dumps(c["members"]), model_id,
                 c["error"], c["group"], client, None if c.get("in_domain") is None else c["domain_note"])
                for c in cells]
        for attempt in range(2):
            try:
                if attempt:
                    self._create()  # the file was deleted or emptied under us
                with closing(self._connect()) as db, db:
                    db.executemany("INSERT INTO predictions (time, request_id, file_name, sha256, prob_all, "
                                   "member_probs, model_id, error, subject, client, domain_note) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                return True
            except (OSError, sqlite3.Error) as e:
                failure = e
        logger.error("%s: prediction %s answered but not recorded (%s)", self.path, request_id, failure)
        return False

    def problem(self) -> str | None:
        """None when the record can be written, else why not."""
        try:
            self._create()  # recreates a deleted record
            with closing(self._connect(timeout=0.2)) as db:
                db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or folder
                db.rollback()
            return None
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                return None  # a prediction is being written right now: writable
            return f"prediction record {self.path} not writable: {e}"
        except (OSError, sqlite3.Error) as e:
            return f"prediction record {self.path} not writable: {e}"

    def request(self, request_id: str) -> list[dict]:
        return self._select("WHERE request_id = ? ORDER BY id", (request_id,))

    def recent(self, limit: int = 200, *, client: str | None = None) -> list[dict]:
        """The latest predictions, of one client or (None) of all."""
        if client is None:
            return self._select("ORDER BY id DESC LIMIT ?", (limit,))
        return self._select("WHERE client = ? ORDER BY id DESC LIMIT ?", (client, limit))

    def _select(self, clause: str, params: tuple) -> list[dict]:
        try:
            with closing(self._connect()) as db:
                db.row_factory = sqlite3.Row
                rows = db.execute(f"SELECT * FROM predictions {clause}", params).fetchall()
        except sqlite3.Error as e:
            logger.error("%s: cannot read the prediction record (%s)", self.path, e)
            return []
        return [dict(r) for r in rows]
