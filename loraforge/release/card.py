"""README.md of a release bundle: a model card generated from the recipe and the bundled files.

It opens with the YAML front matter the Hugging Face Hub reads (license,
base_model and base_model_relation, library_name, pipeline_tag, tags;
docs/publishing.md), so the bundle's README.md is the repository's card as
published. Sections: title and description, release facts (date, tool), files with
their hashes, base models, one ingredients table per target (strength, text
encoder strength, block weights exactly as the recipe gives them), inputs,
and how to rebuild. Pure text: the same records give the same bytes.
Numbers are printed in Python's shortest round-trip form so the card shows
exactly the recipe's values (0.8, not 0.800000).
"""

from __future__ import annotations

import json
import re

from loraforge.methods import lora_method
from loraforge.recipe.sources import SourceSyntaxError, parse_source
from loraforge.release.contents import BundledOutput, ReleaseContents
from loraforge.recipe.schema import CheckpointTarget, ExtractTarget, LoraTarget, LoraUse, RankSpec

KIND_TITLES = {"checkpoint": "checkpoint (LoRAs baked in)", "lora": "LoRA merge", "extract": "LoRA extraction"}
PIPELINE_TAG = "text-to-image"
LORA_KINDS = ("lora", "extract")  # recipe kinds whose output is a LoRA, when the file does not say


def model_card(contents: ReleaseContents) -> str:
    sections = [
        front_matter(contents) + _header(contents),
        _files(contents),
        _base_models(contents),
        _ingredients(contents),
        _inputs(contents),
        _rebuild(contents),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


# --- Hub metadata ----------------------------------------------------------------


def hub_metadata(contents: ReleaseContents) -> dict:
    """The card's YAML front matter as data (keys in the order written).

    ``base_model``: the Hub repositories (``hf://`` sources) of the models the
    bundled outputs are made from: a bake's base and LoRAs, a merge's
    ingredients, an extraction's base, through chained targets. Inputs from
    elsewhere (files, Civitai) have no Hub id and are named in the body only.
    ``base_model_relation``: ``adapter`` when every output is a LoRA extracted
    from its base, else ``merge`` when several models went in, else
    ``finetune`` (one Hub model changed by local ingredients).
    """
    meta: dict = {}
    if contents.recipe.license:
        meta["license"] = contents.recipe.license
    bases = _hub_base_models(contents)
    if bases:
        meta["base_model"] = bases
        meta["base_model_relation"] = _relation(contents, bases)
        if all(_is_lora(output) for output in contents.outputs):
            # The Hub's diffusers snippet loads a single-file kohya LoRA onto its base with
            # load_lora_weights; checkpoints here are single files, which from_pretrained cannot load.
            meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = PIPELINE_TAG
    meta["tags"] = _tags(contents)
    return meta


def front_matter(contents: ReleaseContents) -> str:
    """``---``, the metadata as YAML, ``---`` and a blank line."""
    lines = ["---"]
    for key, value in hub_metadata(contents).items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_scalar(item)}" for item in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines + ["---", "", ""])


def _hub_base_models(contents: ReleaseContents) -> list[str]:
    recipe = contents.recipe
    sources = {record.name: record.source for record in contents.inputs}
    found: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name in recipe.targets:
            spec = recipe.targets[name]
            # An extracted LoRA is an adapter of its base; the tuned model is where it came from, not what it applies to.
            for dependency in (spec.base,) if isinstance(spec, ExtractTarget) else recipe.dependencies(name):
                visit(dependency)
            return
        repo = _hub_repo(sources.get(name) or getattr(recipe.inputs.get(name), "source", None))
        if repo is not None and repo not in found:
            found.append(repo)

    for output in contents.outputs:
        visit(output.target)
    return found


def _hub_repo(source: str | None) -> str | None:
    try:
        ref = parse_source(source) if source else None
    except SourceSyntaxError:
        return None
    return ref.repo if ref is not None and ref.scheme == "hf" else None


def _relation(contents: ReleaseContents, bases: list[str]) -> str:
    if all(contents.recipe.targets[o.target].kind == "extract" for o in contents.outputs):
        return "adapter"
    return "merge" if len(bases) > 1 else "finetune"


def _is_lora(output: BundledOutput) -> bool:
    if output.architecture:
        return output.architecture.endswith("/lora")
    return output.kind in LORA_KINDS


