"""Long fuzz run of the safetensors reader (and adapter parser, `inspect`), with hypothesis.

The normal test suite runs a bounded, derandomized version of the same
property (tests/test_hostile_fuzz.py). This entry point runs it for as long as
you like with fresh randomness, seeding the mutations with real files too:

    python benchmarks/fuzz_reader.py --minutes 10
    python benchmarks/fuzz_reader.py --minutes 60 --seed-file some.safetensors --seed-file lora.safetensors

The oracle (tests/corpus/fuzz.py): only loraforge's FormatError may escape;
Python allocations stay below 512 KiB + 64 × the file size; every file
loraforge accepts is accepted by the reference `safetensors` library with the
same tensor bytes. A failure prints hypothesis' minimal falsifying file; add
it to tests/corpus/safetensors_files.py as a regression case.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from corpus.fuzz import any_file, check_file  # noqa: E402
from corpus.safetensors_files import valid_bytes  # noqa: E402

BATCH = 500


def small_adapter_bytes() -> bytes:
    """A few real SD1 LoRA modules, so mutations hit adapter-shaped headers too."""
    from loraforge.formats.safetensors_writer import save_tensors
    from loraforge.testing.adapters import adapter_tensors
    from loraforge.testing.arch import tiny_architecture

    tensors = adapter_tensors(tiny_architecture("sd1"), "lora", rank=2, seed=1)
    kept = dict(sorted(tensors.items())[:9])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.safetensors"
        save_tensors(path, kept, {"ss_network_module": "networks.lora"})
        return path.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    parser.add_argument("--seed-file", action="append", default=[], type=Path, help="a file to mutate (repeatable; keep them small)")
    args = parser.parse_args()
    seeds = (valid_bytes(), small_adapter_bytes(), *(p.read_bytes() for p in args.seed_file))
    folder = Path(tempfile.mkdtemp(prefix="loraforge-fuzz-"))
    deadline = time.monotonic() + args.minutes * 60
    examples = 0

    # Batches of fresh random examples until the time is up (hypothesis has no wall-clock budget).
    @settings(max_examples=BATCH, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(any_file(seeds))
    def run(content: bytes) -> None:
        nonlocal examples
        examples += 1
        path = folder / "fuzz.safetensors"
        path.write_bytes(content)
        check_file(path)

    while time.monotonic() < deadline:
        run()
    print(f"fuzz_reader: {examples} files in {args.minutes:g} min, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
