"""`make bench-llm` in parts: settings, the servers, the counters, GuideLLM, the report.
bench/llm/bench_llm.py is the entry."""
