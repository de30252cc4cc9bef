"""Inference: the TensorFlow/Keras adapter behind the domain's model port (`keras_model.py`) and
the micro-batcher that owns the one inference thread (`batcher.py`).

May import `domain` only; TensorFlow is imported lazily, when a model is loaded.
"""
