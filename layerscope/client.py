"""The Python client of the layerscope API, sync (`Client`) and async (`AsyncClient`).

    from layerscope import Client
    with Client("http://127.0.0.1:8000", key) as ls:
        job = ls.submit({"model": {"name": "smollm2-135m"},
                         "dataset": {"name": "chatterbot-conversations", "limit": 32},
                         "stages": {"avss": {}}})
        job = ls.wait(job.id, on_progress=print)        # typed AnalysisOut
        frame = ls.layers(job.id, stage="avss").to_frame()  # pandas, when installed

Every error is a typed exception carrying the problem's fields (`layerscope.errors`). Both
clients share one definition of each operation (`_Operations`): an operation says which
request to send and how to read the answer; `Client` sends it with httpx's blocking client,
`AsyncClient` with its async one, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from app.schemas import AnalysisOut, AnalysisPage, ArtifactList, LayerTable, MetricTable
from layerscope import errors

T = TypeVar("T")
ProgressCallback = Callable[[AnalysisOut], None]


@dataclass
class Call(Generic[T]):
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None


def _model(kind: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda resp: kind.model_validate(resp.json())


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text
    raise errors.from_response(resp.status_code, body, resp.headers)


def _spec_dict(spec: Any) -> Any:
    return spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, BaseModel) else spec


class Table(list[T]):
    """Rows of a result table; `to_frame()` gives a pandas DataFrame (values flattened into columns)."""

    def to_frame(self) -> Any:
        import pandas as pd  # optional: only when asked for

        rows = []
        for row in self:
            data = row.model_dump() if isinstance(row, BaseModel) else dict(row)  # type: ignore[call-overload]
            nested = {k: data.pop(k) for k in ("values", "confidence") if isinstance(data.get(k), dict)}
            for prefix, values in nested.items():
                data.update(values if prefix == "values" else {f"{prefix}.{k}": v for k, v in values.items()})
            rows.append(data)
        return pd.DataFrame(rows)


class _Operations:
    """Each public method returns `self._run(Call)`: a value for `Client`, an awaitable for `AsyncClient`."""

    def _run(self, call: Call[Any]) -> Any:  # pragma: no cover - defined by the two clients
        raise NotImplementedError

    def submit(self, spec: Any, *, idempotency_key: str | None = None) -> Any:
        """Submit an analysis (a dict or `app.schemas.AnalysisSpec`); the stored job (QUEUED)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._run(Call("POST", "/v1/analyses", _model(AnalysisOut), json=_spec_dict(spec), headers=headers))

    def get(self, analysis_id: str) -> Any:
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}", _model(AnalysisOut)))

    def list(self, *, state: str | None = None, model: str | None = None, label: list[str] | None = None,
             page_size: int = 50, page_token: str | None = None) -> Any:
        params = {"state": state, "model": model, "label": label, "page_size": page_size, "page_token": page_token}
        return self._run(Call("GET", "/v1/analyses", _model(AnalysisPage),
                              params={k: v for k, v in params.items() if v is not None}))

    def cancel(self, analysis_id: str) -> Any:
        return self._run(Call("POST", f"/v1/analyses/{analysis_id}/cancel", _model(AnalysisOut)))

    def delete(self, analysis_id: str) -> Any:
        return self._run(Call("DELETE", f"/v1/analyses/{analysis_id}", lambda resp: None))

    def layers(self, analysis_id: str, *, stage: str | None = None, scorer: str | None = None) -> Any:
        """Per-layer rows as a `Table` of `LayerRowOut`."""
        params = {k: v for k, v in {"stage": stage, "scorer": scorer}.items() if v}
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}/layers",
                              lambda r: Table(LayerTable.model_validate(r.json()).items), params=params))

    def metrics(self, analysis_id: str, *, stage: str | None = None) -> Any:
        """Evaluation metrics (value, 95% interval, N) as a `Table` of `MetricOut`."""
        params = {"stage": stage} if stage else {}
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}/metrics",
                              lambda r: Table(MetricTable.model_validate(r.json()).items), params=params))

    def table_csv(self, analysis_id: str, table: str, *, stage: str | None = None) -> Any:
        """The `layers`, `metrics` or `answers` table as CSV text (`GET .../<table>.csv`)."""
        if table not in ("layers", "metrics", "answers"):
            raise ValueError(f"table must be layers, metrics or answers, not {table!r}")
        params = {"stage": stage} if stage else {}
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}/{table}.csv", lambda r: r.text, params=params))

    def answers_page(self, analysis_id: str, *, page_token: str | None = None, page_size: int = 200,
                     **filters: Any) -> Any:
        """One page of per-answer rows: {"items": [...], "next_page_token": ...} (see `answers`)."""
        params = _page_params(filters, page_size, page_token)
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}/answers", lambda r: r.json(), params=params))

    def answers_csv_page(self, analysis_id: str, *, page_token: str | None = None, page_size: int = 1000,
                         **filters: Any) -> Any:
        """One page of `GET .../answers.csv`: the response (CSV text, the next token in `Next-Page-Token`)."""
        params = _page_params(filters, page_size, page_token)
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}/answers.csv", lambda r: r, params=params))

    def artifacts(self, analysis_id: str) -> Any:
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}/artifacts",
                              lambda r: ArtifactList.model_validate(r.json()).items))

    def download(self, analysis_id: str, name: str) -> Any:
        """An artifact's bytes."""
        return self._run(Call("GET", f"/v1/analyses/{analysis_id}/artifacts/{name}", lambda r: r.content))

    def gate(self, analysis_id: str, policy: str, *, version: int | None = None) -> Any:
        """Evaluate a gate policy; the verdict as a dict (`passed`, `rules` with reasons)."""
        params: dict[str, Any] = {"policy": policy, **({"version": version} if version else {})}
        return self._run(Call("POST", f"/v1/analyses/{analysis_id}/gate", lambda r: r.json(), params=params))

    def catalog(self) -> Any:
        return self._run(Call("GET", "/v1/catalog", lambda r: r.json()))

    def policies(self) -> Any:
        """Every gate policy of the project (latest versions), as dicts."""
        return self._run(Call("GET", "/v1/gates", lambda r: r.json()))

    def policy(self, name: str, *, version: int | None = None) -> Any:
        """One gate policy (the latest version, or `version`)."""
        params = {"version": version} if version else None
        return self._run(Call("GET", f"/v1/gates/{name}", lambda r: r.json(), params=params))

    def policy_versions(self, name: str) -> Any:
        return self._run(Call("GET", f"/v1/gates/{name}/versions", lambda r: r.json()))

    def save_policy(self, name: str, rules: Sequence[str], *, description: str | None = None) -> Any:
        """Create the policy or add a version (unchanged rules and description: the latest, as it is)."""
        body = {"rules": list(rules), **({"description": description} if description is not None else {})}
        return self._run(Call("PUT", f"/v1/gates/{name}", lambda r: r.json(), json=body))


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


