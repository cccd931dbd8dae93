"""Markdown in a QTextBrowser: Qt's own parser, Pygments colours for fenced code."""

from __future__ import annotations

import re
from functools import lru_cache

from pygments.lexer import Lexer
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.styles import get_style_by_name
from pygments.util import ClassNotFound
from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import (
    QColor,
    QContextMenuEvent,
    QFont,
    QFontDatabase,
    QGuiApplication,
    QPalette,
    QResizeEvent,
    QSyntaxHighlighter,
    QTextBlock,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextFormat,
)
from PySide6.QtWidgets import QApplication, QSizePolicy, QTextBrowser, QWidget

_FENCE = re.compile(r"^```[^\n]*\n(.*?)(?:^```|\Z)", re.MULTILINE | re.DOTALL)
_MARKDOWN = (
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub
    | QTextDocument.MarkdownFeature.MarkdownNoHTML
)


def code_blocks(markdown: str) -> list[str]:
    """The contents of each fenced code block in `markdown`."""
    return [match.group(1).rstrip("\n") for match in _FENCE.finditer(markdown)]


def is_dark() -> bool:
    return QApplication.palette().color(QPalette.ColorRole.Base).lightness() < 128


@lru_cache(maxsize=32)
def _lexer(language: str) -> Lexer:
    try:
        return get_lexer_by_name(language or "text", stripnl=False, ensurenl=False)
    except ClassNotFound:
        return TextLexer(stripnl=False, ensurenl=False)


@lru_cache(maxsize=4)
def _style_formats(style_name: str) -> dict[object, QTextCharFormat]:
    formats: dict[object, QTextCharFormat] = {}
    for token, style in get_style_by_name(style_name):
        fmt = QTextCharFormat()
        if style["color"]:
            fmt.setForeground(QColor("#" + style["color"]))
        if style["bold"]:
            fmt.setFontWeight(QFont.Weight.Bold)
        if style["italic"]:
            fmt.setFontItalic(True)
        formats[token] = fmt
    return formats


def _is_code(block: QTextBlock) -> bool:
    fmt = block.blockFormat()
    return block.isValid() and (
        fmt.nonBreakableLines() or fmt.hasProperty(QTextFormat.Property.BlockCodeFence)
    )


class CodeHighlighter(QSyntaxHighlighter):
    """Colours the blocks that Qt's markdown parser marked as fenced code."""

    def highlightBlock(self, text: str) -> None:  # noqa: N802 (Qt override)
        language = (
            self.currentBlock().blockFormat().property(QTextFormat.Property.BlockCodeLanguage)
        )
        if language is None and not self.currentBlock().blockFormat().nonBreakableLines():
            return
        formats = _style_formats("monokai" if is_dark() else "default")
        position = 0
        for token, value in _lexer(str(language or "")).get_tokens(text):
            while token not in formats and token.parent is not None:
                token = token.parent
            fmt = formats.get(token)
            if fmt is not None and fmt.isValid():
                self.setFormat(position, len(value), fmt)
            position += len(value)


class MarkdownView(QTextBrowser):
    """A read-only, auto-height browser showing one message's markdown."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setOpenExternalLinks(False)
        self.setOpenLinks(False)
        self.setFrameShape(QTextBrowser.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.viewport().setAutoFillBackground(False)
        self.setStyleSheet("QTextBrowser { background: transparent; }")
        self._highlighter = CodeHighlighter(self.document())
        self.markdown = ""
        self.document().contentsChanged.connect(self._fit_height)

    def set_markdown(self, text: str) -> None:
        if text == self.markdown:
            return
        self.markdown = text
        self.document().setMarkdown(text, _MARKDOWN)
        self._style_code_blocks()
        self._fit_height()

    def _style_code_blocks(self) -> None:
        """Give fenced code a monospace font and a tinted background."""
        mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        background = QColor("#272822" if is_dark() else "#f3f3f3")
        block = self.document().begin()
        while block.isValid():
            if _is_code(block):
                cursor = QTextCursor(block)
                block_format = QTextBlockFormat()
                block_format.setBackground(background)
                cursor.mergeBlockFormat(block_format)
                char_format = QTextCharFormat()
                char_format.setFontFamilies([mono.family()])
                cursor.select(QTextCursor.SelectionType.BlockUnderCursor)
                cursor.mergeCharFormat(char_format)
            block = block.next()

    def code_block_at(self, position: int) -> str:
        """The whole fenced code block around document `position`, or ""."""
        block = self.document().findBlock(position)
        if not _is_code(block):
            return ""
        while _is_code(block.previous()):
            block = block.previous()
        lines = []
        while _is_code(block):
            lines.append(block.text())
            block = block.next()
        return "\n".join(lines)

    def contextMenuEvent(self, event: QContextMenuEvent) -> None:  # noqa: N802 (Qt override)
        menu = self.createStandardContextMenu(event.pos())
        code = self.code_block_at(self.cursorForPosition(event.pos()).position())
        if code:
            action = menu.addAction("Copy code block")
            action.triggered.connect(lambda: QGuiApplication.clipboard().setText(code))
        menu.exec(event.globalPos())

    def _fit_height(self) -> None:
        self.document().setTextWidth(self.viewport().width())
        height = int(self.document().size().height()) + self.frameWidth() * 2 + 2
        if height != self.height():
            self.setFixedHeight(height)

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 (Qt override)
        super().resizeEvent(event)
        if event.size().width() != event.oldSize().width():
            self._fit_height()

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt override)
        return QSize(400, self.height())
