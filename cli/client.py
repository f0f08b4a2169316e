"""Client commands of `layerscope`: submit, status, wait, results, gate, catalog (through the Python
client, `layerscope.Client`, so the CLI and the SDK read answers and errors the same way)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml

from cli.progress import display as progress_display
from layerscope import Client, LayerscopeError
from layerscope.errors import ApiError

ServerOpt = typer.Option("http://127.0.0.1:8000", "--server", envvar="LAYERSCOPE_SERVER", help="Service base URL.")
KeyOpt = typer.Option(None, "--key", envvar="LAYERSCOPE_API_KEY", help="API key (Bearer).")


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


def _fail(exc: LayerscopeError, code: int = 2) -> None:
    if isinstance(exc, ApiError):
        fields = "".join(f"\n  {e.field}: {e.message}" for e in exc.errors)
        typer.echo(f"error: {exc.status}: {exc.detail}{fields}", err=True)
    else:
        typer.echo(f"error: {exc}", err=True)
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
        wait: bool = typer.Option(False, "--wait", help="Wait for it to end, showing progress (as `wait`)."),
        timeout: float = typer.Option(3600, help="With --wait: give up after this many seconds (exit 2)."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Submit an analysis; prints its id (with --wait, once it ended: exit codes as `wait`)."""
        spec = load_spec(spec_file, model, dataset, stages, limit, label)
        client = Client(server, key)
        try:
            job = client.submit(spec, idempotency_key=idempotency_key)
        except LayerscopeError as exc:
            _fail(exc)
        if wait:
            typer.echo(f"submitted {job.id}", err=True)
            wait_for(client, job.id, timeout, 1.0)
            return
        typer.echo(job.id)

    @app.command()
    def catalog(
        as_json: bool = typer.Option(False, "--json", help="The whole catalog as JSON (stage options included)."),
        server: str = ServerOpt, key: str = KeyOpt,
    ) -> None:
        """List what a spec can name: built-in models and datasets, stages, scorers, tasks, detectors."""
        try:
            cat = Client(server, key).catalog()
        except LayerscopeError as exc:
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
            typer.echo(Client(server, key).get(analysis_id).model_dump_json(indent=2))
        except LayerscopeError as exc:
            _fail(exc)

    @app.command()
    def wait(
        analysis_id: str,
        timeout: float = typer.Option(3600, help="Give up after this many seconds (exit 2)."),
        interval: float = typer.Option(1.0, help="Seconds between polls."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Wait for an analysis to end, showing stage, progress and ETA (a progress bar on a terminal, a line
        per change otherwise). Exit 0 SUCCEEDED, 1 FAILED/CANCELLED, 2 timeout or error."""
        wait_for(Client(server, key), analysis_id, timeout, interval)

    @app.command()
    def results(
        analysis_id: str,
        table: str = typer.Option("layers", help="layers or metrics."),
        stage: str = typer.Option(None, help="Only this stage."),
        as_json: bool = typer.Option(False, "--json", help="Raw JSON."),
        as_csv: bool = typer.Option(False, "--csv", help="CSV."),
        columns: str = typer.Option(None, help="Comma-separated columns to show (default: all)."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Print the per-layer or metrics table of an analysis."""
        if table not in ("layers", "metrics"):
            raise typer.BadParameter("table must be layers or metrics")
        client = Client(server, key)
        try:
            if as_csv:
                typer.echo(client.table_csv(analysis_id, table, stage=stage), nl=False)
                return
            rows = client.layers(analysis_id, stage=stage) if table == "layers" else client.metrics(analysis_id, stage=stage)
        except LayerscopeError as exc:
            _fail(exc)
        if as_json:
            typer.echo(json.dumps({"analysis_id": analysis_id, "items": [r.model_dump() for r in rows]}, indent=2))
            return
        if table == "layers":
            flat = [{"stage": r.stage, "scorer": r.scorer, "layer": r.layer, **r.values} for r in rows]
        else:
            flat = [r.model_dump() for r in rows]
        typer.echo(render_table(flat, _columns(columns)))

    @app.command("list")
    def list_(
        state: str = typer.Option(None, help="Only this state (QUEUED, RUNNING, SUCCEEDED, FAILED, ...)."),
        model: str = typer.Option(None, help="Only this model name."),
        label: list[str] = typer.Option([], help="key=value label filter (repeatable)."),
        limit: int = typer.Option(20, min=1, max=200, help="How many, newest first."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """List analyses, newest first: id, state, stage/progress, model, created."""
        try:
            page = Client(server, key).list(state=state, model=model, label=label or None, page_size=limit)
        except LayerscopeError as exc:
            _fail(exc)
        typer.echo(render_table([
            {"id": a.id, "state": a.state.value, "stages": ",".join(a.spec.stages.requested()),
             "progress": f"{a.progress.stage or '-'} {a.progress.done}/{a.progress.total}",
             "model": a.spec.model.name, "created": a.created_at.strftime("%Y-%m-%d %H:%M:%S")}
            for a in page.items
        ]))

    @app.command()
    def cancel(analysis_id: str, server: str = ServerOpt, key: str = KeyOpt) -> None:
        """Cancel an analysis: a queued one ends CANCELLED at once, a running one stops between batches."""
        try:
            job = Client(server, key).cancel(analysis_id)
        except LayerscopeError as exc:
            _fail(exc)
        typer.echo(f"{job.id} {job.state.value}")

    @app.command()
    def artifacts(
        analysis_id: str,
        download: str = typer.Option(None, help="Name of the artifact to download."),
        output: Path = typer.Option(None, "-o", "--output", help="Where to write it (default: its name)."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """List an analysis's artifacts (plots, exports, patches), or download one."""
        client = Client(server, key)
        try:
            if download:
                target = output or Path(Path(download).name)
                target.write_bytes(client.download(analysis_id, download))
                typer.echo(str(target))
                return
            items = client.artifacts(analysis_id)
        except LayerscopeError as exc:
            _fail(exc)
        typer.echo(render_table([{"name": a.name, "stage": a.stage, "media_type": a.media_type, "bytes": a.size}
                                 for a in items]))

    @app.command()
    def answers(
        analysis_id: str,
        stage: str = typer.Option(None, help="hallucination or mitigate."),
        scope: str = typer.Option(None, help='e.g. "variant=eavss".'),
        split: str = typer.Option(None, help="train or test."),
        correct: bool = typer.Option(None, "--correct/--wrong", help="Only right (or only wrong) answers."),
        as_csv: bool = typer.Option(False, "--csv", help="CSV: every column, every page, the filters applied."),
        columns: str = typer.Option("id,split,correct,question,answer,gold", help="Comma-separated columns."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Print the per-answer rows of the hallucination and mitigate stages."""
        client = Client(server, key)
        filters: dict[str, Any] = {"stage": stage, "scope": scope, "split": split, "correct": correct}
        try:
            if as_csv:
                typer.echo(client.answers_csv(analysis_id, **filters), nl=False)
                return
            rows = client.answers(analysis_id, **filters)
        except LayerscopeError as exc:
            _fail(exc)
        flat = [{**r, "gold": "; ".join(r["gold"]), "question": _clip(r["question"]), "answer": _clip(r["answer"])}
                for r in rows]
        typer.echo(render_table(flat, _columns(columns)))

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
        try:
            verdict = Client(server, key).gate(analysis_id, policy, version=version)
        except LayerscopeError as exc:
            _fail(exc)
        typer.echo(json.dumps(verdict, indent=2) if as_json else render_verdict(verdict))
        raise typer.Exit(0 if verdict["passed"] else 1)


def wait_for(client: Client, analysis_id: str, timeout: float, interval: float) -> None:
    """Poll until the analysis ends, showing its progress; print its id on success, exit 1 when it
    failed or was cancelled, 2 on a timeout or an error."""
    show = progress_display()
    try:
        job = client.wait(analysis_id, timeout=timeout, interval=interval, on_progress=show)
    except TimeoutError as exc:
        show.close()
        typer.echo(f"timed out: {exc}", err=True)
        raise typer.Exit(2) from None
    except LayerscopeError as exc:
        show.close()
        _fail(exc)
    show.close()
    if job.state.value != "SUCCEEDED":
        error = f"{job.error.type} {job.error.detail}" if job.error else ""
        typer.echo(f"{job.state.value}: {error}".strip(), err=True)
        raise typer.Exit(1)
    typer.echo(job.id)


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


def _columns(option: str | None) -> list[str] | None:
    return [c.strip() for c in option.split(",") if c.strip()] if option else None


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as aligned columns (all columns seen, or the ones asked for, in that order)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    else:
        unknown = [c for c in columns if not any(c in r for r in rows)]
        if unknown:
            known = list(dict.fromkeys(k for r in rows for k in r))
            raise typer.BadParameter(f"unknown column(s) {', '.join(unknown)}; columns are {', '.join(known)}")

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
