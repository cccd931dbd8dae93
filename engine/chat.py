"""Turns a conversation (system prompt, turns, images, documents, reasoning effort) into token ids
with the checkpoint's own tokenizer and chat template, and decodes tokens back to text.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import api
from engine.errors import CheckpointError, InputError
from engine.images import IMG, PreparedImage, prepare_image

THINK, END_THINK = 34, 35
BOS, EOS = 1, 2


@dataclass
class Prompt:
    ids: list[int]
    images: list[PreparedImage] = field(default_factory=list)
    parts: list[api.TokenCountPart] = field(default_factory=list)


DocumentReader = Callable[[Path], Any]  # path -> engine.documents.Document


class ChatFormatter:
    """The checkpoint's tokenizer + chat template (HF format, read from the model folder only)."""

    def __init__(self, model_dir: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # tokenizer_config.json names TokenizersBackend; AutoTokenizer would prefer
        # mistral-common's backend when tekken.json is present, which has no chat template.
        from transformers import TokenizersBackend

        try:
            if not (model_dir / "tokenizer.json").is_file() and (model_dir / "tekken.json").is_file():
                self.tokenizer = _from_tekken(model_dir / "tekken.json")
            else:
                self.tokenizer = TokenizersBackend.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # any failure here means the tokenizer files are unusable
            raise CheckpointError(
                f"The tokenizer in {model_dir} cannot be loaded ({type(exc).__name__}: {exc}). "
                "Copy tokenizer.json, tokenizer_config.json and chat_template.jinja (or, for the "
                "NVFP4 release, tekken.json) again."
            ) from exc
        if not getattr(self.tokenizer, "chat_template", None):
            raise CheckpointError(
                f"{model_dir} has no chat template (chat_template.jinja). Copy it from the "
                "original model download."
            )
        self.default_system = _default_system_prompt(model_dir)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def build(self, messages: Sequence[api.ChatMessage], system_prompt: str, reasoning_effort: str,
              read_document: DocumentReader | None = None) -> Prompt:
        """Render the conversation; each image's [IMG] placeholder is expanded to its token grid."""
        if reasoning_effort not in api.REASONING_EFFORTS:
            raise InputError(
                f"Reasoning effort {reasoning_effort!r} is not supported; use one of "
                f"{', '.join(api.REASONING_EFFORTS)}."
            )
        if not messages or messages[-1].role != "user":
            raise InputError("The conversation must end with a user message to answer.")
        if not (messages[-1].content.strip() or messages[-1].images or messages[-1].documents):
            raise InputError("The message is empty. Type a question or attach a file.")
        system = system_prompt.strip() or self.default_system
        rendered, images, parts = _render_messages(messages, read_document,
                                                   lambda t: len(self.encode_text(t)))
        if system:
            rendered.insert(0, {"role": "system", "content": system})
            parts.insert(0, api.TokenCountPart("system prompt", len(self.encode_text(system))))
        text = self.tokenizer.apply_chat_template(
            rendered, tokenize=False, reasoning_effort=reasoning_effort
        )
        ids = self.encode_text(text)
        expanded: list[int] = []
        image_iter = iter(images)
        for tok in ids:
            if tok == IMG:
                expanded.extend(next(image_iter).tokens)
            else:
                expanded.append(tok)
        return Prompt(expanded, images, parts)


def _render_messages(messages: Sequence[api.ChatMessage], read_document: DocumentReader | None,
                     count_tokens: Callable[[str], int],
                     ) -> tuple[list[dict], list[PreparedImage], list[api.TokenCountPart]]:
    rendered: list[dict] = []
    images: list[PreparedImage] = []
    parts: list[api.TokenCountPart] = []
    for msg in messages:
        if msg.role == "system":
            continue  # the system prompt is passed separately
        if msg.role == "assistant":
            content: list[dict] = []
            if msg.reasoning:
                content.append({"type": "thinking", "thinking": msg.reasoning})
            content.append({"type": "text", "text": msg.content})
            rendered.append({"role": "assistant", "content": content})
            continue
        content = []
        for path in msg.images:
            img = prepare_image(Path(path))
            images.append(img)
            parts.append(api.TokenCountPart(f"image {Path(path).name}", len(img.tokens)))
            content.append({"type": "image"})
        if msg.documents:
            if read_document is None:
                raise InputError("Documents cannot be read here; attach them in the app.")
            content += _document_blocks(msg, read_document, count_tokens, images, parts)
        if msg.content or not content:
            content.append({"type": "text", "text": msg.content})
        rendered.append({"role": "user", "content": content})
    return rendered, images, parts


def _document_blocks(msg: api.ChatMessage, read_document: DocumentReader,
                     count_tokens: Callable[[str], int], images: list[PreparedImage],
                     parts: list[api.TokenCountPart]) -> list[dict]:
    """Each document's text with page markers (only the chosen pages), then its scanned pages
    (no text layer) as images for the vision encoder, each labelled with its page marker."""
    from engine.documents import render_page_images
    from engine.documents_bridge import parse_pages

    blocks: list[dict] = []
    for i, path in enumerate(msg.documents):
        path = Path(path)
        doc = read_document(path)
        spec = msg.document_pages[i] if i < len(msg.document_pages) else ""
        numbers = parse_pages(spec, len(doc.pages), path.name) if spec else None
        text = doc.as_prompt_text(numbers)
        parts.append(api.TokenCountPart(f"document {path.name}", count_tokens(text)))
        blocks.append({"type": "text", "text": text + "\n\n"})
        scanned = [n for n in doc.scanned_pages if numbers is None or n in numbers]
        for number, page_image in zip(scanned, render_page_images(path, scanned) if scanned else []):
            img = prepare_image(page_image)
            images.append(img)
            parts.append(api.TokenCountPart(f"image {path.name} p. {number}", len(img.tokens)))
            blocks += [{"type": "text", "text": f"[p. {number}] (scanned page of {path.name})"},
                       {"type": "image"}]
    return blocks


def _from_tekken(tekken: Path):
    """The tokenizer of a native folder (the NVFP4 release ships tekken.json only): converted by
    transformers from tekken.json, with the folder's chat_template.jinja if it has one, else the
    v15 reasoning template mistral-common generates for this tokenizer version."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    from engine.tiny_tokenizer import chat_template

    shipped = tekken.parent / "chat_template.jinja"  # the folder's own template wins
    template = shipped.read_text(encoding="utf-8") if shipped.is_file() else chat_template()
    return convert_tekken_tokenizer(str(tekken), chat_template=template)


def _default_system_prompt(model_dir: Path) -> str:
    """The checkpoint's SYSTEM_PROMPT.txt with its placeholders filled in, if present."""
    path = model_dir / "SYSTEM_PROMPT.txt"
    if not path.is_file():
        return ""
    today = dt.date.today()
    text = path.read_text(encoding="utf-8", errors="replace")
    return (text.replace("{name}", "Quire")
            .replace("{today}", today.isoformat())
            .replace("{yesterday}", (today - dt.timedelta(days=1)).isoformat())).strip()
