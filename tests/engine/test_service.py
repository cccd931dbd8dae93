"""The engine thread end to end: events in order, cancel mid-answer, errors as Failed events."""

from __future__ import annotations

import queue
import threading

import pytest

from engine import api
from engine.service import EngineService

TIMEOUT = 60


class Collector:
    def __init__(self) -> None:
        self.events: queue.Queue[api.Event] = queue.Queue()
        self.thread_names: set[str] = set()

    def __call__(self, event: api.Event) -> None:
        self.thread_names.add(threading.current_thread().name)
        self.events.put(event)

    def until_finished(self, request_id: str, on_event=None) -> list[api.Event]:
        out = []
        while True:
            event = self.events.get(timeout=TIMEOUT)
            if event.request_id != request_id:
                continue
            out.append(event)
            if on_event:
                on_event(event)
            if isinstance(event, api.Finished):
                return out


@pytest.fixture
def service():
    sink = Collector()
    svc = EngineService(sink)
    svc.start()
    yield svc, sink
    svc.close()


def _load(svc, sink, folder, **kw) -> list[api.Event]:
    svc.submit(api.LoadModel("load", folder, device="cpu", **kw))
    return sink.until_finished("load")


def test_load_then_answer_streams_deltas_and_stats(service, tiny_checkpoint):
    svc, sink = service
    events = _load(svc, sink, tiny_checkpoint)
    assert isinstance(events[-1], api.Finished) and events[-1].reason == "stop"
    loaded = [e for e in events if isinstance(e, api.ModelLoaded)]
    assert loaded and loaded[0].supports_images and loaded[0].reasoning_efforts == ("none", "high")
    progress = [e for e in events if isinstance(e, api.LoadProgress)]
    assert progress and progress[-1].done_bytes == progress[-1].total_bytes
    svc.submit(api.Ask("q1", (api.ChatMessage("user", "Hello?"),),
                       sampling=api.SamplingParams(temperature=0.0, max_tokens=6)))
    events = sink.until_finished("q1")
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "StateChanged" and "AnswerDelta" in kinds and kinds[-1] == "Finished"
    stats = next(e for e in events if isinstance(e, api.Stats))
    assert stats.output_tokens == 6 and stats.prompt_tokens > 10
    assert sink.thread_names == {"quire-engine"}


def test_cancel_mid_answer_stops_within_one_delta(service, tiny_checkpoint):
    svc, sink = service
    _load(svc, sink, tiny_checkpoint)
    svc.submit(api.Ask("q", (api.ChatMessage("user", "Tell me everything."),),
                       sampling=api.SamplingParams(temperature=0.0, max_tokens=500)))
    deltas_after_cancel = []

    def on_event(e):
        if isinstance(e, api.AnswerDelta):
            if svc.is_cancelled("q"):
                deltas_after_cancel.append(e)
            else:
                svc.submit(api.Cancel("c", "q"))

    events = sink.until_finished("q", on_event)
    assert events[-1].reason == "cancelled"
    assert len(deltas_after_cancel) <= 1


def test_ask_before_load_is_a_clear_error(service):
    svc, sink = service
    svc.submit(api.Ask("q", (api.ChatMessage("user", "hi"),)))
    events = sink.until_finished("q")
    failed = next(e for e in events if isinstance(e, api.Failed))
    assert failed.kind == "NoModelError" and "Load a model" in failed.user_message
    assert events[-1].reason == "error"


def test_bad_folder_load_fails_with_the_checkpoint_message(service, tmp_path):
    svc, sink = service
    events = _load(svc, sink, tmp_path)
    failed = next(e for e in events if isinstance(e, api.Failed))
    assert failed.kind == "CheckpointError" and "no config.json" in failed.user_message


