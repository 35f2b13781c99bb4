"""The single results format: ``samples.jsonl``, one JSON object per (method, example id).

Appended and flushed as results arrive, so a crash keeps everything already generated, and a
re-run skips what is done. A torn last line (a crash mid-write) is ignored on reading.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

REQUIRED = ("id", "method", "generation", "reference")


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> list[dict]:
        """All complete records, later duplicates of a (method, id) replacing earlier ones."""
        if not self.path.is_file():
            return []
        records: dict[tuple[str, str], dict] = {}
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue  # torn final write
                raise ValueError(f"{self.path}:{number}: not valid JSON") from None
            missing = [key for key in REQUIRED if key not in record]
            if missing:
                raise ValueError(f"{self.path}:{number}: missing field(s) {missing}")
            records[(record["method"], str(record["id"]))] = record
        return list(records.values())

    def done_ids(self, method: str) -> set[str]:
        return {str(r["id"]) for r in self.load() if r["method"] == method}

    def append(self, records: Iterable[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        # a character UTF-8 cannot hold (a lone surrogate from a program's message or a data
        # file) is written as its JSON escape, which reads back as the same string
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def by_method(self) -> dict[str, list[dict]]:
        grouped: dict[str, list[dict]] = {}
        for record in self.load():
            grouped.setdefault(record["method"], []).append(record)
        return grouped

    def _drop_torn_tail(self) -> None:
        """Cut a final line that a crash left without its newline, before appending after it."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "r+b") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # rare: only then read the whole file
                handle.truncate(self.path.read_bytes().rfind(b"\n") + 1)
