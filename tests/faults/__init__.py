"""The fault harness for live tests (RELIABILITY.md §4): a TCP fault proxy between a test client
and gunicorn. See proxy.py; the scenarios are in tests/test_faults.py."""
from .proxy import FaultProxy

__all__ = ["FaultProxy"]
