"""`anomaly-vae models list|promote`: the MLflow model registry."""
from __future__ import annotations

import click

from ..errors import ModelNotFoundError
from .state import State, _fmt, pass_state


# ------------------------------------------------------------------ models
@click.group(short_help="List registered model versions; move aliases (champion).")
def models() -> None:
    """List registered model versions and move aliases (champion / challenger)."""


@models.command("list", short_help="All registered models, or the versions of model NAME.")
@click.argument("name", required=False)
@pass_state
def models_list(state: State, name: str | None) -> None:
    """List the versions of registered model NAME with aliases and metrics; without NAME,
    list every registered model with its latest version and aliases.

    \b
    Examples:
      anomaly-vae models list
      anomaly-vae models list demo-transactions
    """
    if name is None:
        _list_registered_models(state)
        return
    with state.muted():
        versions = state.registry().list_versions(name)
    if not versions:
        raise ModelNotFoundError(f"registered model '{name}' has no versions in store {state.resolved_uri}")
    for v in versions:
        aliases = ",".join(f"@{a}" for a in v.get("aliases") or []) or "-"
        metrics = " ".join(f"{k}={_fmt(m, 3)}" for k, m in sorted((v.get("metrics") or {}).items())
                           if k in ("auroc", "auprc", "fpr_at_threshold", "recall", "threshold"))
        created = str(v.get("created") or "")[:19].replace("T", " ")
        # the listing is this command's output, so it is printed even with --quiet
        click.echo(f"{name} v{v['version']:<4} {aliases:<24} run {v.get('run_id') or '-'}  {created}  "
                   f"{metrics}".rstrip())


@models.command("promote", short_help="Point alias ALIAS of model NAME at VERSION.")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.option("--alias", default="champion", show_default=True, help="Alias to point at VERSION.")
@pass_state
def models_promote(state: State, name: str, version: int, alias: str) -> None:
    """Point alias ALIAS of registered model NAME at VERSION.

    \b
    Examples:
      anomaly-vae models promote payments 3                 # -> @champion
      anomaly-vae models promote payments 4 --alias challenger
    """
    with state.muted():
        tracking = state.registry()
        known = {int(v["version"]) for v in tracking.list_versions(name)}
        if version not in known:
            raise ModelNotFoundError(f"registered model '{name}' has no version {version} in store "
                                     f"{state.resolved_uri}; versions: "
                                     f"{', '.join(map(str, sorted(known))) or 'none'}")
        before = tracking.get_alias_version(name, alias)
        tracking.set_alias(name, version, alias)
    was = f" (was version {before})" if before is not None and before != version else ""
    state.echo(f"{name}@{alias} -> version {version}{was}")


def _list_registered_models(state: State) -> None:
    """One line per registered model: name, latest version, aliases (printed even with --quiet)."""
    with state.muted():
        tracking = state.registry()                        # configures the store first
        found = tracking.list_models()
    if not found:
        state.echo(f"no registered models in store {state.resolved_uri}")
        state._store_echoed = True       # already named on this line
        return
    for m in found:
        latest = f"v{m['latest']}" if m["latest"] is not None else "-"
        aliases = " ".join(f"@{a}=v{v}" for a, v in sorted(m["aliases"].items())) or "-"
        click.echo(f"{m['name']:<24} latest {latest:<5} {aliases}")
