"""`make bench` in parts: settings, bodies, processes, the ext_proc peer, the gateway's
configuration, running and sampling, analysis, and the report. bench/run.py is the entry."""
