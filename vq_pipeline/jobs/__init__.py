"""jobs: what a CLI, a flow or cron runs, without Prefect. Fit from tables, encode a folder, the
working directory of the scheduled run, drift, reports and pictures, semantic ids over tables.

May import everything in ``vq_pipeline`` except ``vq_pipeline.sklearn``; never ``prefect`` or
``vq_flows`` (``tests/test_layers.py`` enforces it).
"""
