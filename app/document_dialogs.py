"""Opens the document dialogs: a cited page (PDF or text) and the over-budget chooser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Signal, Slot
from PySide6.QtWidgets import QDialog, QWidget

from app.budget import BudgetController
from app.citations import Citation
from app.pages import PageController, opens_as_pdf
from app.state import AttachmentList
from app.widgets.budget_dialog import BudgetDialog
from app.widgets.page_view import PdfPageDialog, TextPageDialog


class DocumentDialogs(QObject):
    """Owns the open page view and budget dialog (`page_dialog`, `budget_dialog`).

    `send` is called with the draft once the user has narrowed it to fit; `message`
    carries what the user should read when a page cannot be shown.
    """

    message = Signal(str)

    def __init__(
        self,
        window: QWidget,
        pages: PageController,
        budget: BudgetController,
        attachments: AttachmentList,
        send: Callable[[str], object],
    ) -> None:
        super().__init__(window)
        self.window, self.pages, self.budget = window, pages, budget
        self.attachments, self._send = attachments, send
        self.page_dialog: QDialog | None = None
        self.budget_dialog: BudgetDialog | None = None
        self._draft = ""
        pages.page_ready.connect(self.on_pages_page_ready)
        pages.failed.connect(self.message)
        budget.counted.connect(self.on_budget_counted)
        budget.failed.connect(self.on_budget_failed)

    # ------------------------------------------------------------------ citations
    @Slot(object)
    def open_citation(self, citation: Citation) -> None:
        """PDFs open in QtPdf's viewer; other documents ask the engine for the page text."""
        problem = self.pages.problem(citation)
        if problem:
            self.message.emit(problem)
        elif opens_as_pdf(citation):
            self._show_page(PdfPageDialog(citation, self.window))
        else:
            self.pages.fetch(citation)

    @Slot(object, str, str)
    def on_pages_page_ready(self, citation: Citation, label: str, text: str) -> None:
        self._show_page(TextPageDialog(citation, label, text, self.window))

    def _show_page(self, dialog: QDialog) -> None:
        if self.page_dialog is not None:
            self.page_dialog.close()
            self.page_dialog.deleteLater()
        self.page_dialog = dialog
        dialog.show()

    # ------------------------------------------------------------------ budget
    def intercept_send(self, draft: str) -> bool:
        """When the draft does not fit, open the budget dialog instead of sending."""
        if not self.budget.is_over():
            return False
        self._draft = draft
        dialog = BudgetDialog(
            list(self.attachments.items), self.budget.metrics.context, self.window
        )
        dialog.recount_requested.connect(self.on_budget_dialog_recount_requested)
        dialog.finished.connect(self.on_budget_dialog_finished)
        self.budget_dialog = dialog
        dialog.open()
        return True

    @Slot(object)
    def on_budget_dialog_recount_requested(self, items: list[Any]) -> None:
        self.budget.recount(self._draft, items)

    @Slot(object)
    def on_budget_counted(self, count: Any) -> None:
        if self.budget_dialog is not None:
            self.budget_dialog.set_count(count)

    @Slot(str)
    def on_budget_failed(self, message: str) -> None:
        if self.budget_dialog is not None:
            self.budget_dialog.set_error(message)

    @Slot(int)
    def on_budget_dialog_finished(self, result: int) -> None:
        """Accepted: send the draft with the chosen files and pages (Send is only enabled
        while the engine's latest count of exactly that choice fits)."""
        dialog, self.budget_dialog = self.budget_dialog, None
        if dialog is None:
            return
        dialog.deleteLater()
        if result == QDialog.DialogCode.Accepted.value:
            chosen = dialog.chosen_items()
            self.attachments.take_all()
            for item in chosen:
                self.attachments.add(item)
            self._send(self._draft)
