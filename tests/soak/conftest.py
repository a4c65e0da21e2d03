"""The soak and fail-over tests reuse tests/integration/conftest.py: its fixtures
(envoy_bin, session_dir, mock_factory), its process handling (every child killed by pid,
log tails on failure) and its Envoy helpers. It is loaded under the module name
`bbr_integration`, so tests here import from there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
_spec = importlib.util.spec_from_file_location("bbr_integration", _PATH)
assert _spec is not None and _spec.loader is not None
bbr_integration = importlib.util.module_from_spec(_spec)
sys.modules["bbr_integration"] = bbr_integration
_spec.loader.exec_module(bbr_integration)

# Fixtures and hooks, re-exported so pytest registers them for this folder.
envoy_bin = bbr_integration.envoy_bin
session_dir = bbr_integration.session_dir
mock_factory = bbr_integration.mock_factory
pytest_runtest_makereport = bbr_integration.pytest_runtest_makereport
pytest_sessionfinish = bbr_integration.pytest_sessionfinish
