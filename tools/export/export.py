"""Export a run's student decoder (+ plugins) as a serving bundle.

    python tools/export/export.py --decoder outputs/distill/student --out bundles/autoglm-tiny \
        [--plugin outputs/add_modality/plugin/vision] [--dtype bfloat16] [--gguf f16,q8_0] [--overwrite]

``--help`` lists every option; the library is ``autoglm_train.export``.
"""

import sys

from autoglm_train.export.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
