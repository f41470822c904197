"""`afd bench ...`: each benchmark module in benchmarks/ provides its own typer command function."""

from __future__ import annotations

import typer

from benchmarks import engine

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: engine, transport, serve.")
bench_app.command("engine")(engine.command)
