"""SQLite history: conversations and messages, written as they happen (WAL, user_version)."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from app.citations import Citation, citations_markdown
from app.errors import StoreError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    reasoning_effort TEXT NOT NULL DEFAULT 'none',
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    attachments TEXT NOT NULL DEFAULT '[]',
    effort TEXT NOT NULL DEFAULT 'none',
    status TEXT NOT NULL DEFAULT 'done',
    stats TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""

# Each entry takes the database from version i + 1 to i + 2 (entry 0: 1 -> 2).
_MIGRATIONS = (
    # 2: an answer's checked page citations, as a JSON list of Citation.to_dict()
    "ALTER TABLE messages ADD COLUMN citations TEXT NOT NULL DEFAULT '[]'",
)


@dataclass
class ConversationRow:
    id: str
    title: str
    updated: float
    reasoning_effort: str = "none"


@dataclass
class MessageRow:
    id: int
    role: str
    content: str
    reasoning: str = ""
    attachments: list[dict[str, object]] = field(default_factory=list)
    effort: str = "none"
    status: str = "done"
    stats: dict[str, float] = field(default_factory=dict)
    error: str = ""
    citations: list[Citation] = field(default_factory=list)


class Store:
    """The history database. Every write commits at once, so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"Could not open the history database {path} ({exc}). "
                "Check that the data folder is writable, or start with --data-dir."
            ) from exc

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"database is from a newer Quire (version {version})")
        if version < 1:
            self._db.executescript(_SCHEMA)
            version = 1
        for step in _MIGRATIONS[version - 1 :]:
            self._db.execute("BEGIN")
            self._db.execute(step)
            version += 1
            self._db.execute(f"PRAGMA user_version={version}")
            self._db.execute("COMMIT")
        self._db.execute("DELETE FROM conversations WHERE deleted = 1")  # undo ends at restart

    def close(self) -> None:
        self._db.close()
        self.is_closed = True

    def _write(self, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(
                f"Could not save to the history database ({exc}). "
                "Free some disk space; your current answer is still on screen."
            ) from exc

    # ------------------------------------------------------------------ conversations
    def create_conversation(self, title: str, reasoning_effort: str = "none") -> str:
        conversation_id = uuid.uuid4().hex
        now = time.time()
        self._write(
            "INSERT INTO conversations (id, title, created, updated, reasoning_effort) "
            "VALUES (?, ?, ?, ?, ?)",
            (conversation_id, title, now, now, reasoning_effort),
        )
        return conversation_id

    def conversations(self, search: str = "") -> list[ConversationRow]:
        """Newest first; `search` matches titles and message text, case-insensitively."""
        sql = "SELECT id, title, updated, reasoning_effort FROM conversations c WHERE deleted = 0"
        params: tuple[object, ...] = ()
        if search.strip():
            pattern = "%" + _escape_like(search.strip()) + "%"
            sql += (
                " AND (title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m WHERE"
                " m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\'))"
            )
            params = (pattern, pattern)
        rows = self._db.execute(sql + " ORDER BY updated DESC", params).fetchall()
        return [ConversationRow(*row) for row in rows]

    def conversation(self, conversation_id: str) -> ConversationRow | None:
        row = self._db.execute(
            "SELECT id, title, updated, reasoning_effort FROM conversations WHERE id = ?",
            (conversation_id,),
        ).fetchone()
        return ConversationRow(*row) if row else None

    def rename(self, conversation_id: str, title: str) -> None:
        self._write("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def set_effort(self, conversation_id: str, effort: str) -> None:
        self._write(
            "UPDATE conversations SET reasoning_effort = ? WHERE id = ?", (effort, conversation_id)
        )

    def delete(self, conversation_id: str) -> None:
        """Hide a conversation; `undo_delete` brings it back until the app restarts."""
        self._write("UPDATE conversations SET deleted = 1 WHERE id = ?", (conversation_id,))

    def undo_delete(self, conversation_id: str) -> None:
        self._write("UPDATE conversations SET deleted = 0 WHERE id = ?", (conversation_id,))

    def _touch(self, conversation_id: str) -> None:
        self._write(
            "UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation_id)
        )

    # ------------------------------------------------------------------ messages
    def add_message(self, conversation_id: str, role: str, content: str, **extra: object) -> int:
        """Append a message and return its id (committed before this returns)."""
        cursor = self._write(
            "INSERT INTO messages (conversation_id, role, content, reasoning, attachments,"
            " effort, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                conversation_id,
                role,
                content,
                str(extra.get("reasoning", "")),
                json.dumps(extra.get("attachments", [])),
                str(extra.get("effort", "none")),
                str(extra.get("status", "done")),
                time.time(),
            ),
        )
        self._touch(conversation_id)
        return int(cursor.lastrowid or 0)

    def update_message(self, message_id: int, **values: object) -> None:
        """Update content/reasoning/status/stats/error/citations of one message."""
        allowed = ("content", "reasoning", "status", "stats", "error", "citations")
        sets = [(k, _column_value(k, v)) for k, v in values.items() if k in allowed]
        if not sets:
            return
        sql = "UPDATE messages SET " + ", ".join(f"{k} = ?" for k, _ in sets) + " WHERE id = ?"
        self._write(sql, (*[v for _, v in sets], message_id))

    def delete_messages_from(self, conversation_id: str, message_id: int) -> None:
        """Delete a message and every later one (edit-and-resend, regenerate)."""
        self._write(
            "DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
            (conversation_id, message_id),
        )

    def messages(self, conversation_id: str) -> list[MessageRow]:
        rows = self._db.execute(
            "SELECT id, role, content, reasoning, attachments, effort, status, stats, error,"
            " citations FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        ).fetchall()
        return [
            MessageRow(
                r[0],
                r[1],
                r[2],
                r[3],
                json.loads(r[4]),
                r[5],
                r[6],
                json.loads(r[7]),
                r[8],
                [Citation.from_dict(c) for c in json.loads(r[9])],
            )
            for r in rows
        ]

    def export_markdown(self, conversation_id: str) -> str:
        """The conversation as Markdown: a title, then each turn with its role."""
        row = self.conversation(conversation_id)
        lines = [f"# {row.title if row else 'Conversation'}", ""]
        for message in self.messages(conversation_id):
            who = "You" if message.role == "user" else f"Quire (reasoning: {message.effort})"
            lines += [f"## {who}", ""]
            for item in message.attachments:
                pages = f" (pages {item['pages']})" if item.get("pages") else ""
                lines.append(f"- attached: {Path(str(item.get('path', ''))).name}{pages}")
            if message.reasoning:
                quoted = "\n".join("> " + line for line in message.reasoning.splitlines())
                lines += ["> **Thinking**", ">", quoted, ""]
            lines += [message.content, ""]
            lines += citations_markdown(message.citations)
        return "\n".join(lines).rstrip() + "\n"


def _column_value(column: str, value: object) -> object:
    if column == "stats":
        return json.dumps(value)
    if column == "citations":
        return json.dumps([c.to_dict() for c in value])  # type: ignore[attr-defined]
    return value


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
