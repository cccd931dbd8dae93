"""python -m engine.bench: the benchmark every speed claim comes from (one JSON object out)."""
