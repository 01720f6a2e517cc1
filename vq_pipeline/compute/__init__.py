"""compute: tensors in, tensors out. Lloyd, seeding, pruning, nearest-code search, the multi-level
levels and their encode, codec math, the data seam (:class:`~vq_pipeline.compute.data.DataSource`),
and the engines.

May import: ``vq_pipeline.errors``, ``vq_pipeline.settings``, ``vq_pipeline.validate``,
``vq_pipeline.arrays`` and ``vq_pipeline.compute``. No polars, no paths, no codebook files
(``tests/test_layers.py`` enforces it).
"""
