"""Privacy: loading a model, reading a document and answering open no network connection.

Runs in a subprocess with an audit hook that records every socket connect and DNS lookup
(audit hooks cannot be removed, so they must not leak into the test process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
attempts = []
def hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
        attempts.append(event)
sys.addaudithook(hook)
from pathlib import Path
from engine import api
from engine.runtime import LoadedModel, LoadOptions
from engine.generate import Generator
from engine.documents_bridge import load_document
model = LoadedModel(Path(sys.argv[1]), LoadOptions(dtype="float32", expert_cache_slots=1))
doc = Path(sys.argv[2])
msg = api.ChatMessage("user", "What does it say?", documents=(doc,))
prompt = model.formatter.build([msg], "", "high", load_document)
Generator(model, prompt, api.SamplingParams(temperature=0.0, max_tokens=4), model.decoder.new_cache()).run()
print(json.dumps(attempts))
"""


def test_engine_opens_no_network_connection(tiny_checkpoint, tmp_path):
    doc = tmp_path / "note.txt"
    doc.write_text("Quarterly figures are confidential.")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_checkpoint), str(doc)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_guard_would_see_a_connection():
    code = SCRIPT.split("from pathlib")[0] + (
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "except OSError:\n    pass\nprint(json.dumps(attempts))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "socket.connect" in json.loads(proc.stdout.strip().splitlines()[-1])
