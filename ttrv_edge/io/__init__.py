"""Files in and out: questions and answers, images and image sets, adapters and run checkpoints.

``answers`` and ``images`` import neither torch nor transformers (the ONNX runtime uses them); ``checkpoints``
needs torch and is imported on its own. Nothing is imported here.
"""
