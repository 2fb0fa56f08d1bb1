"""Release bundles: the text of manifest.json and the README.md model card (pure, no I/O).

The folder itself is assembled by loraforge.execute.release; what it holds
is described in docs/releases.md.
"""
