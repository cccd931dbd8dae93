"""The engine's boundary: request and event dataclasses (stdlib only, no torch).

app/ talks to the engine exclusively through these types and `engine.service`.
Every request carries a `request_id`; every event that answers it carries the same id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REASONING_EFFORTS = ("none", "high")
FINISH_REASONS = ("stop", "length", "cancelled", "error")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy (argmax)."""

    temperature: float = 0.1
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatMessage:
    """One turn. `images` and `documents` are files attached to a user turn."""

    role: str  # "system" | "user" | "assistant"
    content: str
    images: tuple[Path, ...] = ()
    documents: tuple[Path, ...] = ()
    reasoning: str = ""  # an assistant turn's reasoning, re-rendered as [THINK]...[/THINK]
    # Parallel to `documents`: which pages to include, e.g. "1-20,25"; "" (or absent) = all.
    document_pages: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanPart:
    """One line of a placement plan: what goes where and how many bytes it takes."""

    device: str  # "cuda:0", "cpu", "disk"
    what: str  # "dense layers 0-17", "expert cache (712 slots)", "KV cache (262144 tokens)"
    num_bytes: int


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class PlanModel:
    """Validate a model folder and compute its placement plan without loading it."""

    request_id: str
    model_dir: Path
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    gpu_budget_bytes: int | None = None  # per GPU; None = free memory minus a margin
    context_length: int = 32768
    # Offloaded experts in RAM: "auto" (8-bit: int8, or FP8 as shipped) or "int4" (opt-in 4-bit:
    # 0.56x the bytes, so more experts cached on the GPU and faster misses; lossy).
    host_format: str = "auto"


@dataclass(frozen=True)
class LoadModel:
    """Load a model folder. With `create_demo=True` a tiny demo checkpoint is written
    to `model_dir` first when that folder holds none."""

    request_id: str
    model_dir: Path
    device: str = "auto"
    gpu_budget_bytes: int | None = None
    context_length: int = 32768
    expert_cache_slots: int | None = None  # per layer; None = as the plan decides
    host_format: str = "auto"  # as PlanModel.host_format
    create_demo: bool = False
    snapshot_dir: Path | None = None  # where document prefixes are saved between runs


@dataclass(frozen=True)
class UnloadModel:
    request_id: str


@dataclass(frozen=True)
class Ask:
    """Generate the assistant's next turn for a conversation."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    system_prompt: str = ""
    reasoning_effort: str = "none"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    session: str = ""  # conversation id: keys the cached document prefix


@dataclass(frozen=True)
class CountTokens:
    """Count what an `Ask` with these inputs would put into the context (no generation)."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    system_prompt: str = ""
    reasoning_effort: str = "none"
    max_tokens: int = 1024


@dataclass(frozen=True)
class ReadDocument:
    """Extract a dropped file's pages (documents) or check an image, for its chip."""

    request_id: str
    path: Path


@dataclass(frozen=True)
class ReadPage:
    """The text of one page of a document (for a citation's page view)."""

    request_id: str
    path: Path
    page: int


@dataclass(frozen=True)
class Cancel:
    """Stop the request `target_id` (a load or an answer) within one step."""

    request_id: str
    target_id: str


@dataclass(frozen=True)
class QueryResources:
    """Ask for current GPU and host memory use."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    request_id: str = "shutdown"


Request = (
    PlanModel
    | LoadModel
    | UnloadModel
    | Ask
    | CountTokens
    | ReadDocument
    | ReadPage
    | Cancel
    | QueryResources
    | Shutdown
)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StateChanged:
    """The engine's state: "idle", "loading", "prefill", "generating", "unloaded"."""

    request_id: str
    state: str


@dataclass(frozen=True)
class PlanReady:
    request_id: str
    model_dir: Path
    fits: bool
    summary: str  # one or two sentences a user reads before loading
    parts: tuple[PlanPart, ...] = ()
    host_bytes: int = 0
    gpu_bytes: int = 0
    # What the other expert precision would give, to help choose: "With 4-bit experts: ..."
    alternative: str = ""


@dataclass(frozen=True)
class LoadProgress:
    request_id: str
    done_bytes: int
    total_bytes: int
    stage: str  # "reading weights", "writing demo checkpoint", ...
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class ModelLoaded:
    request_id: str
    model_dir: Path
    model_name: str
    context_length: int
    device_summary: str
    is_demo: bool
    supports_images: bool
    reasoning_efforts: tuple[str, ...]


@dataclass(frozen=True)
class PrefillProgress:
    request_id: str
    processed: int
    total: int


@dataclass(frozen=True)
class AnswerDelta:
    request_id: str
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    request_id: str
    text: str


@dataclass(frozen=True)
class Stats:
    request_id: str
    prompt_tokens: int
    cached_prompt_tokens: int
    output_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    expert_hits: int = 0
    expert_misses: int = 0
    expert_hit_rate: float = 0.0
    bytes_copied: int = 0


@dataclass(frozen=True)
class TokenCountPart:
    label: str  # "system prompt", "report.pdf", "image photo.png", "history", "answer reserve"
    num_tokens: int


@dataclass(frozen=True)
class TokenCount:
    request_id: str
    total: int
    context_length: int
    parts: tuple[TokenCountPart, ...]
    fits: bool


@dataclass(frozen=True)
class DocumentRead:
    request_id: str
    path: Path
    kind: str  # "pdf", "docx", "text", "image", ...
    num_pages: int
    num_tokens: int  # 0 when no model is loaded to count with
    num_bytes: int
    note: str = ""  # e.g. "scanned PDF: pages are read as images"


@dataclass(frozen=True)
class CitationCheck:
    """One [p. N: "quote"] in an answer, checked against that page's text."""

    text: str  # the citation as written in the answer
    document: Path | None  # the attached file it points to (None: no such page attached)
    page: int
    quote: str
    verified: bool
    status: str  # "exact", "fuzzy", "not_found", "no_quote", "no_page"
    span_start: int = -1  # the quote's [start, end) in the page text, for highlighting
    span_end: int = -1


@dataclass(frozen=True)
class CitationsChecked:
    """Sent after an answer about attached documents, before Finished."""

    request_id: str
    citations: tuple[CitationCheck, ...]


@dataclass(frozen=True)
class PageText:
    request_id: str
    path: Path
    page: int
    label: str  # "p. 3", "Sheet1", "section 2"
    text: str


@dataclass(frozen=True)
class ResourceUsage:
    request_id: str
    gpu_used_bytes: tuple[int, ...]
    gpu_total_bytes: tuple[int, ...]
    host_used_bytes: int
    host_total_bytes: int


@dataclass(frozen=True)
class Failed:
    """An expected failure (`kind` is the QuireError class name) or a bug ("InternalError")."""

    request_id: str
    kind: str
    user_message: str
    details: str = ""  # traceback for bugs; empty for expected errors


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: str  # one of FINISH_REASONS


Event = (
    StateChanged
    | PlanReady
    | LoadProgress
    | ModelLoaded
    | PrefillProgress
    | AnswerDelta
    | ReasoningDelta
    | Stats
    | TokenCount
    | DocumentRead
    | CitationsChecked
    | PageText
    | ResourceUsage
    | Failed
    | Finished
)
