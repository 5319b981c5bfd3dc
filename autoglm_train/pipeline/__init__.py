"""One command from teacher to evaluated bundle: ``python -m autoglm_train.pipeline`` (``make demo-all``).

Each stage is a real command line run as a subprocess (see :mod:`.plan`); :mod:`.stages` skips the
complete ones and stops at a failure; :mod:`.report` turns the runs' own summaries into report.md.
"""
