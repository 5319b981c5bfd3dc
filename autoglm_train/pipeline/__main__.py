import sys

from autoglm_train.pipeline.cli import main

sys.exit(main())
