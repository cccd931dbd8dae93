"""The conversation list model: qtmodeltester-clean, roles, ages."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt

from app.models.conversation_model import ID_ROLE, ConversationModel, age_text
from app.store import ConversationRow


def test_conversation_model_passes_qtmodeltester(qtmodeltester: Any) -> None:
    model = ConversationModel()
    model.set_rows([ConversationRow("a", "Alpha", 1.0), ConversationRow("b", "Beta", 2.0)])
    qtmodeltester.check(model, force_py=True)
    assert model.row_of("b") == 1 and model.row_of("zzz") == -1


def test_roles_and_age_text() -> None:
    model = ConversationModel()
    model.set_rows([ConversationRow("a", "Alpha", 1000.0)])
    index = model.index(0)
    assert index.data(Qt.ItemDataRole.DisplayRole) == "Alpha"
    assert index.data(ID_ROLE) == "a"
    assert age_text(1000.0, now=1030.0) == "just now"
    assert age_text(1000.0, now=1000.0 + 7200) == "2 h ago"
