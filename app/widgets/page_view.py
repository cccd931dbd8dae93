"""A cited page, opened from a citation chip: the PDF itself (QtPdf) or the page's text,
with the quote highlighted."""

from __future__ import annotations

import html

from PySide6.QtCore import QPointF, Slot
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
from PySide6.QtPdf import QPdfDocument, QPdfSearchModel
from PySide6.QtPdfWidgets import QPdfView
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QTextBrowser,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from app.citations import Citation, status_text

HIGHLIGHT = QColor("#ffe066")
NUM_FALLBACK_WORDS = 6  # when the whole quote is not found (e.g. a fuzzy match), try its start


def _frame(dialog: QDialog, citation: Citation, body: QWidget, where: str = "") -> QLabel:
    """Title, the check's verdict and quote above `body`, a Close button below."""
    name = citation.document.name if citation.document is not None else "document"
    where = where or f"page {citation.page}"
    dialog.setWindowTitle(f"{name}, {where}")
    mark = "✓" if citation.verified else "⚠"
    quote = f"<br><i>“{html.escape(citation.quote)}”</i>" if citation.quote else ""
    summary = QLabel(
        f"<b>{html.escape(name)}, {html.escape(where)}</b><br>{mark} "
        f"{status_text(citation.status)}{quote}",
        dialog,
        wordWrap=True,
    )
    summary.setObjectName("citationVerdict")
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, dialog)
    buttons.rejected.connect(dialog.reject)
    layout = QVBoxLayout(dialog)
    layout.addWidget(summary)
    layout.addWidget(body, 1)
    layout.addWidget(buttons)
    dialog.resize(760, 860)
    return summary


class PdfPageDialog(QDialog):
    """The PDF at the cited page; the quote is the view's current search result."""

    def __init__(self, citation: Citation, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.citation = citation
        self.document = QPdfDocument(self)
        self.view = QPdfView(self)
        self.view.setPageMode(QPdfView.PageMode.MultiPage)
        self.view.setZoomMode(QPdfView.ZoomMode.FitToWidth)
        self.view.setDocument(self.document)
        self.view.setAccessibleName(f"Page {citation.page}")
        self.search = QPdfSearchModel(self)
        self.search.setDocument(self.document)
        self.view.setSearchModel(self.search)
        self.search.countChanged.connect(self.on_search_count_changed)
        self.search.statusChanged.connect(self.on_search_status_changed)
        self.summary = _frame(self, citation, self.view)
        if citation.document is not None:
            self.document.load(str(citation.document))
        self._terms = _search_terms(citation.quote)
        self._search_next()
        self.view.pageNavigator().jump(max(0, citation.page - 1), QPointF(), 0)

    @property
    def page_index(self) -> int:
        return self.view.pageNavigator().currentPage()

    def highlighted_result(self) -> str:
        """The text of the highlighted search result ("" when nothing is highlighted)."""
        index = self.view.currentSearchResultIndex()
        if index < 0:
            return ""
        return self.search.searchString()

    def _search_next(self) -> None:
        if self._terms:
            self.search.setSearchString(self._terms.pop(0))

    @Slot()
    def on_search_count_changed(self) -> None:
        page = self.citation.page - 1
        for index in range(self.search.count()):
            link = self.search.resultAtIndex(index)
            if link.page() == page:
                self.view.setCurrentSearchResultIndex(index)
                self.view.pageNavigator().jump(link)
                return

    @Slot()
    def on_search_status_changed(self) -> None:
        done = self.search.status() == QPdfSearchModel.Status.Finished
        if done and self.view.currentSearchResultIndex() < 0:
            self._search_next()


def _search_terms(quote: str) -> list[str]:
    """The whole quote, then its first words (a fuzzy match rarely has them all)."""
    quote = " ".join(quote.split()).strip(" .…\"'“”")
    if not quote:
        return []
    words = quote.split()
    terms = [quote]
    if len(words) > NUM_FALLBACK_WORDS:
        terms.append(" ".join(words[:NUM_FALLBACK_WORDS]))
    return terms


class TextPageDialog(QDialog):
    """A page's text (from the engine's ReadPage), the quote's span highlighted."""

    def __init__(
        self, citation: Citation, label: str, text: str, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.citation = citation
        self.text_view = QTextBrowser(self)
        self.text_view.setPlainText(text)
        self.text_view.setAccessibleName(f"Text of {label}")
        self.summary = _frame(self, citation, self.text_view, label)
        self._highlight(len(text))

    def _highlight(self, length: int) -> None:
        c = self.citation
        if not c.has_span or c.span_end > length:
            return
        cursor = QTextCursor(self.text_view.document())
        cursor.setPosition(c.span_start)
        cursor.setPosition(c.span_end, QTextCursor.MoveMode.KeepAnchor)
        selection = QTextEdit.ExtraSelection()
        selection.cursor = cursor  # type: ignore[attr-defined]
        fmt = QTextCharFormat()
        fmt.setBackground(HIGHLIGHT)
        fmt.setForeground(QColor("black"))
        selection.format = fmt  # type: ignore[attr-defined]
        self.text_view.setExtraSelections([selection])
        view_cursor = QTextCursor(self.text_view.document())
        view_cursor.setPosition(c.span_start)
        self.text_view.setTextCursor(view_cursor)
        self.text_view.ensureCursorVisible()

    def highlighted_text(self) -> str:
        selections = self.text_view.extraSelections()
        return selections[0].cursor.selectedText() if selections else ""
