"""The SQLite history: schema version, CRUD, search, export, and crash safety."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.errors import StoreError
from app.store import SCHEMA_VERSION, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "history.sqlite3")
    yield store
    store.close()


def test_schema_version_and_wal(store: Store) -> None:
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_messages_round_trip_in_order(store: Store) -> None:
    cid = store.create_conversation("Budget", "high")
    store.add_message(
        cid,
        "user",
        "What is in the report?",
        attachments=[{"path": "/tmp/r.pdf", "kind": "document"}],
    )
    answer_id = store.add_message(cid, "assistant", "", effort="high", status="streaming")
    store.update_message(
        answer_id, content="It says", reasoning="hmm", status="stop", stats={"decode_tps": 12.5}
    )
    messages = store.messages(cid)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].attachments[0]["path"] == "/tmp/r.pdf"
    assert (messages[1].content, messages[1].reasoning, messages[1].status) == (
        "It says",
        "hmm",
        "stop",
    )
    assert messages[1].stats == {"decode_tps": 12.5}
    assert store.conversation(cid).reasoning_effort == "high"


def test_rename_search_delete_undo(store: Store) -> None:
    first = store.create_conversation("Travel plans")
    second = store.create_conversation("Budget 2026")
    store.add_message(second, "user", "Quarterly 100% figures_x")
    store.rename(first, "Trip to Lyon")
    assert [r.title for r in store.conversations("lyon")] == ["Trip to Lyon"]
    assert [r.id for r in store.conversations("quarterly")] == [second]
    assert [r.id for r in store.conversations("100%")] == [second]
    assert store.conversations("0%x") == []  # % and _ are literal, not wildcards
    store.delete(second)
    assert [r.id for r in store.conversations()] == [first]
    store.undo_delete(second)
    assert {r.id for r in store.conversations()} == {first, second}


def test_deleted_conversations_are_purged_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    store = Store(path)
    cid = store.create_conversation("gone")
    store.add_message(cid, "user", "secret")
    store.delete(cid)
    store.close()
    reopened = Store(path)
    assert reopened.conversation(cid) is None
    assert reopened.messages(cid) == []
    reopened.close()


def test_delete_messages_from_drops_later_turns(store: Store) -> None:
    cid = store.create_conversation("c")
    ids = [store.add_message(cid, "user", str(i)) for i in range(4)]
    store.delete_messages_from(cid, ids[2])
    assert [m.content for m in store.messages(cid)] == ["0", "1"]


def test_export_markdown(store: Store) -> None:
    cid = store.create_conversation("Report")
    store.add_message(cid, "user", "Summarise", attachments=[{"path": "/d/report.pdf"}])
    store.add_message(cid, "assistant", "It is **short**.", reasoning="line one", effort="high")
    text = store.export_markdown(cid)
    assert text.startswith("# Report\n")
    assert "## You" in text and "- attached: report.pdf" in text
    assert "## Quire (reasoning: high)" in text and "> line one" in text
    assert "It is **short**." in text


def test_newer_schema_is_refused_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="data folder is writable"):
        Store(path)


def test_unwritable_location_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="history database"):
        Store(blocker / "h.sqlite3")


CRASHING_WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from app.store import Store
    store = Store(Path(sys.argv[1]))
    cid = store.create_conversation("crash test")
    store.add_message(cid, "user", "question stored before generation")
    answer = store.add_message(cid, "assistant", "", status="streaming")
    text = ""
    for i in range(200):
        text += f"token{i} "
        store.update_message(answer, content=text)
        if i == 120:
            store._db.execute("BEGIN")
            store._db.execute("UPDATE messages SET content = 'half-written' WHERE id = ?",
                              (answer,))
            os._exit(9)  # power cut in the middle of an uncommitted write
""")


def test_store_survives_a_crash_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(path)],
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert result.returncode == 9
    store = Store(path)
    try:
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        [row] = store.conversations()
        user, answer = store.messages(row.id)
        assert user.content == "question stored before generation"
        assert answer.status == "streaming"
        assert answer.content.endswith("token120 ")  # every committed delta is there
    finally:
        store.close()


V1_SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, reasoning_effort TEXT NOT NULL DEFAULT 'none',
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL DEFAULT '', reasoning TEXT NOT NULL DEFAULT '',
    attachments TEXT NOT NULL DEFAULT '[]', effort TEXT NOT NULL DEFAULT 'none',
    status TEXT NOT NULL DEFAULT 'done', stats TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
INSERT INTO conversations VALUES ('c1', 'Old chat', 1, 1, 'none', 0);
INSERT INTO messages (conversation_id, role, content, created) VALUES ('c1', 'user', 'hi', 1);
PRAGMA user_version = 1;
"""


def test_version_1_database_gains_citations(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()
    store = Store(path)
    [message] = store.messages("c1")
    assert (message.content, message.citations) == ("hi", [])
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()


def test_citations_round_trip_and_export(store: Store) -> None:
    from app.citations import Citation

    cited = [
        Citation('[p. 3: "x"]', Path("/d/r.pdf"), 3, "net income rose", True, "fuzzy", 4, 19),
        Citation('[p. 8: "y"]', None, 8, "", False, "no_page"),
    ]
    cid = store.create_conversation("Report")
    store.add_message(
        cid, "user", "q", attachments=[{"path": "/d/r.pdf", "kind": "document", "pages": "1-9"}]
    )
    answer = store.add_message(cid, "assistant", "")
    store.update_message(answer, content="It rose [p. 3].", status="stop", citations=cited)
    assert store.messages(cid)[1].citations == cited
    text = store.export_markdown(cid)
    assert "- attached: r.pdf (pages 1-9)" in text
    assert "- r.pdf, p. 3: “net income rose” (✅ verified: fuzzy)" in text
    assert "- p. 8 (⚠️ not verified: no page)" in text
