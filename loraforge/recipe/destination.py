"""Syntax of a publishing destination (``loraforge publish --to``, a release's ``publish: {to: ...}``).

``hf://<org>/<repo>[@<branch>]``: a model repository on the Hugging Face Hub
and the branch to commit to (default ``main``). Dataset and Space repositories
(``hf://datasets/...``, ``hf://spaces/...``) are refused: a release is a
model. Nothing here touches the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_BRANCH = "main"
# hf://ORG/REPO[@REVISION]: also how `verify --remote` reads the published address (verify/remote.py).
HUB_ADDRESS = re.compile(
    r"hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9._/-]+))?/?"
)
_OTHER_TYPES = ("datasets", "spaces", "buckets", "kernels")
EXAMPLE = "hf://my-org/neon-noir@main"


class DestinationSyntaxError(ValueError):
    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class HubDestination:
    repo: str  # "org/repo"
    revision: str  # the branch commits go to
    revision_given: bool = False  # written with @...

    @property
    def url(self) -> str:
        return f"hf://{self.repo}@{self.revision}"


def parse_destination(raw: str) -> HubDestination:
    """Parse ``raw`` or raise :class:`DestinationSyntaxError` saying how to write it."""
    text = raw.strip() if isinstance(raw, str) else ""
    if not text.lower().startswith("hf://"):
        raise DestinationSyntaxError(
            f"the publishing destination {raw!r} is not an hf:// address; loraforge publishes to the Hugging Face Hub",
            f"write it as hf://ORG/REPO or hf://ORG/REPO@BRANCH, e.g. {EXAMPLE}",
        )
    head = text[len("hf://"):].split("/", 1)[0].lower()
    if head in _OTHER_TYPES:
        kind = head[:-1]
        raise DestinationSyntaxError(
            f"{raw!r} names a {kind} repository; a release (model files, a model card) is published to a model repository",
            f"write the model repository as hf://ORG/REPO (no '{head}/' prefix), e.g. {EXAMPLE}",
        )
    match = HUB_ADDRESS.fullmatch(text)
    if match is None or ".." in text or match["repo"].endswith((".git", ".")):
        raise DestinationSyntaxError(
            f"the publishing destination {raw!r} is malformed",
            f"write hf://ORG/REPO or hf://ORG/REPO@BRANCH with letters, digits, '-', '_' and '.', e.g. {EXAMPLE}",
        )
    revision = match["revision"]
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        raise DestinationSyntaxError(
            f"{raw!r} names a commit after '@'; a publish adds a commit to a branch",
            f"write a branch name after '@' (default {DEFAULT_BRANCH}), e.g. {EXAMPLE}",
        )
    return HubDestination(match["repo"], revision or DEFAULT_BRANCH, revision is not None)
