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

from loraforge.methods import lora_method

MAX_SHOWN = 12  # keys listed before "... and N more"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_SHOWN])
    return shown + (f" ... and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else "")


def _counts(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items()) or "-"


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
        suffix = f" [{', '.join(variants)}]" if variants else ""
        return f"checkpoint, {report['architecture_title']} ({report['size_text']}){suffix}"
    if report["kind"] == "adapter":
        arch = report.get("architecture_title")
        where = f" for {arch} ({report['size_text']})" if arch else ""
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


# --- plan ----------------------------------------------------------------------


def render_plan(console: Console, report: dict) -> None:
    tree = Tree(f"[bold]{report['recipe']}[/]")
    inputs = tree.add("inputs")
    for name, entry in report["inputs"].items():
        inputs.add(f"[bold]{name}[/]  {entry['source']}  {human_bytes(entry['size'])}  sha256 {entry['sha256'][:16]}…")
    for target in report["targets"]:
        _target_node(tree, target)
    if report["not_selected"]:
        tree.add(f"not selected: {', '.join(report['not_selected'])}")
    console.print(tree)


def _target_node(tree: Tree, target: dict) -> None:
    status_style = {"up to date": "green", "stale": "yellow", "missing": "cyan", "waiting": "magenta"}[target["status"]]
    if target["kind"] == "extract":
        _extract_node(tree, target, status_style)
        return
    if target["kind"] == "lora":
        _merge_node(tree, target, status_style)
        return
    if target["kind"] == "release":
        _release_node(tree, target, status_style)
        return
    node = tree.add(
        f"[bold]{target['name']}[/] (checkpoint, {target['architecture']}) [{status_style}]{target['status']}[/]"
    )
    node.add(f"base: {target['base']}" + (f"  (after {', '.join(target['depends_on'])})" if target["depends_on"] else ""))
    node.add(f"output: {target['output']}  save dtype: {target['save_dtype']}  device: {target['device']}")
    node.add(f"reads {human_bytes(target['read_bytes'])}, writes {human_bytes(target['write_bytes'])}; "
             f"{target['weights_baked']} weights change")
    node.add(f"modules per block: {_counts(target['modules_per_block'])}")
    _lora_entries(node, target["loras"])


def _release_node(tree: Tree, target: dict, status_style: str) -> None:
    node = tree.add(f"[bold]{target['name']}[/] (release) [{status_style}]{target['status']}[/]")
    node.add(f"folder: {target['output']}  (manifest.json{', README.md' if target['readme'] else ''}, recipe, lock)")
    for entry in target["includes"]:
        report = f" + {entry['report']}" if entry["report"] else ""
        node.add(f"[bold]{entry['target']}[/] ({entry['kind']}): {entry['file']}{report}")
    node.add(f"inputs recorded: {', '.join(target['inputs']) or '-'}")
    node.add(f"bundles {human_bytes(target['write_bytes'])} (hard links where the filesystem allows, else copies)")


def _lora_entries(node: Tree, loras: list) -> None:
    for lora in loras:
        te = f", te {lora['te']:g}" if lora["te"] != lora["strength"] else ""
        entry = node.add(
            f"[bold]{lora['use']}[/] {lora['adapter_kind']}: strength {lora['strength']:g}{te}; "
            f"{lora['matched']}/{lora['modules']} modules matched, {lora['applied']} applied"
        )
        weights = lora["block_weights"]
        if any(w != 1.0 for w in weights.values()):
            entry.add("block weights: " + ", ".join(f"{b}={w:g}" for b, w in weights.items()))
        if lora["unmatched"]:
            entry.add(f"[yellow]unmatched (allowed): {_listing(lora['unmatched'])}[/]")


def _extract_node(tree: Tree, target: dict, status_style: str) -> None:
    node = tree.add(f"[bold]{target['name']}[/] (extract, {target['architecture']}) [{status_style}]{target['status']}[/]")
    after = f"  (after {', '.join(target['depends_on'])})" if target["depends_on"] else ""
    node.add(f"tuned: {target['tuned']} - base: {target['base']}{after}")
    node.add(f"output: {target['output']}  save dtype: {target['save_dtype']}  device: {target['device']}")
    conv = _counts(target["conv_rank"]) if target["conv_rank"] else "skip 3x3 convs"
    node.add(f"rank: {_counts(target['rank'])}; conv rank: {conv}; svd: {target['svd']}; "
             f"text encoder: {target['text_encoder']}; min_diff: {target['min_diff']:g}")
    node.add(f"reads {human_bytes(target['read_bytes'])}, writes at most {human_bytes(target['write_bytes'])}; "
             f"{target['candidate_modules']} candidate modules (unchanged ones are skipped at build time)")
    node.add(f"modules per block: {_counts(target['modules_per_block'])}")
    if target["text_encoder_modules_missing"]:
        node.add(f"[yellow]text-encoder modules missing from a checkpoint: {_listing(target['text_encoder_modules_missing'])}[/]")


def _rank_text(spec: dict) -> str:
    """A rank spec as written in a recipe: 32, or energy: 0.99, max: 128."""
    return str(spec["rank"]) if set(spec) == {"rank"} else _counts(spec)


def _merge_node(tree: Tree, target: dict, status_style: str) -> None:
    node = tree.add(f"[bold]{target['name']}[/] (lora {target['method']}, {target['architecture']}) [{status_style}]{target['status']}[/]")
    if target["depends_on"]:
        node.add(f"after {', '.join(target['depends_on'])}")
    node.add(f"output: {target['output']}  save dtype: {target['save_dtype']}  device: {target['device']}")
    if lora_method(target["method"]).parameters:  # a method that chooses ranks
        conv = _rank_text(target["conv_rank"]) if target["conv_rank"] else "as rank"
        clamp = f"; clamp quantile {target['clamp_quantile']:g}" if target["clamp_quantile"] else ""
        node.add(f"rank: {_rank_text(target['rank'])}; conv rank: {conv}; dense svd: {target['dense_svd']}{clamp}")
    node.add(f"reads {human_bytes(target['read_bytes'])}, writes at most {human_bytes(target['write_bytes'])}; "
             f"{target['modules']} modules ({target['conv_modules']} conv, {target['dense_modules']} via dense ΔW)")
    node.add(f"modules per block: {_counts(target['modules_per_block'])}")
    _lora_entries(node, target["loras"])


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
    """What a build did: each target built, then the ones that were already up to date."""
    for result in summary.built:
        if hasattr(result, "summary_lines"):  # targets that describe themselves (extract)
            written = result.written
            console.print(f"[bold green]built[/] {result.target} -> {written.path}\n  {human_bytes(written.size)}; "
                          + "\n  ".join(result.summary_lines()) + f"\n  sha256 {written.sha256}")
            continue
        written = result.written
        console.print(
            f"[bold green]built[/] {result.target} -> {written.path}\n"
            f"  {human_bytes(written.size)}; {result.baked_tensors} tensors baked, "
            f"{result.copied_tensors} copied, {result.converted_tensors} converted\n"
            f"  sha256 {written.sha256}\n  data sha256 {written.data_sha256}"
        )
    for name in summary.up_to_date:
        console.print(f"[green]up to date[/] {name}")
    if not summary.built:
        console.print("nothing to do: every target is up to date.")
