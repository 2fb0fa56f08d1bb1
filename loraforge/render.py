"""Rich rendering of reports for people (the JSON forms are for scripts)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.tree import Tree

from loraforge.formats.arch.loaders import skips_text
from loraforge.text import counts as _counts
from loraforge.text import human_bytes
from loraforge.text import listing as _listing

# --- inspect -------------------------------------------------------------------


def render_inspect(console: Console, report: dict) -> None:
    table = Table(title=report["file"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kind", _kind_line(report))
    table.add_row("size", f"{human_bytes(report['size'])} in {report['tensors']} tensors ({_counts(report['dtypes'])})")
    if report["kind"] == "checkpoint":
        _checkpoint_rows(table, report)
    elif report["kind"] == "adapter":
        _adapter_rows(table, report)
    if "note" in report:
        table.add_row("note", report["note"])
    hashes = report["hashes"]
    table.add_row("sha256", f"{hashes['sha256']}  (AutoV2 {hashes['autov2']})")
    table.add_row("data sha256", f"{hashes['data_sha256']}  (A1111/kohya {hashes['a1111_lora_hash']})")
    console.print(table)
    if report["metadata"]:
        meta = Table(title="metadata", title_justify="left")
        meta.add_column("key", style="bold")
        meta.add_column("value", overflow="fold")
        for key, value in report["metadata"].items():
            meta.add_row(key, value if len(value) <= 400 else value[:400] + f"... ({len(value)} chars)")
        console.print(meta)


def _kind_line(report: dict) -> str:
    if report["kind"] == "checkpoint":
        variants = [v for v, on in (("inpaint", report["inpaint"]), ("v-prediction", report["v_prediction"])) if on]
        variants += [f"{report['float8']['kind']} fp8"] if report.get("float8") else []
        suffix = f" [{', '.join(variants)}]" if variants else ""
        return f"checkpoint, {report['architecture_title']} ({report['size_text']}){suffix}"
    if report["kind"] == "adapter":
        arch = report.get("architecture_title")
        where = f" for {arch} ({report['size_text']})" if arch else ""
        where += f", {report['dialect']} naming" if report.get("dialect") else ""
        return f"{report['adapter_kind']} adapter{where}"
    return "unrecognised"


def _checkpoint_rows(table: Table, report: dict) -> None:
    for component, entry in report["components"].items():
        table.add_row(f"  {component}", f"{entry['tensors']} tensors, {human_bytes(entry['bytes'])}")
    if report["missing_keys"]:
        table.add_row("missing keys", _listing(report["missing_keys"]))
    if report["extra_keys"]:
        table.add_row("extra keys", _listing(report["extra_keys"]))


def _adapter_rows(table: Table, report: dict) -> None:
    table.add_row("modules", f"{report['modules']} ({report.get('conv_modules', 0)} conv, "
                  f"{report.get('text_encoder_modules', 0)} text encoder)")
    if "modules_per_block" not in report:
        return
    table.add_row("module kinds", _counts(report["module_kinds"]))
    table.add_row("ranks", _counts(report["ranks"]))
    table.add_row("alphas", _counts(report["alphas"]))
    table.add_row("blocks", _counts(report["modules_per_block"]))
    for label, key in (("unmatched", "unmatched_modules"), ("shape mismatch", "shape_mismatches"),
                       ("unclaimed keys", "unclaimed_keys")):
        if report[key]:
            table.add_row(label, f"[red]{_listing(report[key])}[/]")
    if "loader_skips" in report:
        skips = report["loader_skips"]
        colour = "yellow" if skips and any(skips.values()) else "dim"
        table.add_row("loaders", f"[{colour}]{skips_text(skips)}[/]")
    if report.get("alpha_ignored_by_comfyui"):
        table.add_row("alpha", f"[yellow]{len(report['alpha_ignored_by_comfyui'])} module(s) take their alpha from "
                      "lora_adapter_metadata, which ComfyUI does not read (it applies them at alpha = rank)[/]")


# --- plan ----------------------------------------------------------------------


def render_plan(console: Console, report: dict, kinds) -> None:
    """The plan as a tree; each target's lines come from its kind (``kinds``: plan/kinds.py TargetKinds)."""
    tree = Tree(f"[bold]{report['recipe']}[/]")
    inputs = tree.add("inputs")
    for name, entry in report["inputs"].items():
        inputs.add(f"[bold]{name}[/]  {entry['source']}  {human_bytes(entry['size'])}  sha256 {entry['sha256'][:16]}…")
    for matrix in report["matrices"]:
        axes = " × ".join(f"{axis['label']} ({len(axis['values'])})" for axis in matrix["axes"])
        tree.add(f"[bold]{matrix['target']}[/]: matrix of {axes}, {len(matrix['variants'])} variants planned")
    for target in report["targets"]:
        kind = kinds.get(target["kind"])
        style = {"up to date": "green", "stale": "yellow", "missing": "cyan", "waiting": "magenta"}[target["status"]]
        node = tree.add(f"[bold]{target['name']}[/] ({kind.heading(target)}) [{style}]{target['status']}[/]")
        _add_lines(node, kind.describe(target))
    if report["not_selected"]:
        tree.add(f"not selected: {', '.join(report['not_selected'])}")
    console.print(tree)


def _add_lines(node: Tree, lines) -> None:
    """Lines are text, or (text, nested lines)."""
    for line in lines:
        if isinstance(line, tuple):
            _add_lines(node.add(line[0]), line[1])
        else:
            node.add(line)


# --- build ---------------------------------------------------------------------


class BuildProgress:
    """One progress bar per target: bytes written, rate, ETA."""

    def __init__(self, console: Console, enabled: bool = True):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )

    def __enter__(self) -> "BuildProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def for_target(self, target):
        task: TaskID = self._progress.add_task(target.name, total=target.write_bytes)
        return lambda nbytes: self._progress.advance(task, nbytes)


def render_build_result(console: Console, summary) -> None:
    """What a build did: each target built (its kind says what to tell), then the ones already up to date."""
    for result in summary.built:
        kind = summary.kinds.of(summary.targets[result.target])
        lines = "\n  ".join(kind.built_lines(result))
        console.print(f"[bold green]built[/] {result.target} -> {result.written.path}\n  {lines}")
    for name in summary.up_to_date:
        console.print(f"[green]up to date[/] {name}")
    if not summary.built:
        console.print("nothing to do: every target is up to date.")
