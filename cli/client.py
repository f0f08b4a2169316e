"""Client commands of `layerscope`: submit, status, wait, results (talk to a running service)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml

FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}

ServerOpt = typer.Option("http://127.0.0.1:8000", "--server", envvar="LAYERSCOPE_SERVER", help="Service base URL.")
KeyOpt = typer.Option(None, "--key", envvar="LAYERSCOPE_API_KEY", help="API key (Bearer).")


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Client:
    def __init__(self, server: str, key: str | None, timeout: float = 30):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
                detail = body.get("detail") or resp.text
            except ValueError:
                detail = resp.text
            raise ApiError(resp.status_code, f"{resp.status_code}: {detail}")
        return resp

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()


def load_spec(path: Path | None, model: str | None, dataset: str | None, stages: str | None,
              limit: int | None, labels: list[str]) -> dict[str, Any]:
    """A spec from a YAML/JSON file, with flags overriding or filling in."""
    spec: dict[str, Any] = {}
    if path is not None:
        spec = yaml.safe_load(path.read_text()) or {}
        if not isinstance(spec, dict):
            raise typer.BadParameter(f"{path} must hold a mapping (the analysis spec)")
    if model:
        spec.setdefault("model", {})["name"] = model
    if dataset:
        spec["dataset"] = {"name": dataset, **{k: v for k, v in spec.get("dataset", {}).items()
                                               if k not in ("name", "path", "rows", "hub")}}
    if limit is not None:
        spec.setdefault("dataset", {})["limit"] = limit
    if stages:
        spec["stages"] = {name.strip(): {} for name in stages.split(",") if name.strip()}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"label {item!r} must be key=value")
        spec.setdefault("labels", {})[key] = value
    return spec


def _fail(exc: ApiError, code: int = 2) -> None:
    typer.echo(f"error: {exc.detail}", err=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    @app.command()
    def submit(
        spec_file: Path = typer.Argument(None, exists=True, dir_okay=False, help="Spec as YAML or JSON."),
        model: str = typer.Option(None, help="Model name (overrides the file)."),
        dataset: str = typer.Option(None, help="Built-in dataset name (overrides the file)."),
        stages: str = typer.Option(None, help="Comma-separated stages with default options, e.g. avss."),
        limit: int = typer.Option(None, help="Examples to use."),
        label: list[str] = typer.Option([], help="key=value label (repeatable)."),
        idempotency_key: str = typer.Option(None, help="Same key + same spec returns the same job."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Submit an analysis; prints its id."""
        spec = load_spec(spec_file, model, dataset, stages, limit, label)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            job = Client(server, key).request("POST", "/v1/analyses", json=spec, headers=headers).json()
        except ApiError as exc:
            _fail(exc)
        typer.echo(job["id"])

    @app.command()
    def catalog(
        as_json: bool = typer.Option(False, "--json", help="The whole catalog as JSON (stage options included)."),
        server: str = ServerOpt, key: str = KeyOpt,
    ) -> None:
        """List what a spec can name: built-in models and datasets, stages, scorers, tasks, detectors."""
        try:
            cat = Client(server, key).get("/v1/catalog")
        except ApiError as exc:
            _fail(exc)
        if as_json:
            typer.echo(json.dumps(cat, indent=2))
            return
        for kind in ("models", "datasets", "stages"):
            typer.echo(f"{kind}:")
            for entry in cat[kind]:
                typer.echo(f"  {entry['name']:<26} {entry['description']}")
        for kind in ("scorers", "tasks", "detectors", "correctness_rules", "sites"):
            typer.echo(f"{kind}: {', '.join(cat[kind])}")

    @app.command()
    def status(analysis_id: str, server: str = ServerOpt, key: str = KeyOpt) -> None:
        """Print an analysis as JSON."""
        try:
            typer.echo(json.dumps(Client(server, key).get(f"/v1/analyses/{analysis_id}"), indent=2))
        except ApiError as exc:
            _fail(exc)

    @app.command()
    def wait(
        analysis_id: str,
        timeout: float = typer.Option(3600, help="Give up after this many seconds (exit 2)."),
        interval: float = typer.Option(1.0, help="Seconds between polls."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Wait for an analysis to end, showing stage, progress and ETA. Exit 0 SUCCEEDED, 1 FAILED/CANCELLED."""
        client = Client(server, key)
        deadline = time.monotonic() + timeout
        stage_started: dict[str, float] = {}
        job: dict[str, Any] = {}
        tty = sys.stderr.isatty()
        while time.monotonic() < deadline:
            try:
                job = client.get(f"/v1/analyses/{analysis_id}")
            except ApiError as exc:
                _fail(exc)
            p = job["progress"]
            stage_started.setdefault(p["stage"] or "", time.monotonic())
            line = f"{job['state']:<10} {p['stage'] or '-':<14} {p['done']}/{p['total']}"
            if p["total"] and 0 < p["done"] < p["total"]:
                elapsed = time.monotonic() - stage_started[p["stage"] or ""]
                line += f"  ETA {elapsed / p['done'] * (p['total'] - p['done']):.0f}s"
            typer.echo(("\r" + line.ljust(60)) if tty else line, err=True, nl=not tty)
            if job["state"] in FINISHED:
                break
            time.sleep(interval)
        else:
            typer.echo(f"\ntimed out; analysis still {job.get('state')}", err=True)
            raise typer.Exit(2)
        if tty:
            typer.echo("", err=True)
        if job["state"] != "SUCCEEDED":
            error = job.get("error") or {}
            typer.echo(f"{job['state']}: {error.get('type', '')} {error.get('detail', '')}".strip(), err=True)
            raise typer.Exit(1)
        typer.echo(job["id"])

    @app.command()
    def results(
        analysis_id: str,
        table: str = typer.Option("layers", help="layers or metrics."),
        stage: str = typer.Option(None, help="Only this stage."),
        as_json: bool = typer.Option(False, "--json", help="Raw JSON."),
        as_csv: bool = typer.Option(False, "--csv", help="CSV."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Print the per-layer or metrics table of an analysis."""
        if table not in ("layers", "metrics"):
            raise typer.BadParameter("table must be layers or metrics")
        client = Client(server, key)
        params = {"stage": stage} if stage else {}
        try:
            if as_csv:
                typer.echo(client.request("GET", f"/v1/analyses/{analysis_id}/{table}",
                                          params={**params, "format": "csv"}).text, nl=False)
                return
            data = client.get(f"/v1/analyses/{analysis_id}/{table}", params=params)
        except ApiError as exc:
            _fail(exc)
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        items = data["items"]
        if table == "layers":
            rows = [{"stage": r["stage"], "scorer": r["scorer"], "layer": r["layer"], **r["values"]} for r in items]
        else:
            rows = items
        typer.echo(render_table(rows))

    @app.command()
    def gate(
        analysis_id: str,
        policy: str = typer.Option(..., "--policy", help="Gate policy name."),
        version: int = typer.Option(None, help="Policy version (default: the latest)."),
        as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Evaluate a gate policy on a finished analysis. Exit 0 pass, 1 fail, 2 error (for CI pipelines)."""
        params: dict[str, Any] = {"policy": policy, **({"version": version} if version else {})}
        try:
            verdict = Client(server, key).request("POST", f"/v1/analyses/{analysis_id}/gate", params=params).json()
        except ApiError as exc:
            _fail(exc)
        typer.echo(json.dumps(verdict, indent=2) if as_json else render_verdict(verdict))
        raise typer.Exit(0 if verdict["passed"] else 1)


def render_verdict(verdict: dict[str, Any]) -> str:
    """The verdict as a table: every rule, what was observed, the threshold, the interval, why it failed."""

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [
        {
            "result": "PASS" if r["passed"] else "FAIL",
            "rule": r["rule"],
            "observed": num(r["observed"]),
            "threshold": f"{r['op']} {num(r['threshold'])}",
            "95% CI": f"[{num(r['ci_low'])}, {num(r['ci_high'])}]" if r["ci_low"] is not None else "-",
            "n": num(r["n"]),
            "note": r["reason"] or "",
        }
        for r in verdict["rules"]
    ]
    lines = []
    if rows:
        columns = list(rows[0])
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
        right = {"observed", "n"}

        def line(cells: dict[str, str]) -> str:
            return "  ".join(cells[c].rjust(widths[c]) if c in right else cells[c].ljust(widths[c])
                             for c in columns).rstrip()

        lines = [line({c: c for c in columns}), *(line(r) for r in rows)]
    if verdict.get("error"):
        lines.append(f"error: {verdict['error']}")
    ok = sum(r["passed"] for r in verdict["rules"])
    lines.append(
        f"{verdict['verdict'].upper()}: policy {verdict['policy']} v{verdict['policy_version'] or '-'} on "
        f"{verdict['analysis_id']} ({ok}/{len(verdict['rules'])} rules pass)"
    )
    return "\n".join(lines)


def render_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
