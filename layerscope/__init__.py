"""Python client of the layerscope service: `from layerscope import Client` (or `AsyncClient`)."""

from layerscope import errors
from layerscope.client import AsyncClient, Client, Table
from layerscope.errors import (
    AnalysisFailed,
    ApiError,
    ConnectionFailed,
    Forbidden,
    InvalidRequest,
    LayerscopeError,
    NotFound,
    RateLimited,
    Unauthorized,
)

__all__ = [
    "AnalysisFailed", "ApiError", "AsyncClient", "Client", "ConnectionFailed", "Forbidden", "InvalidRequest",
    "LayerscopeError", "NotFound", "RateLimited", "Table", "Unauthorized", "errors",
]
