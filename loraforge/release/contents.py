"""What a release bundle holds, as plain records: the input of the manifest and model-card text.

The executor fills these in from the files it placed in the bundle; the
text modules (manifest.py, card.py) only format them, so the same records
always give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from loraforge.recipe.schema import Recipe


@dataclass(frozen=True)
class BundledFile:
    """A file inside the bundle folder."""

    name: str  # file name inside the bundle (no folders)
    size: int
    sha256: str  # whole file
    data_sha256: str | None = None  # safetensors data section; None for other files


@dataclass(frozen=True)
class BundledOutput:
    """A target's output as bundled, with the report written next to it, if any."""

    target: str
    kind: str  # the recipe's `kind:` (checkpoint, lora, extract)
    file: BundledFile
    action_key: str | None
    report: BundledFile | None = None  # <output>.merge.json / .extract.json
    architecture: str | None = None  # the file's ModelSpec `modelspec.architecture` (e.g. stable-diffusion-v1/lora)


@dataclass(frozen=True)
class InputRecord:
    """An input one of the bundled targets read (directly or through another target)."""

    name: str
    source: str  # as written in the recipe
    resolved: Mapping[str, str]  # the lock's "resolved" entry: hf commit, final URL, relative path...
    size: int | None
    sha256: str
    data_sha256: str | None = None


@dataclass(frozen=True)
class ReleaseContents:
    """Everything the manifest and the model card describe."""

    name: str  # the release target's name
    recipe: Recipe
    recipe_text: str  # the recipe YAML exactly as read
    recipe_file: BundledFile  # its copy in the bundle
    lock_file: BundledFile  # the bundle's lock (the bundled targets and the inputs they read)
    outputs: tuple[BundledOutput, ...]  # in `include` order
    inputs: tuple[InputRecord, ...]  # sorted by name
    description: str | None  # the release's own, else the recipe's
    date: str | None  # the recipe's date or SOURCE_DATE_EPOCH; never the clock
    version: str  # loraforge version
    numeric_policy: Mapping[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.recipe.title or self.recipe.name

    def output_of(self, target: str) -> BundledOutput | None:
        return next((output for output in self.outputs if output.target == target), None)