_ANSWERS = TypeAdapter(list[dict[str, Any]])


class Client(_Operations):
    """Blocking client. `server` is the base URL, `key` an API key."""

    def __init__(self, server: str = "http://127.0.0.1:8000", key: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=_headers(key), timeout=timeout,
                                 transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _run(self, call: Call[Any]) -> Any:
        try:
            resp = self.http.request(call.method, call.path, params=call.params, json=call.json, headers=call.headers)
        except httpx.TransportError as exc:
            raise errors.ConnectionFailed(f"cannot reach {self.http.base_url}: {exc}") from None
        _raise_for(resp)
        return call.read(resp)

    def answers(self, analysis_id: str, **filters: Any) -> Table[dict[str, Any]]:
        """Every per-answer row (all pages), filtered by `stage`, `scope`, `split`, `correct`."""
        return Table(self.iter_answers(analysis_id, **filters))

    def answers_csv(self, analysis_id: str, *, page_size: int = 1000, **filters: Any) -> str:
        """Every per-answer row (all pages of `GET .../answers.csv`, one header), filtered as `answers`."""
        parts: list[str] = []
        token = None
        while True:
            page = self.answers_csv_page(analysis_id, page_token=token, page_size=page_size, **filters)
            token = _add_csv_page(parts, page)
            if not token:
                return "".join(parts)

    def iter_answers(self, analysis_id: str, **filters: Any) -> Iterator[dict[str, Any]]:
        token = None
        while True:
            page = self.answers_page(analysis_id, page_token=token, **filters)
            yield from _ANSWERS.validate_python(page["items"])
            token = page.get("next_page_token")
            if not token:
                return

    def wait(self, analysis_id: str, *, timeout: float = 3600, interval: float = 1.0,
             on_progress: ProgressCallback | None = None, raise_on_failure: bool = False) -> AnalysisOut:
        """Poll until the analysis ends; `on_progress(job)` on every change of state or progress.
        TimeoutError after `timeout` seconds; a 429 waits its Retry-After."""
        deadline = time.monotonic() + timeout
        seen: tuple[Any, ...] | None = None
        while True:
            try:
                job = self.get(analysis_id)
            except errors.RateLimited as exc:
                time.sleep(exc.retry_after or interval)
                continue
            seen = _report(job, seen, on_progress)
            if job.state.finished:
                return _finished(job, raise_on_failure)
            if time.monotonic() + interval > deadline:
                raise TimeoutError(f"analysis {analysis_id} still {job.state.value} after {timeout:g} s")
            time.sleep(interval)


class AsyncClient(_Operations):
    """The same operations as `Client`, awaited: `job = await AsyncClient(server, key).submit(spec)`."""

    def __init__(self, server: str = "http://127.0.0.1:8000", key: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.http = httpx.AsyncClient(base_url=server.rstrip("/"), headers=_headers(key), timeout=timeout,
                                      transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _run(self, call: Call[Any]) -> Any:
        try:
            resp = await self.http.request(call.method, call.path, params=call.params, json=call.json,
                                           headers=call.headers)
        except httpx.TransportError as exc:
            raise errors.ConnectionFailed(f"cannot reach {self.http.base_url}: {exc}") from None
        _raise_for(resp)
        return call.read(resp)

    async def answers(self, analysis_id: str, **filters: Any) -> Table[dict[str, Any]]:
        """Every per-answer row (all pages), filtered by `stage`, `scope`, `split`, `correct`."""
        return Table([row async for row in self.iter_answers(analysis_id, **filters)])

    async def answers_csv(self, analysis_id: str, *, page_size: int = 1000, **filters: Any) -> str:
        """Every per-answer row (all pages of `GET .../answers.csv`, one header), filtered as `answers`."""
        parts: list[str] = []
        token = None
        while True:
            page = await self.answers_csv_page(analysis_id, page_token=token, page_size=page_size, **filters)
            token = _add_csv_page(parts, page)
            if not token:
                return "".join(parts)

    async def iter_answers(self, analysis_id: str, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        token = None
        while True:
            page = await self.answers_page(analysis_id, page_token=token, **filters)
            for row in _ANSWERS.validate_python(page["items"]):
                yield row
            token = page.get("next_page_token")
            if not token:
                return

    async def wait(self, analysis_id: str, *, timeout: float = 3600, interval: float = 1.0,
                   on_progress: ProgressCallback | None = None, raise_on_failure: bool = False) -> AnalysisOut:
        deadline = time.monotonic() + timeout
        seen: tuple[Any, ...] | None = None
        while True:
            try:
                job = await self.get(analysis_id)
            except errors.RateLimited as exc:
                await asyncio.sleep(exc.retry_after or interval)
                continue
            seen = _report(job, seen, on_progress)
            if job.state.finished:
                return _finished(job, raise_on_failure)
            if time.monotonic() + interval > deadline:
                raise TimeoutError(f"analysis {analysis_id} still {job.state.value} after {timeout:g} s")
            await asyncio.sleep(interval)


def _report(job: AnalysisOut, seen: tuple[Any, ...] | None, on_progress: ProgressCallback | None) -> tuple[Any, ...]:
    now = (job.state, job.progress.stage, job.progress.done, job.progress.total)
    if on_progress is not None and now != seen:
        on_progress(job)
    return now


def _finished(job: AnalysisOut, raise_on_failure: bool) -> AnalysisOut:
    if raise_on_failure and job.state.value != "SUCCEEDED":
        raise errors.AnalysisFailed(job)
    return job


def _page_params(filters: dict[str, Any], page_size: int, page_token: str | None) -> dict[str, Any]:
    params = {**{k: v for k, v in filters.items() if v is not None}, "page_size": page_size}
    if page_token:
        params["page_token"] = page_token
    return params


def _add_csv_page(parts: list[str], page: httpx.Response) -> str | None:
    """Append a CSV page (its header only for the first) and return the next page's token."""
    text = page.text
    parts.append(text if not parts else text.split("\n", 1)[1] if "\n" in text else "")
    return page.headers.get("Next-Page-Token")
