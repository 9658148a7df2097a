"""Analyses of trained decoders: which brain regions carry the decoded pain (feature importance).

See :mod:`painnet.analysis.importance` (``python -m painnet.analysis.importance RUN_DIR``).
"""
