"""Description lines several kinds share (`plan`'s tree, `build`'s summary)."""

from __future__ import annotations

from loraforge.formats.arch.loaders import skips_text
from loraforge.text import human_bytes, listing


def lora_entry_lines(loras: list[dict]) -> list:
    """One line per `loras:` entry of a bake or merge report, with block weights and unmatched keys nested."""
    lines = []
    for lora in loras:
        te = f", te {lora['te']:g}" if lora["te"] != lora["strength"] else ""
        nested = []
        weights = lora["block_weights"]
        if any(w != 1.0 for w in weights.values()):
            nested.append("block weights: " + ", ".join(f"{b}={w:g}" for b, w in weights.items()))
        if lora["unmatched"]:
            nested.append(f"[yellow]unmatched (allowed): {listing(lora['unmatched'])}[/]")
        if lora["not_in_base"]:
            nested.append(f"{len(lora['not_in_base'])} text-encoder module(s) skipped at te 0: the base holds no text encoder")
        lines.append((
            f"[bold]{lora['use']}[/] {lora['adapter_kind']}: strength {lora['strength']:g}{te}; "
            f"{lora['matched']}/{lora['modules']} modules matched, {lora['applied']} applied",
            nested,
        ))
    return lines


def summarised_result_lines(result) -> list[str]:
    """`build`'s lines for a result that summarises itself (``summary_lines()``): size first, sha256 last."""
    summary = result.summary_lines()
    return [f"{human_bytes(result.written.size)}; {summary[0]}", *summary[1:], f"sha256 {result.written.sha256}"]


def output_line(report: dict) -> str:
    return f"output: {report['output']}  save dtype: {report['save_dtype']}  device: {report['device']}"


def loader_lines(report) -> list[str]:
    """What ``modules: kohya`` left out, and which modules common loaders are known to skip (plan output)."""
    lines = []
    if report["left_out_for_loaders"]:
        left = report["left_out_for_loaders"]
        lines.append(f"modules: kohya left out {len(left)} module(s) some loaders skip: {listing(left)}")
    text = skips_text(report["loader_skips"])
    colour = "yellow" if report["loader_skips"] and any(report["loader_skips"].values()) else "dim"
    lines.append(f"[{colour}]loaders: {text}[/]")
    return lines
