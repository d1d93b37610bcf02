"""A record of every prediction in SQLite: time, file hash, probabilities, model id."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

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
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS predictions_request ON predictions (request_id);
"""


class PredictionStore:
    """One connection per call, so request threads never share a cursor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def record(self, request_id: str, model_id: str, cells: list[dict]) -> None:
        now = time.time()
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT INTO predictions (time, request_id, file_name, sha256, prob_all, member_probs, model_id, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(now, request_id, c["name"], c["sha256"], c["prob_all"], json.dumps(c["members"]), model_id,
                  c["error"]) for c in cells])

    def request(self, request_id: str) -> list[dict]:
        return self._select("WHERE request_id = ? ORDER BY id", (request_id,))

    def recent(self, limit: int = 200) -> list[dict]:
        return self._select("ORDER BY id DESC LIMIT ?", (limit,))

    def _select(self, clause: str, params: tuple) -> list[dict]:
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(f"SELECT * FROM predictions {clause}", params).fetchall()
        return [dict(r) for r in rows]
