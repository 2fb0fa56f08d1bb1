"""Publishing a built release bundle to the Hugging Face Hub (`loraforge publish`, docs/publishing.md).

- ``bundle.py``: the bundle on disk, checked against its manifest and the lock (what will be uploaded);
- ``hub.py``: the remote side through huggingface_hub's own API (state, one commit, check after), and
  its errors as one paragraph each;
- ``record.py``: what was published, in the lock's ``published`` section;
- ``run.py``: the steps in order, for the CLI (``cli_publish.py``).
"""
