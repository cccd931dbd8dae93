"""Chips under an answer, one per cited page: green check when verified, amber warning if not."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QToolButton, QWidget

from app.citations import Citation, chip_label, chip_tooltip, cites_several_documents

VERIFIED_MARK = "✓"
UNVERIFIED_MARK = "⚠"


class CitationChip(QToolButton):
    """One citation; clicking it asks to open the page with the quote highlighted."""

    def __init__(self, citation: Citation, show_document: bool, parent: QWidget | None) -> None:
        super().__init__(parent)
        self.citation = citation
        mark = VERIFIED_MARK if citation.verified else UNVERIFIED_MARK
        self.setText(f"{mark} {chip_label(citation, show_document)}")
        self.setObjectName("citationVerified" if citation.verified else "citationUnverified")
        self.setToolTip(chip_tooltip(citation))
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.setEnabled(citation.document is not None)
        state = "verified" if citation.verified else "not verified"
        self.setAccessibleName(f"Citation {chip_label(citation, True)}, {state}")


class CitationChips(QWidget):
    """The answer's citations as a row of chips; `open_requested` carries a Citation."""

    open_requested = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(0, 2, 0, 2)
        self._layout.setSpacing(6)
        self.title = QLabel("Sources:", self)
        self.title.setObjectName("citationTitle")
        self._layout.addWidget(self.title)
        self._layout.addStretch(1)
        self.chips: list[CitationChip] = []
        self._shown: list[Citation] = []
        self.hide()

    def set_citations(self, citations: list[Citation]) -> None:
        if citations == self._shown:
            return
        self._shown = list(citations)
        for chip in self.chips:
            self._layout.removeWidget(chip)
            chip.deleteLater()
        several = cites_several_documents(citations)
        self.chips = [CitationChip(c, several, self) for c in _unique(citations)]
        for chip in self.chips:
            chip.clicked.connect(lambda _=False, c=chip.citation: self.open_requested.emit(c))
            self._layout.insertWidget(self._layout.count() - 1, chip)
        self.setVisible(bool(self.chips))


def _unique(citations: list[Citation]) -> list[Citation]:
    """The same page and quote cited twice makes one chip."""
    seen: dict[tuple[object, int, str], Citation] = {}
    for c in citations:
        seen.setdefault((c.document, c.page, c.quote), c)
    return list(seen.values())
