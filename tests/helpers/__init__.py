"""Test-only helpers shared by several test modules (the tests put ``tests/`` on ``sys.path``)."""
