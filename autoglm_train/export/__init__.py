"""Serving bundles: a trained decoder (+ plugins) as HF, int8, GGUF and ONNX forms, with parity checks.

Entry points: :func:`autoglm_train.export.bundle.export_bundle`,
:func:`autoglm_train.export.verify.verify_bundle`; the int8 form loads with
:func:`autoglm_train.quant.int8_layout.load_int8` (or transformers alone);
command lines in ``tools/export/``.
"""
