"""A bare ``grpc.aio`` Recommender that answers every call with one canned response: the transport's limit.

``valuerank bench capacity`` runs it as a child process (``python -m serving.edge.canned``) and
measures its capacity beside the real server's, with the same load generator on the same cores.
The response has the real one's size: ``--k`` items, a path, a model version, timings and a
routing decision. It prints ``serving on HOST:PORT`` once bound and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import numpy as np

from serving.domain import Decision, Recommendation, Timings
from serving.edge.servicer import CannedRecommenderServicer, add_to_server


def canned_recommendation(k: int) -> Recommendation:
    """A response as the full path would give it for ``k`` items (fixed numbers, real sizes)."""
    return Recommendation(
        request_id="canned-0000000000",
        item_ids=np.arange(1000, 1000 + k, dtype=np.int64),
        scores=np.linspace(0.3, 0.1, k, dtype=np.float32),
        expected_values=np.linspace(3.0, 1.0, k),
        path="full",
        model_version="canned-000000000000",
        decision=Decision("full", "always_full", "fixed policy", 0.0, 0.0, 1.0),
        segment="ecommerce_recommendation/1",
        num_candidates=500,
        timings=Timings(1.0, 0.01, 2.0, 0.5, 3.5),
    )


async def serve(host: str, port: int, k: int) -> None:
    server = grpc.aio.server()
    add_to_server(CannedRecommenderServicer(canned_recommendation(k)), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.edge.canned", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: a free one)")
    parser.add_argument("--k", type=int, default=10, help="items in the canned response")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
