"""Plain-text pieces shared by everything that describes things to people (render.py, the target kinds)."""

from __future__ import annotations

MAX_SHOWN = 12  # items listed before "... and N more"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_SHOWN])
    return shown + (f" ... and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else "")


def counts(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items()) or "-"


def rank_text(spec: dict) -> str:
    """A rank spec as written in a recipe: 32, or energy: 0.99, max: 128."""
    return str(spec["rank"]) if set(spec) == {"rank"} else counts(spec)
