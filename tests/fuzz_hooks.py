"""Schemathesis hooks for the API fuzz run (loaded with ``SCHEMATHESIS_HOOKS=tests.fuzz_hooks``):
trace and state bundles (``application/zip``) are sent as raw bytes."""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias("application/zip", "application/octet-stream")
