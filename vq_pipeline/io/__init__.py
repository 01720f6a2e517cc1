"""io: paths in, tensors or files out, no math. Table discovery, reading and writing (polars), the
codebook file format (:mod:`~vq_pipeline.io.codebook_file`), atomic writes, locks and path rules.

May import: ``vq_pipeline.errors``, ``vq_pipeline.settings``, ``vq_pipeline.validate``,
``vq_pipeline.arrays`` and ``vq_pipeline.io`` (``tests/test_layers.py`` enforces it).
"""