def _tags(contents: ReleaseContents) -> list[str]:
    tags = ["stable-diffusion"]
    uses_loras = any(_is_lora(o) or getattr(contents.recipe.targets[o.target], "loras", ()) for o in contents.outputs)
    if uses_loras:
        tags.append("lora")
    for output in contents.outputs:  # the family, as ModelSpec names it: stable-diffusion-v1, stable-diffusion-xl-v1-base
        family = (output.architecture or "").split("/", 1)[0]
        if family and family not in tags:
            tags.append(family)
    return tags + ["loraforge"]


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _yaml_scalar(value: str) -> str:
    """A YAML scalar that reads back as this exact string: plain when unambiguous, else double-quoted."""
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS and not re.fullmatch(r"[0-9._+-]+", text):
        return text
    return json.dumps(text, ensure_ascii=False)


# --- sections ------------------------------------------------------------------


def _header(contents: ReleaseContents) -> str:
    lines = [f"# {_line(contents.title)}"]
    if contents.description:
        lines += ["", contents.description.strip()]
    lines += [
        "",
        "| | |",
        "|---|---|",
        f"| Release | `{contents.name}` from recipe `{_cell(contents.recipe_file.name)}` (`{_cell(contents.recipe.name)}`) |",
        f"| Date | {contents.date or 'not set'} |",
        f"| Built with | loraforge {contents.version} |",
    ]
    return "\n".join(lines)


def _files(contents: ReleaseContents) -> str:
    rows = [
        "## Files",
        "",
        "| File | Target | Kind | Size (bytes) | SHA256 | AutoV2 | Data SHA256 (AutoV3) |",
        "|---|---|---|---:|---|---|---|",
    ]
    for output in contents.outputs:
        file = output.file
        data = f"`{file.data_sha256}` ({file.data_sha256[:12]})" if file.data_sha256 else "-"
        rows.append(f"| `{_cell(file.name)}` | `{output.target}` | {output.kind} | {file.size} | `{file.sha256}` | "
                    f"`{file.sha256[:10]}` | {data} |")
    reports = [o.report.name for o in contents.outputs if o.report is not None]
    rows += ["", "AutoV2 is the first 10 hex digits of the SHA256 (Civitai, A1111 checkpoints); AutoV3 the first 12 of "
             "the data-section SHA256 (A1111 LoRA hash, kohya `sshs_model_hash`). `manifest.json` lists every file's "
             "size and SHA256."]
    if reports:
        rows += ["", "Per-module reports: " + ", ".join(f"`{_cell(name)}`" for name in reports) + "."]
    return "\n".join(rows)


def _base_models(contents: ReleaseContents) -> str:
    rows = []
    for output in contents.outputs:
        spec = contents.recipe.targets[output.target]
        if isinstance(spec, CheckpointTarget) and spec.merge is not None:
            rows += [(output.target, "merged", model) for model in spec.merge.models]
            rows += [(output.target, "merge base", spec.merge.base)] if spec.merge.base else []
        elif isinstance(spec, CheckpointTarget):
            rows.append((output.target, "base", spec.base))
        elif isinstance(spec, ExtractTarget):
            rows += [(output.target, "base", spec.base), (output.target, "tuned", spec.tuned)]
    if not rows:
        return ""
    lines = ["## Base models", "", "| Target | Role | Model | Source | SHA256 |", "|---|---|---|---|---|"]
    for target, role, name in rows:
        source, sha256 = _origin(contents, name)
        lines.append(f"| `{target}` | {role} | `{name}` | {source} | {sha256} |")
    return "\n".join(lines)


def _ingredients(contents: ReleaseContents) -> str:
    parts = ["## Ingredients"]
    for output in contents.outputs:
        spec = contents.recipe.targets[output.target]
        parts.append(_target_ingredients(contents, output, spec))
    return "\n\n".join(parts)


