"""Evaluate a running autoglm-train (or any OpenAI-compatible) server on held-out data; prints a table.

    python tools/eval_server.py --base-url http://127.0.0.1:8000/v1 --api-key KEY --text heldout.txt \
        [--teacher-url URL | --teacher HF_DIR] [--images digits.jsonl] [--audio speech.jsonl] \
        [--chat chat.jsonl] [--verifiable verifiable.jsonl] [--json out.json]

The same as ``python -m autoglm_train.eval.client``; see ``--help``.
"""

from autoglm_train.eval.client import main

if __name__ == "__main__":
    main()