def test_demo_is_written_on_first_use(service, tmp_path, tokenizer_dir):
    svc, sink = service
    events = _load(svc, sink, tmp_path / "demo", create_demo=True)
    assert any(isinstance(e, api.LoadProgress) and e.stage == "writing demo checkpoint" for e in events)
    loaded = next(e for e in events if isinstance(e, api.ModelLoaded))
    assert loaded.is_demo and (tmp_path / "demo" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-")]


def test_count_tokens_reports_parts_and_fit(service, tiny_checkpoint):
    svc, sink = service
    _load(svc, sink, tiny_checkpoint, context_length=64)
    svc.submit(api.CountTokens("n", (api.ChatMessage("user", "word " * 100),), "Be brief.", "none", 16))
    count = next(e for e in sink.until_finished("n") if isinstance(e, api.TokenCount))
    labels = [p.label for p in count.parts]
    assert labels[0] == "system prompt" and "answer reserve" in labels
    assert count.total > 64 and not count.fits


def test_bug_in_a_handler_keeps_the_thread_alive(service, tiny_checkpoint):
    svc, sink = service
    svc.submit(api.ReadDocument("r", tiny_checkpoint / "missing.pdf"))
    failed = next(e for e in sink.until_finished("r") if isinstance(e, api.Failed))
    assert "does not exist" in failed.user_message
    svc.submit(api.QueryResources("m"))
    usage = next(e for e in sink.until_finished("m") if isinstance(e, api.ResourceUsage))
    assert usage.host_total_bytes > 0


def test_plan_is_shown_before_loading(service, tiny_checkpoint):
    svc, sink = service
    svc.submit(api.PlanModel("p", tiny_checkpoint, device="cpu", context_length=4096))
    plan = next(e for e in sink.until_finished("p") if isinstance(e, api.PlanReady))
    assert plan.fits and plan.summary.startswith("fits:")
    assert any("KV cache (4,096 tokens)" in part.what for part in plan.parts)
    assert any(part.what.startswith("routed experts") for part in plan.parts)


def test_answer_about_a_document_ends_with_a_citation_check(service, tiny_checkpoint, tmp_path):
    svc, sink = service
    _load(svc, sink, tiny_checkpoint)
    doc = tmp_path / "notes.md"
    doc.write_text("# Plan\n\nThe launch is on 4 May.\n")
    svc.submit(api.Ask("q", (api.ChatMessage("user", "When is the launch?", documents=(doc,)),),
                       sampling=api.SamplingParams(temperature=0.0, max_tokens=4)))
    events = sink.until_finished("q")
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("CitationsChecked") < kinds.index("Finished")
    svc.submit(api.ReadPage("p", doc, 1))
    page = next(e for e in sink.until_finished("p") if isinstance(e, api.PageText))
    assert "4 May" in page.text


def test_out_of_memory_is_a_clear_error_with_a_smaller_setting(service, tiny_checkpoint, monkeypatch):
    import engine.runtime

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.runtime.LoadedModel, "__init__", boom)
    svc, sink = service
    events = _load(svc, sink, tiny_checkpoint)
    failed = next(e for e in events if isinstance(e, api.Failed))
    assert failed.kind == "OutOfMemoryError" and "ran out of memory" in failed.user_message
    assert "context length" in failed.user_message and events[-1].reason == "error"


def test_an_nvfp4_release_folder_plans_loads_and_answers(service, tokenizer_dir, tmp_path):
    """Mistral's NVFP4 release through the engine thread: whatever precision the app asks for,
    the experts stay NVFP4 as shipped, and the summary says so."""
    from engine.tiny_native import write_tiny_nvfp4_checkpoint

    folder = write_tiny_nvfp4_checkpoint(tmp_path / "nvfp4", tokenizer_from=tokenizer_dir)
    svc, sink = service
    svc.submit(api.PlanModel("p", folder, device="cpu", context_length=4096, host_format="int4"))
    plan = next(e for e in sink.until_finished("p") if isinstance(e, api.PlanReady))
    assert plan.fits and plan.alternative == ""  # one precision: as shipped
    events = _load(svc, sink, folder, expert_cache_slots=2, host_format="int4")
    loaded = next(e for e in events if isinstance(e, api.ModelLoaded))
    assert "NVFP4" in loaded.device_summary and loaded.supports_images
    assert any(e.stage == "reading NVFP4 experts" for e in events if isinstance(e, api.LoadProgress))
    svc.submit(api.Ask("q", (api.ChatMessage("user", "Hello?"),),
                       sampling=api.SamplingParams(temperature=0.0, max_tokens=4)))
    stats = next(e for e in sink.until_finished("q") if isinstance(e, api.Stats))
    assert stats.output_tokens == 4
