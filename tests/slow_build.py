"""A `loraforge build` in a subprocess, slowed down so a test can signal it mid-write.

The writer sleeps after each tensor and prints MIDWAY to stderr once the
condition (a Python expression over ``self``, the SafetensorsWriter, and
``count``, the tensors written so far) first holds, so the signal really
lands while a temp file is being written.

The child first puts SIGINT back to Python's usual KeyboardInterrupt handler:
a POSIX shell starts a background job with SIGINT ignored, children inherit
that, and Python installs no handler for an ignored SIGINT, so a SIGINT test
run as `pytest ... &` would otherwise see its signal ignored.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from loraforge.formats import safetensors_writer
original = safetensors_writer.SafetensorsWriter.write
count = 0
said = False
def slow_write(self, name, data):
    global count, said
    original(self, name, data)
    count += 1
    if not said and ({condition}):
        said = True
        print("MIDWAY", file=sys.stderr, flush=True)
    time.sleep({delay})
safetensors_writer.SafetensorsWriter.write = slow_write
from loraforge.cli import app
app(["build", sys.argv[1], "-q"])
"""


def start_slow_build(recipe: Path, condition: str, delay: float, env: dict) -> subprocess.Popen:
    """Start the build; read a line of its stderr to wait for MIDWAY."""
    script = SCRIPT.format(condition=condition, delay=delay)
    return subprocess.Popen(
        [sys.executable, "-c", script, str(recipe)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
