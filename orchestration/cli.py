"""The `afd` command line: one typer app composed from the launchers, node commands and benchmarks."""

from __future__ import annotations

import typer

from orchestration.bench_commands import bench_app
from orchestration.generate_command import generate
from orchestration.k8s.cli import k8s_app
from orchestration.node_commands import node_app
from orchestration.plan_command import plan_command
from orchestration.up_command import down, scale, status, up

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Attention-FFN disaggregated MoE serving.")
app.add_typer(bench_app, name="bench")
app.command()(generate)
app.add_typer(k8s_app, name="k8s")
app.add_typer(node_app, name="node")
app.command("plan")(plan_command)
for command in (up, scale, status, down):
    app.command()(command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
