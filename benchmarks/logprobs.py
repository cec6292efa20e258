"""Peak memory and time of the chunked LM-head log-probs vs the naive full-logits path, side by side.

What is measured (the "log-prob step"): given fixed hidden states ``h`` ``(rows, tokens, d)`` that require
grad and an LM head ``W`` ``(V, d)``, compute ``Σ log p(token_{i} | prefix)`` over positions ``i ≥ 1`` and
call ``backward``.

* naive:   ``logits = h[:, :-1] @ Wᵀ`` → ``log_softmax(float32)`` → ``gather`` → ``sum`` → ``backward``
* chunked: ``prefopt.logprobs.chunked_head_logps`` on the same flattened hidden states → ``sum`` → ``backward``

``--stat`` adds the per-token statistics of WPO and TDPO (Zhou et al. 2024; Zeng et al. 2024):

* ``wpo``: the log-probs **and** WPO's normaliser ``log Σ_v π_v²`` — naive: both from the full logits
  (``prefopt.losses.weighted.log_sum_sq_probs``); chunked: ``prefopt.logprobs.head_stats`` with
  ``log_sum_sq_probs=True`` (one pass over each chunk of logits).
* ``tdpo``: the per-token ``KL(π_ref ‖ π_θ)`` over the vocabulary, reference hidden states fixed — naive:
  ``prefopt.losses.weighted.token_kl`` on both full logits; chunked: ``prefopt.logprobs.chunked_head_kl``.

Memory method: every measurement runs in a fresh subprocess. After the inputs are built, the process's
peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is read; the step is run once; the
peak is read again. The difference is the extra peak memory of the step (everything torch allocates on CPU
is in the RSS; ``tracemalloc`` would not see it). The same subprocess then repeats the step ``--iters − 1``
times for timing (the first, cold iteration is not timed): wall-clock time and process CPU time (all threads;
less sensitive than wall time to other jobs on a shared machine). Subprocesses alternate naive / chunked /
naive / chunked … for ``--rounds`` rounds and the medians are reported with ratios chunked / naive.

Example::

    python benchmarks/logprobs.py --json /tmp/logprobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _worker(args: argparse.Namespace) -> dict[str, float]:
    from prefopt.logprobs import chunked_head_kl, chunked_head_logps, head_stats
    from prefopt.losses.weighted import log_sum_sq_probs, token_kl

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows, tokens, d, vocab = args.rows, args.tokens, args.hidden, args.vocab
    h = torch.randn(rows, tokens, d).mul_(0.5).requires_grad_(True)
    w = torch.randn(vocab, d).mul_(0.05).requires_grad_(args.head_grad == "trainable")
    ids = torch.randint(0, vocab, (rows, tokens))
    y = ids[:, 1:].reshape(-1)
    h_ref = (h.detach() + 0.1 * torch.randn_like(h)) if args.stat == "tdpo" else None
    head = torch.nn.Linear(d, vocab, bias=False)
    head.weight = torch.nn.Parameter(w.detach(), requires_grad=w.requires_grad)
    w = head.weight

    def step() -> None:
        h.grad = None
        w.grad = None
        if args.stat == "wpo":
            if args.impl == "naive":
                logits = (h[:, :-1] @ w.T).float()
                lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                lss = log_sum_sq_probs(logits)
            else:
                st = head_stats(
                    head, h[:, :-1].reshape(-1, d), y, chunk_size=args.chunk_size, log_sum_sq_probs=True
                )
                lp, lss = st.logp, st.log_sum_sq_probs
            (lp.sum() + 0.0 * lss.sum()).backward()
            return
        if args.stat == "tdpo":
            assert h_ref is not None
            if args.impl == "naive":
                kl = token_kl(h[:, :-1] @ w.T, h_ref[:, :-1] @ w.T.detach())
            else:
                kl = chunked_head_kl(
                    h[:, :-1].reshape(-1, d), h_ref[:, :-1].reshape(-1, d), w, chunk_size=args.chunk_size
                )
            kl.sum().backward()
            return
        if args.impl == "naive":
            logits = h[:, :-1] @ w.T
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            total = lp.sum()
        else:
            flat = h[:, :-1].reshape(-1, d)
            lp = chunked_head_logps(flat, w, y, chunk_size=args.chunk_size)
            total = lp.sum()
        total.backward()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step()
    cold = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for _ in range(max(args.iters - 1, 0)):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "peak_delta_mib": (after - before) / 1024.0,  # ru_maxrss is in KiB on Linux
        "time_s": statistics.median(times) if times else cold,
        "cpu_s": statistics.median(cpu) if cpu else float("nan"),
        "cold_time_s": cold,
    }


def _run_one(args: argparse.Namespace, impl: str, vocab: int, chunk: int) -> dict[str, float]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_worker",
        "--impl",
        impl,
        "--vocab",
        str(vocab),
        "--rows",
        str(args.rows),
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--chunk-size",
        str(chunk),
        "--iters",
        str(args.iters),
        "--threads",
        str(args.threads),
        "--head-grad",
        args.head_grad[0],
        "--stat",
        args.stat[0],
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 128000], help="vocabulary sizes")
    p.add_argument("--rows", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--hidden", type=int, default=576, help="hidden size (default 576, as SmolLM2-135M)")
    p.add_argument(
        "--chunk-size", type=int, nargs="+", default=None, help="chunk sizes (default: the library's)"
    )
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds, one subprocess each (default 2)")
    p.add_argument(
        "--iters", type=int, default=2, help="steps per subprocess; the first is memory, rest timed"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--head-grad",
        nargs="+",
        choices=["frozen", "trainable"],
        default=["frozen"],
        help="head weight frozen (LoRA case) and/or trainable (tied/full fine-tuning)",
    )
    p.add_argument(
        "--stat",
        nargs="+",
        choices=["logp", "wpo", "tdpo"],
        default=["logp"],
        help="what the step computes: log-probs; + WPO's normaliser; TDPO's per-token KL",
    )
    p.add_argument("--json", type=str, default=None, help="write the figures to this path")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["naive", "chunked"], default="naive", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        args.vocab = args.vocab[0]
        args.chunk_size = args.chunk_size[0]
        args.head_grad = args.head_grad[0]
        args.stat = args.stat[0]
        print(json.dumps(_worker(args)))
        return 0

    from prefopt.logprobs import DEFAULT_CHUNK_SIZE

    chunks = args.chunk_size or [DEFAULT_CHUNK_SIZE]
    n_tok = args.rows * (args.tokens - 1)
    results = []
    print(
        f"rows={args.rows} tokens={args.tokens} hidden={args.hidden} threads={args.threads} rounds={args.rounds}"
    )
    print(
        f"{'stat':>5} {'head':>9} {'vocab':>7} {'chunk':>6} {'naive MiB':>10} {'chunk MiB':>10} {'mem ratio':>9} "
        f"{'naive s':>8} {'chunk s':>8} {'time ratio':>10} {'naive cpu':>9} {'chunk cpu':>9} {'cpu ratio':>9}"
    )
    for stat, head_grad in ((st, hg) for st in args.stat for hg in args.head_grad):
        for vocab in args.vocab:
            for chunk in chunks:
                runs: dict[str, list[dict[str, float]]] = {"naive": [], "chunked": []}
                a = argparse.Namespace(**{**vars(args), "head_grad": [head_grad], "stat": [stat]})
                for _ in range(args.rounds):
                    for impl in ("naive", "chunked"):  # alternate A/B/A/B
                        runs[impl].append(_run_one(a, impl, vocab, chunk))
                med = {
                    impl: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for impl, rs in runs.items()
                }
                row = {
                    "stat": stat,
                    "head": head_grad,
                    "vocab": vocab,
                    "chunk_size": chunk,
                    "tokens_scored": n_tok,
                    "fp32_logits_mib": n_tok * vocab * 4 / 2**20,
                    "naive": med["naive"],
                    "chunked": med["chunked"],
                    "raw": runs,
                    "mem_ratio": med["chunked"]["peak_delta_mib"] / med["naive"]["peak_delta_mib"],
                    "time_ratio": med["chunked"]["time_s"] / med["naive"]["time_s"],
                    "cpu_ratio": med["chunked"]["cpu_s"] / med["naive"]["cpu_s"],
                }
                results.append(row)
                print(
                    f"{stat:>5} {head_grad:>9} {vocab:>7} {chunk:>6} {med['naive']['peak_delta_mib']:>10.0f} "
                    f"{med['chunked']['peak_delta_mib']:>10.0f} {row['mem_ratio']:>9.3f} "
                    f"{med['naive']['time_s']:>8.2f} {med['chunked']['time_s']:>8.2f} {row['time_ratio']:>10.3f} "
                    f"{med['naive']['cpu_s']:>9.2f} {med['chunked']['cpu_s']:>9.2f} {row['cpu_ratio']:>9.3f}",
                    flush=True,
                )
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "torch": torch.__version__,
            "rows": args.rows,
            "tokens": args.tokens,
            "hidden": args.hidden,
            "threads": args.threads,
            "rounds": args.rounds,
            "iters": args.iters,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
