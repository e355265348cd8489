"""End-to-end demo: a small video DiT on procedural moving shapes, made block-sparse.

``python -m spattn.demo --help``. The model and data modules import only torch and numpy; the
sparse patching (``spattn.patch``) is looked up when the demo runs.
"""
