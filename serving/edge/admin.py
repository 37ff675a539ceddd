"""The Admin service: calls that change the server's state, behind a bearer token.

Every call needs the metadata ``authorization: Bearer <token>`` holding the token the server was
started with (``ServeConfig.admin_token``, best given as ``VALUERANK_ADMIN_TOKEN``), compared in
constant time (``hmac.compare_digest``) and never logged. A server without a token refuses every
admin call (PERMISSION_DENIED): an open admin port is never the default.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from protos.valuerank.v1 import recommender_pb2 as pb
from protos.valuerank.v1 import recommender_pb2_grpc as pb_grpc
from serving.edge.servicer import status_errors
from serving.errors import NotReady, PermissionDenied, Unauthenticated
from serving.reload import Prepared

ADMIN_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Admin"].full_name

Reload = Callable[[Path | None], Awaitable[tuple[Prepared, str]]]
"""Load and swap in a model folder (None: the served one again): what was swapped in, and the
version it replaced."""


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self.reload: Reload | None = None
        """Set by the server once it serves."""

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._token is None:
            raise PermissionDenied("admin calls are disabled: the server was started without an admin token")
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        scheme, _, given = str(header).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self._token):
            raise Unauthenticated(
                "admin calls need the metadata 'authorization: Bearer <the server's token>'"
            )

    @status_errors
    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        self._authorize(context)
        if self.reload is None:
            raise NotReady("the server is still loading")
        prepared, previous = await self.reload(Path(request.model_dir) if request.model_dir else None)
        return pb.ReloadModelResponse(
            model_version=prepared.version,
            previous_version=previous,
            load_seconds=prepared.load_s,
            steady_rss_bytes=prepared.steady_rss_bytes,
            peak_rss_bytes=prepared.peak_rss_bytes,
        )


def add_admin_to_server(servicer: AdminServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_AdminServicer_to_server(servicer, server)


def admin_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """An Admin stub for ``channel``, for clients that must not import protos."""
    return pb_grpc.AdminStub(channel)
