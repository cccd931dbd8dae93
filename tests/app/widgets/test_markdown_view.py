"""Markdown rendering: Qt's parser, Pygments colours in fenced code, auto height."""

from __future__ import annotations

from typing import Any

from PySide6.QtGui import QTextFormat

from app.widgets.markdown_view import MarkdownView, code_blocks

CODE = (
    "Intro\n\n```python\ndef f(x):\n    return x  # note\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
)


def test_code_blocks() -> None:
    assert code_blocks(CODE) == ["def f(x):\n    return x  # note"]
    assert code_blocks("```\nunfinished") == ["unfinished"]  # while streaming
    assert code_blocks("no code") == []


def test_code_is_coloured_and_tables_render(qtbot: Any) -> None:
    view = MarkdownView()
    qtbot.add_widget(view)
    view.resize(500, 100)
    view.show()
    view.set_markdown(CODE)
    block = view.document().findBlock(view.toPlainText().index("def f"))
    assert block.blockFormat().property(QTextFormat.Property.BlockCodeLanguage) == "python"
    colours = {r.format.foreground().color().name() for r in block.layout().formats()}
    assert len(colours) >= 2  # keyword and name get different Pygments colours
    assert view.document().rootFrame().childFrames()  # the table became a QTextTable frame
    assert view.height() > 100  # grew to fit the content, no inner scrollbar


def test_same_text_does_not_re_render(qtbot: Any) -> None:
    view = MarkdownView()
    qtbot.add_widget(view)
    view.set_markdown("hello")
    with qtbot.assert_not_emitted(view.document().contentsChanged):
        view.set_markdown("hello")


def test_code_block_at_position(qtbot: Any) -> None:
    view = MarkdownView()
    qtbot.add_widget(view)
    view.set_markdown(CODE)
    text = view.toPlainText()
    assert view.code_block_at(text.index("return x")) == "def f(x):\n    return x  # note"
    assert view.code_block_at(text.index("Intro")) == ""
