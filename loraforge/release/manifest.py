"""manifest.json of a release bundle: every output, input, the recipe and the tool, as stable JSON.

The text is a function of the records alone: keys sorted, two-space indent,
lists in a defined order (outputs in `include` order, inputs and files by
name), a final newline, no absolute paths, no clock. Hashes are those of
loraforge.formats.hashing: whole-file sha256 (its first 10 hex are AutoV2),
the safetensors data-section sha256 (kohya sshs_model_hash; first 12 hex
are AutoV3 / the A1111 LoRA hash).
"""

from __future__ import annotations

import json

from loraforge.canonical import canonical_json
from loraforge.formats.hashing import autov2, autov3
from loraforge.release.contents import BundledFile, BundledOutput, InputRecord, ReleaseContents

MANIFEST_FORMAT = "loraforge-release/1"
MANIFEST_NAME = "manifest.json"
README_NAME = "README.md"


def manifest_dict(contents: ReleaseContents, readme: BundledFile | None) -> dict:
    """The manifest as data; ``readme`` is the bundled README.md (None when `readme: false`)."""
    recipe = contents.recipe
    return {
        "format": MANIFEST_FORMAT,
        "release": contents.name,
        "title": contents.title,
        "description": contents.description,
        "date": contents.date,
        "loraforge": contents.version,
        "numeric_policy": dict(sorted(contents.numeric_policy.items())),
        "recipe": {
            "name": recipe.name,
            "file": contents.recipe_file.name,
            "lock": contents.lock_file.name,
            "canonical": json.loads(recipe.canonical_json()),
            "yaml": contents.recipe_text,
        },
        "outputs": [_output_entry(output) for output in contents.outputs],
        "inputs": [_input_entry(record) for record in contents.inputs],
        "files": [_file_entry(f) for f in sorted(bundle_files(contents, readme), key=lambda f: f.name)],
    }


def manifest_text(contents: ReleaseContents, readme: BundledFile | None) -> str:
    return canonical_json(manifest_dict(contents, readme), indent=2, ascii=False, allow_nan=False) + "\n"


def bundle_files(contents: ReleaseContents, readme: BundledFile | None) -> list[BundledFile]:
    """Every file of the bundle except manifest.json itself (which cannot list its own hash)."""
    files = [output.file for output in contents.outputs]
    files += [output.report for output in contents.outputs if output.report is not None]
    files += [contents.recipe_file, contents.lock_file]
    if readme is not None:
        files.append(readme)
    return files


def _output_entry(output: BundledOutput) -> dict:
    file = output.file
    entry = {
        "target": output.target,
        "kind": output.kind,
        "file": file.name,
        "size": file.size,
        "sha256": file.sha256,
        "autov2": autov2(file.sha256),
        "data_sha256": file.data_sha256,
        "autov3": autov3(file.data_sha256) if file.data_sha256 else None,
        "action_key": output.action_key,
    }
    if output.report is not None:
        entry["report"] = output.report.name
    return entry


def _input_entry(record: InputRecord) -> dict:
    return {
        "name": record.name,
        "source": record.source,
        "resolved": dict(sorted(record.resolved.items())),
        "size": record.size,
        "sha256": record.sha256,
        "data_sha256": record.data_sha256,
    }


def _file_entry(file: BundledFile) -> dict:
    return {"file": file.name, "size": file.size, "sha256": file.sha256}
