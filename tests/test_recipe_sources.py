"""Source strings: each scheme's syntax and the parts the resolver gets."""

from __future__ import annotations

import pytest

from loraforge.recipe import SourceRef, SourceSyntaxError, parse_source


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("models/base.safetensors", SourceRef(raw="models/base.safetensors", scheme="path", path="models/base.safetensors")),
        ("/abs/base.safetensors", SourceRef(raw="/abs/base.safetensors", scheme="path", path="/abs/base.safetensors")),
        ("C:\\models\\a.safetensors", SourceRef(raw="C:\\models\\a.safetensors", scheme="path", path="C:\\models\\a.safetensors")),
        ("file:///abs/a.safetensors", SourceRef(raw="file:///abs/a.safetensors", scheme="file", path="/abs/a.safetensors")),
        ("https://example.com/a.safetensors", SourceRef(raw="https://example.com/a.safetensors", scheme="https", url="https://example.com/a.safetensors")),
        ("http://127.0.0.1:8080/a.safetensors", SourceRef(raw="http://127.0.0.1:8080/a.safetensors", scheme="http", url="http://127.0.0.1:8080/a.safetensors")),
        (
            "hf://org/repo@0123abc/sub/neon.safetensors",
            SourceRef(raw="hf://org/repo@0123abc/sub/neon.safetensors", scheme="hf", repo="org/repo", revision="0123abc", path="sub/neon.safetensors"),
        ),
        ("hf://org/repo/neon.safetensors", SourceRef(raw="hf://org/repo/neon.safetensors", scheme="hf", repo="org/repo", path="neon.safetensors")),
        ("civitai:123456", SourceRef(raw="civitai:123456", scheme="civitai", item_id="123456")),
        (
            "urn:air:sdxl:lora:civitai:328553@368189.safetensors",
            SourceRef(
                raw="urn:air:sdxl:lora:civitai:328553@368189.safetensors",
                scheme="air",
                item_id="328553",
                air_ecosystem="sdxl",
                air_type="lora",
                air_source="civitai",
                air_version="368189",
                air_format="safetensors",
            ),
        ),
        (
            "urn:air:sd1:checkpoint:civitai:4201",
            SourceRef(raw="urn:air:sd1:checkpoint:civitai:4201", scheme="air", item_id="4201", air_ecosystem="sd1", air_type="checkpoint", air_source="civitai"),
        ),
    ],
)
def test_valid_sources_are_split_into_parts(raw, expected):
    assert parse_source(raw) == expected


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("", "empty"),
        (" a.safetensors", "whitespace"),
        ("hf://org", "Hugging Face"),
        ("hf://org/repo@main", "Hugging Face"),
        ("hf://org/repo@/a.safetensors", "Hugging Face"),
        ("civitai:12ab", "Civitai"),
        ("civitai:", "Civitai"),
        ("urn:air:sdxl:lora", "AIR"),
        ("https://", "malformed"),
        ("https://example.com/", "malformed"),
        ("https://example.com/a b.safetensors", "malformed"),
        ("http://example.com/a.safetensors", "plain http"),
        ("ftp://example.com/a.safetensors", "unsupported scheme 'ftp'"),
        ("s3://bucket/a.safetensors", "unsupported scheme 's3'"),
        ("file://", "no path"),
    ],
)
def test_malformed_sources_say_what_is_wrong_and_how_to_write_it(raw, says):
    with pytest.raises(SourceSyntaxError) as caught:
        parse_source(raw)
    assert says in str(caught.value)
    assert caught.value.hint
