"""Answers one Ask on the engine thread: prompt (with documents and their citation rules),
cached prefix, streamed deltas, stats, and the check of every page the answer cites."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine import api
from engine.documents_bridge import load_document

Emit = Callable[[api.Event], None]


def system_prompt_for(req: api.Ask | api.CountTokens, default: str) -> str:
    """The user's system prompt (or the checkpoint's), plus the citation rules when documents
    are attached, so answers cite [p. N: "quote"] that Quire can verify."""
    from engine.citations import DEFAULT_CITATION_PROMPT

    system = req.system_prompt.strip() or default
    if any(m.documents for m in req.messages):
        system = f"{system}\n\n{DEFAULT_CITATION_PROMPT}".strip()
    return system


def answer(model, req: api.Ask, emit: Emit, is_cancelled: Callable[[], bool]) -> None:
    from engine.generate import Generator

    rid = req.request_id
    emit(api.StateChanged(rid, "prefill"))
    system = system_prompt_for(req, model.formatter.default_system)
    prompt = model.formatter.build(req.messages, system, req.reasoning_effort, load_document)
    cache = model.cache_for(req.session, prompt)
    gen = Generator(model, prompt, req.sampling, cache, is_cancelled=is_cancelled,
                    on_prefill=lambda done, total: emit(api.PrefillProgress(rid, done, total)),
                    prefill_chunk=model.prefill_chunk)
    started = False
    for delta in gen.stream():
        if not started:
            emit(api.StateChanged(rid, "generating"))
            started = True
        event = api.ReasoningDelta if delta.kind == "reasoning" else api.AnswerDelta
        emit(event(rid, delta.text))
    result = gen.result
    model.keep_cache(req.session, prompt, result.output_ids, cache)
    counters = model.experts.counters()
    emit(result.stats.to_event(rid, counters))
    documents = [Path(p) for m in req.messages for p in m.documents]
    if documents and result.text:
        emit(api.CitationsChecked(rid, check_citations(result.text, documents)))
    emit(api.StateChanged(rid, "idle"))
    emit(api.Finished(rid, result.finish_reason))


def check_citations(text: str, paths: list[Path]) -> tuple[api.CitationCheck, ...]:
    from engine.citations import find_citations, verify_citations

    docs = [load_document(p) for p in dict.fromkeys(paths)]
    by_name = {d.name: p for d, p in zip(docs, dict.fromkeys(paths))}
    checks = []
    for v in verify_citations(find_citations(text), docs):
        c = v.citation
        span = v.span or (-1, -1)
        checks.append(api.CitationCheck(
            text=text[c.start : c.end], document=by_name.get(v.document) if v.document else None,
            page=v.page or c.page, quote=c.quote or "", verified=v.verified, status=v.status,
            span_start=span[0], span_end=span[1]))
    return tuple(checks)


def page_text(req: api.ReadPage) -> api.PageText:
    from engine.errors import InputError

    doc = load_document(Path(req.path))
    for page in doc.pages:
        if page.number == req.page:
            return api.PageText(req.request_id, Path(req.path), page.number, page.label, page.text)
    raise InputError(f"{Path(req.path).name} has no page {req.page} (it has {len(doc.pages)}).")
