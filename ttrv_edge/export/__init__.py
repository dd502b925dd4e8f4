"""From a saved adapter to ONNX graphs: ``merge`` (adapter + base model -> one transformers model), ``graphs`` (the
traceable wrapper modules), ``onnx`` (``export_onnx``: graphs, processor files, manifest, int8 copies, self-check)
and ``commands`` (the ``export`` and ``answer`` CLI commands). Nothing is imported here: ``answer`` must not load
torch.
"""
