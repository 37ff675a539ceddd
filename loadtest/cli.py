"""The ``valuerank`` command: one entry point, one module per subcommand.

This is the composition root, so it lives in the top layer (``loadtest`` may import every
other package; nothing imports it). Each subcommand is a module with ``main(argv) -> int``,
imported only when that subcommand runs, so ``valuerank recommend`` does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys

# (words, module, summary); the longest matching prefix of argv wins.
COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("synth",), "dlrm.synth", "build the synthetic world's training, test and replay logs"),
    (("train",), "dlrm.train", "train the DLRM (world or --criteo TSV) and export an artifact"),
    (("index",), "embeddings.index_stage", "train the retrieval towers and build the Faiss index"),
    (("embeddings", "push"), "embeddings.push", "load embedding rows into Redis (the tier-2 store)"),
    (("serve",), "serving.commands.serve", "run the gRPC server"),
    (
        ("recommend",),
        "serving.commands.recommend",
        "one Recommend call against a server; prints it",
    ),
    (
        ("routing-stats",),
        "serving.commands.routing_stats",
        "per-segment revenue, lambda, budget of a server",
    ),
    (("demo",), "loadtest.demo", "build, train, index, serve and drive a burst of traffic, end to end"),
    (("loadtest",), "loadtest.live.command", "open-loop Recommend load from processes of its own, JSON"),
    (("replay",), "loadtest.replay", "offline replay of routing policies on the world's replay log"),
    (("bench", "scoring"), "loadtest.bench", "full scoring path vs TorchRec DLRM, JSON"),
    (
        ("bench", "precision"),
        "embeddings.precision_bench",
        "AUC, bytes, speed of fp32/fp16/int8 tables",
    ),
    (("bench", "redis"), "loadtest.bench_redis", "Redis embedding tier vs in-process, JSON"),
    (("bench", "serving"), "loadtest.bench_serving", "Recommend p99 with the Redis tier vs in-process, JSON"),
    (
        ("bench", "capacity"),
        "loadtest.live.capacity",
        "live capacity: bare transport vs always_full/cheap, JSON",
    ),
)


def usage() -> str:
    lines = ["usage: valuerank COMMAND [options]   (valuerank COMMAND --help for its options)", ""]
    for words, _, summary in COMMANDS:
        lines.append(f"  {' '.join(words):<18} {summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    for words, module, _ in sorted(COMMANDS, key=lambda c: -len(c[0])):
        if tuple(args[: len(words)]) == words:
            entry = importlib.import_module(module)
            return int(entry.main(args[len(words) :]))
    print(f"valuerank: unknown command {' '.join(args[:2])!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
