"""Serving bundles: a trained decoder (+ plugins) as HF, int8, GGUF and ONNX forms, with parity checks.

Entry points: :func:`autoglm_train.export.bundle.export_bundle`,
:func:`autoglm_train.export.verify.verify_bundle`, :func:`autoglm_train.export.int8.load_int8`;
command lines in ``tools/export/``.
"""
