"""What users call: the command-line entry points, one-image prediction, the Python API (:class:`Segmenter`) and
prompt-driven edits."""
