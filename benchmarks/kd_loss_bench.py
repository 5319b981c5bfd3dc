"""Chunked vs naive KD loss: peak memory and time of one forward+backward at real vocab size.

Each variant runs in a fresh process so its peak RSS is its own. Prints a table and
writes the "KD loss memory" section of benchmarks/RESULTS.md.

    python benchmarks/kd_loss_bench.py [--batch 8 --seq 256 --vocab 49152 --teacher-hidden 576]
    python benchmarks/kd_loss_bench.py --batch 1 --seq 4096 --vocab 151552      # GLM's vocabulary

"chunked" is the default path (each chunk's gradient computed in the forward pass); "recompute" is the path a
head that is not a plain ``nn.Linear`` takes (the chunk's logits recomputed in backward under checkpointing).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from results import write_section


def _measure(variant: str, batch: int, seq: int, vocab: int, hidden: int, chunk: int, teacher_hidden: int) -> dict:
    import torch

    from autoglm_train.distill.kd_loss import KDLoss

    torch.manual_seed(0)
    s_head = torch.nn.Linear(hidden, vocab, bias=False)
    t_head = torch.nn.Linear(teacher_hidden, vocab, bias=False).requires_grad_(False)
    s_hidden = torch.randn(batch, seq, hidden, requires_grad=True)
    t_hidden = torch.randn(batch, seq, teacher_hidden)
    labels = torch.randint(0, vocab, (batch, seq))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    if variant in ("chunked", "recompute"):
        loss = KDLoss(kind="forward_kl", kd_ratio=0.5, chunk_size=chunk)
        head = s_head if variant == "chunked" else lambda x: s_head(x)  # not an nn.Linear: the recompute path
        out = loss(s_hidden, head, labels, teacher_hidden=t_hidden, teacher_head=t_head, vocab_size=vocab).loss
    else:  # what a plain implementation does: full B×T×V float32 logits of both models
        s_logp = torch.log_softmax(s_head(s_hidden).float(), -1)
        with torch.no_grad():
            t_logp = torch.log_softmax(t_head(t_hidden).float(), -1)
        kd = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        ce = torch.nn.functional.cross_entropy(s_logp.view(-1, vocab), labels.view(-1))
        out = 0.5 * kd + 0.5 * ce
    out.backward()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = (peak - base) / 1024
    return {"variant": variant, "seconds": elapsed, "cpu_seconds": cpu, "peak_extra_mib": extra, "loss": float(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=None, help="teacher hidden size (default: 2 x --hidden)")
    p.add_argument("--chunks", default="256,64", help="chunk sizes (positions) to compare")
    p.add_argument("--recompute", action="store_true", help="also time the recompute-in-backward path")
    p.add_argument("--chunk", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    teacher_hidden = a.teacher_hidden or a.hidden * 2
    if a.child:
        print(json.dumps(_measure(a.child, a.batch, a.seq, a.vocab, a.hidden, a.chunk, teacher_hidden)))
        return
    rows = []
    runs = [("naive", a.chunk)] + [("chunked", int(c)) for c in a.chunks.split(",")]
    if a.recompute:
        runs.append(("recompute", int(a.chunks.split(",")[0])))
    for variant, chunk in runs:
        cmd = [sys.executable, __file__, "--child", variant, "--chunk", str(chunk), *sys.argv[1:]]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        names = {"naive": "naive (full logits)", "chunked": "chunked", "recompute": "chunked, recompute in backward"}
        row["variant"] = names[variant] + ("" if variant == "naive" else f", {chunk} positions")
        rows.append(row)
    logits_mib = a.batch * a.seq * a.vocab * 4 / 2**20
    lines = [
        f"B={a.batch}, T={a.seq}, V={a.vocab:,}, student hidden {a.hidden}, teacher hidden {teacher_hidden}, "
        f"one float32 B×T×V logits tensor = {logits_mib:,.0f} MiB.",
        "",
        "| variant | peak extra RSS (MiB) | × naive | forward+backward (s) | × naive | CPU s (all threads) | × naive "
        "| loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['variant']} | {r['peak_extra_mib']:,.0f} | {r['peak_extra_mib'] / rows[0]['peak_extra_mib']:.3f} "
            f"| {r['seconds']:.2f} | {r['seconds'] / rows[0]['seconds']:.2f} "
            f"| {r['cpu_seconds']:.2f} | {r['cpu_seconds'] / rows[0]['cpu_seconds']:.2f} | {r['loss']:.4f} |"
            for r in rows
        ),
    ]
    print("\n".join(lines))
    write_section(f"KD loss memory and time (B={a.batch}, T={a.seq}, V={a.vocab:,})", "\n".join(lines))


if __name__ == "__main__":
    main()
