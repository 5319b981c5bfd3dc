"""Verify a serving bundle: sha256 of every file, then each form's parity with the training model.

    python tools/export/verify.py bundles/autoglm-tiny [--reference outputs/distill/student] [--strict]

``--help`` lists every option; the library is ``autoglm_train.export.verify``.
"""

import sys

from autoglm_train.export.cli import verify_main

if __name__ == "__main__":
    sys.exit(verify_main())
