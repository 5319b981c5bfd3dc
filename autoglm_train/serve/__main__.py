"""``python -m autoglm_train.serve --bundle DIR | --decoder HF_DIR ...`` (see ``--help``)."""

from autoglm_train.serve.cli import main

main()
