"""A search, from the run config to the journal: assemble (config -> space, optimizer, fitness, executor),
engine (the ask/evaluate/tell loop and its budget), worker and executors (where candidates are merged and
scored: in process, in pools, on Ray), frugal (the scoring plan: which examples each candidate pays for),
footprint (what a worker holds), store (the SQLite journal a run resumes from)."""
