"""``fastrun cache ...`` and ``fastrun show``: listing, showing, bundling, verifying and clearing the cache."""
from __future__ import annotations

import sys

import click

from fastrun.cli.options import Group, cache_option, interactive, json_option, parse_shape_sets, resolve_model, show_options
from fastrun.cli.output import cut, emit_json, ms, print_plan, shapes_cell


def show_plans(model, example, shapes, fmt, json_to, cache_dir) -> None:
    from fastrun.workflows import cachetool
    from fastrun.system import fingerprint as fp
    from fastrun.store.cache import Caches
    from fastrun.errors import FastrunError

    path = resolve_model(model, example)
    caches = Caches(cache_dir, writable=False)
    try:
        everything = cachetool.model_plans(caches, path)
        sets = parse_shape_sets(shapes)
        plans = [p for p in everything if not sets or any(
            all(list(p.input_shapes.get(k, ())) == list(v) for k, v in s.items()) for s in sets)]
    finally:
        caches.close()
    if not plans:
        where = f"on fingerprint {fp.fingerprint()} in {caches.root}"
        if everything:
            cached = "; ".join(shapes_cell(p.input_shapes) for p in everything)
            raise FastrunError(f"no cached plan for {path} with shapes {', '.join(shapes)} {where} (cached: {cached})")
        raise FastrunError(f"no cached plan for {path} {where}; run `fastrun warmup {path}`")
    if json_to or fmt == "json":
        emit_json([p.to_json() for p in plans], json_to or "-")
        return
    for i, plan in enumerate(plans):
        if i:
            click.echo("")
        print_plan(plan, cachetool.plan_problem(plan, fp.fingerprint()))


@click.group(cls=Group)
def cache() -> None:
    """Inspect and manage the plan and timing cache."""


@cache.command("ls")
@cache_option
@json_option("The listing")
def cache_ls(cache_dir, json_to) -> None:
    """Plans and timing counts per fingerprint."""
    from dataclasses import asdict

    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir, writable=False)
    try:
        infos = cachetool.listing(caches)
    finally:
        caches.close()
    if json_to:
        emit_json({"cache": str(caches.root), "fingerprints": [asdict(i) for i in infos]}, json_to)
        return
    if not infos:
        click.echo(f"cache {caches.root} is empty")
        return
    click.echo(f"cache {caches.root}")
    for info in infos:
        here = " (this machine)" if info.this_machine else ""
        click.echo(f"fingerprint {info.fingerprint}{here}: {len(info.plans)} plan(s), {info.timings} timing(s), "
                   f"{info.programs} compiled program(s) ({info.program_bytes / 1e6:.1f} MB)")
        for p in info.plans:
            note = f"  not served: {p.problem}" if p.problem else ("" if p.program else "  (no compiled program)")
            policy = "loaded" if p.measured_under_load else p.policy
            click.echo(f"  {cut(p.model_name, 18):<18} {p.model_hash[:10]:<10} {cut(p.shapes, 24):<24} "
                       f"{policy:<9} {cut(p.runs, 16):<16} {ms(p.predicted_ms):>8} ms{note}"[:100])
    if any(p.measured_under_load for info in infos for p in info.plans):
        click.echo("loaded: measured under load (other processes used the cores); `fastrun warmup` measures it again")


@cache.command("show")
@show_options
def cache_show(model, example, shapes, fmt, json_to, cache_dir) -> None:
    """Print the cached plan of MODEL (every cached shape set unless --shape)."""
    show_plans(model, example, shapes, fmt, json_to, cache_dir)


@cache.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--fingerprint", "fingerprint_id", default=None, help="Export this fingerprint (default: this machine's).")
@cache_option
def cache_export(file, fingerprint_id, cache_dir) -> None:
    """Write the plans and timings of one fingerprint to a portable JSON bundle.

    Compiled programs stay out (binary, derived): run `fastrun warmup` where it is imported."""
    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir, writable=False)
    try:
        s = cachetool.export_bundle(caches, file, fingerprint_id)
    finally:
        caches.close()
    click.echo(f"wrote {s.path}: {s.plans} plan(s), {s.timings} timing(s) of fingerprint {s.fingerprint}"
               + (f", {s.skipped} unreadable entries left out" if s.skipped else ""))


@cache.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Import a bundle of another fingerprint (kept under its own).")
@cache_option
def cache_import(file, force, cache_dir) -> None:
    """Store the entries of a bundle written by `fastrun cache export`."""
    from fastrun.workflows import cachetool
    from fastrun.system import fingerprint as fp
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir)
    try:
        s = cachetool.import_bundle(caches, file, force=force)
    finally:
        caches.close()
    click.echo(f"imported {s.plans} plan(s), {s.timings} timing(s) of fingerprint {s.fingerprint}"
               + (f"; {s.skipped} invalid entries skipped" if s.skipped else ""))
    if s.fingerprint != fp.fingerprint():
        click.echo(f"note: this machine is {fp.fingerprint()}; they serve only where the fingerprint is {s.fingerprint}")


@cache.command("verify")
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--fix", is_flag=True, help="Delete the stale and corrupt entries.")
@cache_option
def cache_verify(models, fix, cache_dir) -> None:
    """Check every entry (schema, plan keys, versions, implementations); with MODELS (files or
    directories), plans of any other model count as stale. Exit status 1 if problems remain."""
    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir, writable=fix)
    try:
        report = cachetool.verify(caches, models, fix=fix)
    finally:
        caches.close()
    for p in report.problems:
        click.echo(f"{p.kind:<7} {p.store:<7} {cut(p.key, 48):<48} {p.reason}{'  (removed)' if p.fixed else ''}")
    remaining = [p for p in report.problems if not p.fixed]
    click.echo(f"checked {report.plans} plan(s), {report.timings} timing(s) and {report.programs} program(s): "
               f"{len(report.problems)} problem(s)"
               + (f", {len(report.problems) - len(remaining)} removed" if fix else ""))
    if remaining:
        sys.exit(1)


@cache.command("clear")
@click.option("--fingerprint", "fingerprint_id", default=None, help="Only the entries of this fingerprint.")
@click.option("-y", "--yes", is_flag=True, help="Delete everything without asking (for scripts).")
@cache_option
def cache_clear(fingerprint_id, yes, cache_dir) -> None:
    """Delete cached plans, timings and compiled programs (all of them, or one fingerprint's).

    Deleting everything asks first; --yes answers for scripts (without a terminal, or under CI,
    it is required)."""
    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches
    from fastrun.store.keys import default_cache_dir
    from fastrun.errors import FastrunError

    if not fingerprint_id and not yes:
        root = cache_dir or default_cache_dir()
        if not interactive():
            raise FastrunError(f"`fastrun cache clear` deletes every plan, timing and program in {root}: "
                               "pass --yes to confirm (no terminal to ask)")
        if not click.confirm(f"delete every plan, timing and compiled program in {root}?", default=False):
            click.echo("nothing deleted")
            return
    caches = Caches(cache_dir)
    try:
        counts = cachetool.clear(caches, fingerprint_id)
    finally:
        caches.close()
    click.echo(f"removed {counts['plans']} plan(s), {counts['timings']} timing(s) and {counts['programs']} program(s)"
               + (f" of fingerprint {fingerprint_id}" if fingerprint_id else "") + f" from {caches.root}")
