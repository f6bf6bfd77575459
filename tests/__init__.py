"""recpipe's test suite, a package: helpers import as ``tests.<folder>.<module>``, and helper scripts run as
``python -m tests.<folder>.<module>`` with the repository root (``ROOT``) as the working directory."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
