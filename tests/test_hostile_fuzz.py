"""Property test of the safetensors reader: random, structured and mutated files (bounded time).

See tests/corpus/fuzz.py for the oracle and benchmarks/fuzz_reader.py for long runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from corpus.fuzz import any_file, check_file, structured_file

_FOLDER = Path(tempfile.mkdtemp(prefix="loraforge-fuzz-"))
# derandomize: the same examples every run (no flaky CI); database=None: nothing written into the checkout.
_BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def _check(content: bytes) -> None:
    path = _FOLDER / "fuzz.safetensors"
    path.write_bytes(content)
    check_file(path)


@_BOUNDED
@given(any_file())
def test_reader_only_ever_raises_format_error(content):
    _check(content)


@settings(_BOUNDED, max_examples=100)
@given(structured_file())
def test_structured_headers_only_ever_raise_format_error(content):
    _check(content)
