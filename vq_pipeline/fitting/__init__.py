"""fitting: codebooks fitted from a :class:`~vq_pipeline.compute.data.DataSource`. The flat fit
(seeding, restarts, checkpoints), multi-level fits, mini-batch fits, and the notebook entry point
:func:`~vq_pipeline.fitting.kmeans.fit_codebook`; each returns a :class:`~vq_pipeline.codebook.Codebook`.

May import: the base modules (``errors``, ``settings``, ``validate``, ``arrays``), ``compute``, ``io``,
``vq_pipeline.codebook`` and ``vq_pipeline.fitting`` (``tests/test_layers.py`` enforces it).
"""