def _target_ingredients(contents: ReleaseContents, output: BundledOutput, spec) -> str:
    heading = f"### `{output.target}`: {KIND_TITLES.get(output.kind, output.kind)}"
    if isinstance(spec, ExtractTarget):
        conv = _rank(spec.conv_rank) if spec.conv_rank else "3x3 convs skipped"
        return "\n".join([
            heading, "",
            f"LoRA extracted from `{spec.tuned}` minus `{spec.base}`: rank {_rank(spec.rank)}, conv rank {conv}, "
            f"text encoder {_cell(str(spec.text_encoder).lower())}, SVD {spec.svd}, min_diff {_number(spec.min_diff)}.",
        ])
    lines = [heading, ""]
    if isinstance(spec, LoraTarget):
        detail = f"method {spec.method}"
        if lora_method(spec.method).parameters:  # a method that chooses ranks
            conv = _rank(spec.conv_rank) if spec.conv_rank else "as rank"
            detail += f", rank {_rank(spec.rank)}, conv rank {conv}"
        lines += [f"Merged into one LoRA: {detail}.", ""]
    elif isinstance(spec, CheckpointTarget) and spec.merge is not None:
        lines += [*_merge_lines(spec.merge), ""]
        if spec.loras:
            lines += ["Then baked into that merge:", ""]
    elif isinstance(spec, CheckpointTarget):
        lines += [f"Baked into `{spec.base}`.", ""]
    lines += ["| # | Ingredient | Source | Strength | Text encoder | Block weights |", "|---:|---|---|---:|---:|---|"]
    for index, lora in enumerate(getattr(spec, "loras", ()), start=1):
        source, _ = _origin(contents, lora.use)
        lines.append(f"| {index} | `{lora.use}` | {source} | {_number(lora.strength)} | {_number(lora.te_strength)} | "
                     f"{_blocks(lora)} |")
    return "\n".join(lines)


def _inputs(contents: ReleaseContents) -> str:
    if not contents.inputs:
        return ""
    lines = ["## Inputs", "", "| Input | Source | Size (bytes) | SHA256 |", "|---|---|---:|---|"]
    for record in contents.inputs:
        size = "-" if record.size is None else str(record.size)
        lines.append(f"| `{record.name}` | `{_cell(record.source)}` | {size} | `{record.sha256}` |")
    return "\n".join(lines)


def _rebuild(contents: ReleaseContents) -> str:
    recipe, lock = contents.recipe_file.name, contents.lock_file.name
    return "\n".join([
        "## Rebuild",
        "",
        f"`{_cell(recipe)}` and `{_cell(lock)}` in this folder are the recipe and lock this release was built from. "
        "With the inputs available as their sources say (remote ones are downloaded and checked against the lock's "
        "SHA256), one command rebuilds every file byte for byte and another checks the result against the lock:",
        "",
        "```sh",
        f"loraforge build {_shell_word(recipe)} --locked",
        f"loraforge verify {_shell_word(recipe)}",
        "```",
        "",
        "To check this folder itself, compare each file's SHA256 with `manifest.json` (e.g. `sha256sum FILE`).",
    ])


# --- formatting ----------------------------------------------------------------


def _origin(contents: ReleaseContents, name: str) -> tuple[str, str]:
    """(source cell, sha256 cell) of an input, or of a target whose output feeds another."""
    record = next((r for r in contents.inputs if r.name == name), None)
    if record is not None:
        return f"`{_cell(record.source)}`", f"`{record.sha256}`"
    produced = contents.output_of(name)
    if produced is not None:
        return f"output of target `{name}`", f"`{produced.file.sha256}`"
    return f"output of target `{name}` (not in this release)", "-"


def _merge_lines(merge) -> list[str]:
    """The merge formula, its models and each parameter as the recipe gives it (number or block weights)."""
    method = merge.method_class
    base = f" against base `{merge.base}`" if merge.base else ""
    lines = [f"Merged with `{merge.method}` ({_cell(method.formula)}) of " + ", ".join(f"`{m}`" for m in merge.models) + f"{base}."]
    for name, value in merge.parameters.items():
        lines.append(f"- {name}: {_cell(json.dumps(value, separators=(', ', ': ')))}")
    return lines


def _number(value: float) -> str:
    """Shortest round-trip form, without a trailing .0: 0.8, -0.3, 1."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _blocks(lora: LoraUse) -> str:
    spec = lora.blocks
    if spec is None:
        return "all 1"
    if isinstance(spec, str):
        return f"`{_cell(spec)}`"
    if isinstance(spec, tuple):
        return "`" + ", ".join(_number(v) for v in spec) + "`"
    return "`" + ", ".join(f"{_cell(key)}: {_number(v)}" for key, v in spec.items()) + "`"


def _rank(spec: RankSpec | None) -> str:
    if spec is None:
        return "-"
    parts = [f"{key} {_number(value) if isinstance(value, float) else value}"
             for key, value in spec.model_dump(exclude_none=True).items()]
    return str(spec.rank) if spec.rank is not None and spec.max is None else ", ".join(parts)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (and inline code): no pipes, no line breaks, no backticks."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")


def _line(text: str) -> str:
    return " ".join(str(text).split())


def _shell_word(text: str) -> str:
    """Quote a file name for the shell only when it needs it."""
    if text and all(c.isalnum() or c in "._-+/" for c in text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"
