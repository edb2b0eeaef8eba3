"""partserve's tests, one folder per package plus e2e/ (see conftest.py for the tiers and shared fixtures).

Helpers the tests import as ``tests.<module>``: :mod:`tests.serve_fixtures` (small plans, the whole-model
reference), :mod:`tests.serve_session` (a local Ray + Serve, applications deployed on it) and
:mod:`tests.models` (test models, importable as ``tests.models:FACTORY`` by Ray workers too).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (where ``python -m partserve`` and ``benchmarks/`` run from)."""
