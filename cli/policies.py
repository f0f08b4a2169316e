"""`layerscope gate-policy`: list, show, validate and save gate policies (through the Python client;
`validate` parses the rules here, offline, with the same parser as the service)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml

from cli.client import KeyOpt, ServerOpt, _fail, render_table
from layerscope import Client, LayerscopeError

policy_app = typer.Typer(
    help="Gate policies: named, versioned rule lists that `layerscope gate` evaluates (rule language: README, "
         "'Gates').",
    no_args_is_help=True,
)


def read_rules(path: Path | None, rules: list[str]) -> tuple[list[str], str | None]:
    """Rules from a YAML/JSON file (a list, or a mapping with `rules` and an optional `description`)
    and from --rule options, in that order."""
    found: list[str] = []
    description = None
    if path is not None:
        data = yaml.safe_load(path.read_text()) or []
        if isinstance(data, dict):
            description = data.get("description")
            data = data.get("rules", [])
        if not isinstance(data, list) or not all(isinstance(r, str) for r in data):
            raise typer.BadParameter(f"{path} must hold a list of rules or a mapping with `rules: [...]`")
        found.extend(data)
    found.extend(rules)
    if not found:
        raise typer.BadParameter("give a rules file or at least one --rule")
    return found, description


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="gate-policy")

    @policy_app.command("list")
    def list_(server: str = ServerOpt, key: str = KeyOpt) -> None:
        """The project's gate policies (latest versions): name, version, rules, description."""
        try:
            items = Client(server, key).policies()
        except LayerscopeError as exc:
            _fail(exc)
        typer.echo(render_table([{"name": p["name"], "version": p["version"], "rules": len(p["rules"]),
                                  "description": p["description"] or ""} for p in items]))

    @policy_app.command("show")
    def show(
        name: str,
        version: int = typer.Option(None, help="This version (default: the latest)."),
        versions: bool = typer.Option(False, "--versions", help="Every version, oldest first."),
        as_json: bool = typer.Option(False, "--json", help="As JSON."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """One gate policy's rules (or every version of it)."""
        client = Client(server, key)
        try:
            shown: list[dict[str, Any]] = client.policy_versions(name) if versions else [client.policy(name, version=version)]
        except LayerscopeError as exc:
            _fail(exc)
        if as_json:
            typer.echo(json.dumps(shown if versions else shown[0], indent=2))
            return
        for p in shown:
            typer.echo(f"{p['name']} v{p['version']} ({p['created_at']}){': ' + p['description'] if p['description'] else ''}")
            for rule in p["rules"]:
                typer.echo(f"  {rule}")

    @policy_app.command("validate")
    def validate(
        rules_file: Path = typer.Argument(None, exists=True, dir_okay=False, help="Rules as YAML/JSON."),
        rule: list[str] = typer.Option([], "--rule", help="A rule (repeatable), e.g. 'pruning.avss.retained_pct >= 90'."),
    ) -> None:
        """Check that every rule parses, without a server. Exit 0 all valid, 2 otherwise (naming the rule)."""
        from app.gates import RuleIndexError, parse_rules

        texts, _ = read_rules(rules_file, rule)
        try:
            parse_rules(texts)
        except RuleIndexError as exc:
            typer.echo(f"invalid rule {exc.index} ({exc.text!r}): {exc.message}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"{len(texts)} rule(s) valid")

    @policy_app.command("save")
    def save(
        name: str,
        rules_file: Path = typer.Argument(None, exists=True, dir_okay=False, help="Rules as YAML/JSON."),
        rule: list[str] = typer.Option([], "--rule", help="A rule (repeatable)."),
        description: str = typer.Option(None, help="What the policy is for (overrides the file's)."),
        server: str = ServerOpt,
        key: str = KeyOpt,
    ) -> None:
        """Create a gate policy or save its next version (an admin key); unchanged rules keep the latest."""
        texts, from_file = read_rules(rules_file, rule)
        try:
            p = Client(server, key).save_policy(name, texts, description=description or from_file)
        except LayerscopeError as exc:
            _fail(exc)
        typer.echo(f"{p['name']} v{p['version']}: {len(p['rules'])} rule(s)")
