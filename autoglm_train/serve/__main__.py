"""``python -m autoglm_train.serve --bundle DIR ...`` (see ``--help``)."""

from autoglm_train.serve.cli import main

main()
