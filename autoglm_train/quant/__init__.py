"""INT8 paths of the pipeline, each a switch in ``conf/quant/``.

- :mod:`.schemes`: the int8 schemes by name, as torchao PTQ configs and matching fake-quant configs.
- :mod:`.qat`: quantization-aware distillation (fake-quant student, prepare before fit, convert after).
- :mod:`.callback`: the Lightning callback that switches fake-quant on at ``qat.start_step``.
- :mod:`.head_fake_quant`: the big vocab head fake-quantized once per forward, not once per loss chunk.
- :mod:`.ptq`: post-training int8 of a trained student (weight-only or dynamic), in memory.
- :mod:`.int8_modules`: int8 embedding lookup and the CPU int8 weight-only matmul kernel.
- :mod:`.int8_layout`: the int8 form on disk (TorchAoConfig HF dir): its one writer and loader, PTQ's and the export's.
- :mod:`.int8_form`: recipe=distill's PTQ step: write ``student_int8/``, load it back, score it.
- :mod:`.compare`: perplexity, KL and top-1 agreement of a model against a reference on held-out text.
- :mod:`.size`: bytes a model's weights take, int8 tensors included.

torchao is an optional dependency (``pip install 'autoglm-train[quant]'``), imported only when used.
"""
