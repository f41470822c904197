"""`afd plan`: the best deployments of a hardware inventory for a model under a TPOT limit.

The search and the cost model live in afd/planning; this module parses the flags, prints the ranking (a rich
table, or JSON), draws the Pareto plot and writes plan.json for `afd up --plan` / `afd k8s render --plan`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from afd.builtin_model import builtin_model_dir
from afd.errors import AfdError, ConfigError
from afd.model_spec import ModelSpec
from afd.planning.calibration import Calibration, load_calibration
from afd.planning.catalog import Catalog, load_catalog
from afd.planning.cost_model import CostModel
from afd.planning.plan_file import Deployment, PlanFile, Pool
from afd.planning.planner import OBJECTIVES, Candidate, Plan, PlanRequest, parse_inventory, parse_prices, plan


def load_model_spec(model: Path) -> ModelSpec:
    """A checkpoint directory, or a bare HF config.json."""
    if model.is_dir():
        return ModelSpec.from_pretrained(model)
    if not model.is_file():
        raise ConfigError(f"--model {model}: no such directory or config.json")
    try:
        config = json.loads(model.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{model} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{model}: expected an HF config.json object")
    return ModelSpec.from_config(config)


def plan_file(result: Plan, catalog: Catalog, model: str, architecture: str, top: int) -> PlanFile:
    """The versioned plan.json of a planner result (its best candidate is the deployment)."""
    best = result.best.prediction
    mix = best.mix
    request = result.request

    def pool(kind: str, count: int) -> Pool:
        entry = catalog.kind(kind)
        return Pool(kind=kind, count=count, k8s_resource=entry.k8s_resource, k8s_product=entry.k8s_product)

    link = request.link if isinstance(request.link, str) else request.link.name
    return PlanFile(
        model=model,
        architecture=architecture,
        request={
            "inventory": dict(request.inventory),
            "slo_tpot_ms": request.slo_tpot_ms,
            "context_len": request.context_len,
            "link": link,
            "prices_usd_per_hour": dict(request.prices_usd_per_hour),
            "objective": request.objective,
        },
        deployment=Deployment(
            attention=pool(mix.attention_kind, mix.attention_count),
            ffn=pool(mix.ffn_kind, mix.ffn_count),
            microbatches=mix.microbatches,
            batch_per_attention_node=mix.batch_per_attention_node,
        ),
        prediction=result.best.to_dict(),
        rules=dict(result.rules),
        candidates=[c.to_dict() for c in result.candidates[:top]],
    )


def ranking_table(candidates: list[Candidate], title: str) -> Table:
    table = Table(title=title)
    for column, justify in (
        ("#", "right"), ("attention", "left"), ("FFN", "left"), ("m", "right"), ("batch", "right"),
        ("tok/s", "right"), ("tok/s/acc", "right"), ("Mtok/$", "right"), ("$/Mtok", "right"),
        ("TPOT ms", "right"), ("KV Mtok", "right"), ("exposed", "left"), ("x", "right"),
    ):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for rank, candidate in enumerate(candidates, 1):
        p = candidate.prediction
        mix = p.mix
        table.add_row(
            str(rank), f"{mix.attention_count} x {mix.attention_kind}", f"{mix.ffn_count} x {mix.ffn_kind}",
            str(mix.microbatches), str(mix.batch_per_attention_node), f"{p.decode_tok_s:,.0f}",
            f"{p.tok_s_per_accelerator:,.1f}", f"{p.tokens_per_usd / 1e6:,.2f}", f"{p.usd_per_mtok:.4f}",
            f"{p.tpot_ms:.2f}", f"{p.kv_capacity_tokens / 1e6:,.2f}", p.exposed, str(candidate.replicas),
        )  # fmt: skip
    return table


def write_pareto(result: Plan, path: Path) -> Path:
    """PNG of tok/s per accelerator against TPOT for every candidate (and its smaller batches when the plan
    was swept), the Pareto front and the choice marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise AfdError('--pareto needs matplotlib: pip install "afd[plot]"') from exc
    predictions = [c.prediction for c in result.candidates] + list(result.sweep)
    groups: dict[str, list[tuple[float, float]]] = {}
    for p in predictions:
        label = f"attention {p.mix.attention_kind}, FFN {p.mix.ffn_kind}"
        groups.setdefault(label, []).append((p.tpot_ms, p.tok_s_per_accelerator))
    points = sorted((p.tpot_ms, p.tok_s_per_accelerator) for p in predictions)
    front: list[tuple[float, float]] = []
    for tpot, rate in points:  # lowest TPOT first: a point is on the front if nothing faster produces more
        if not front or rate > front[-1][1]:
            front.append((tpot, rate))
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, xy in sorted(groups.items()):
        axes.scatter([x for x, _ in xy], [y for _, y in xy], s=10, alpha=0.6, label=label)
    axes.plot([x for x, _ in front], [y for _, y in front], color="black", linewidth=1, label="Pareto front")
    best = result.best.prediction
    axes.scatter([best.tpot_ms], [best.tok_s_per_accelerator], marker="*", s=200, color="red", label="chosen")
    axes.axvline(result.request.slo_tpot_ms, color="grey", linestyle="--", linewidth=1, label="TPOT limit")
    axes.set_xlabel("TPOT (ms)")
    axes.set_ylabel("decode tok/s per accelerator")
    axes.set_title(f"afd plan: {len(result.candidates)} candidates at their largest batch, {len(result.sweep)} smaller")
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plan_command(
    hardware: Annotated[str, typer.Option(help="Inventory: KIND:COUNT[,KIND:COUNT...], e.g. h20:16,l40s:32.")],
    slo_tpot_ms: Annotated[float, typer.Option(help="Largest acceptable time per output token, ms.")],
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint directory or HF config.json; the built-in demo model if omitted.")
    ] = None,
    context: Annotated[int, typer.Option(help="Context tokens per request (KV held and read).")] = 4096,
    price: Annotated[str | None, typer.Option(help="$ per device-hour: KIND=USD[,KIND=USD...].")] = None,
    link: Annotated[str, typer.Option(help="A<->F link: a catalog link or one measured in --calibration.")] = "400gbe",
    calibration: Annotated[
        list[Path] | None,
        typer.Option(help="Measurements: a calibration YAML, `afd status --json`, `afd bench transport --json`."),
    ] = None,
    catalog_file: Annotated[
        Path | None, typer.Option("--catalog", help="Hardware catalog YAML (default: the shipped one).")
    ] = None,
    objective: Annotated[str, typer.Option(help=f"Ranking: {', '.join(OBJECTIVES)}.")] = "per-dollar",
    dtype: Annotated[str, typer.Option(help="bf16, or fp8 (1-byte weights, FP8 FLOP/s).")] = "bf16",
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (plan.json's format).")] = False,
    pareto: Annotated[Path | None, typer.Option(help="Write a PNG: tok/s per accelerator against TPOT.")] = None,
    top: Annotated[int, typer.Option(min=1, help="Candidates to show and keep in the plan.")] = 10,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write plan.json (for afd up --plan).")] = None,
) -> None:
    """Rank deployments of an inventory: attention and FFN kinds, A:F counts, microbatches, batch, tok/s, $/Mtok."""
    console = Console(stderr=json_output, width=max(Console().width, 140))
    try:
        if dtype not in ("bf16", "fp8"):
            raise ConfigError(f"--dtype must be bf16 or fp8, not {dtype!r}")
        if objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        catalog = load_catalog(catalog_file)
        model_path = model if model is not None else builtin_model_dir()
        spec = load_model_spec(model_path)
        measured = Calibration()
        for path in calibration or []:
            measured = measured.merge(load_calibration(path, catalog.kind_of_device))
        request = PlanRequest(
            inventory=parse_inventory(hardware),
            slo_tpot_ms=slo_tpot_ms,
            context_len=context,
            link=link,
            prices_usd_per_hour=parse_prices(price),
            objective=objective,  # type: ignore[arg-type]
        )
        cost_model = CostModel(spec, catalog, measured, dtype)  # type: ignore[arg-type]
        cost_model.link(link)  # an unknown link: a clear error before the search
        result = plan(cost_model, request, sweep=pareto is not None)
        document = plan_file(result, catalog, str(model_path), spec.architecture, top)
        if output is not None:
            document.write(output)
        if pareto is not None:
            write_pareto(result, pareto)
    except AfdError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if json_output:
        print(json.dumps(document.model_dump(mode="json"), indent=2))
    else:
        _print_plan(console, result, document)
    if output is not None:
        console.print(f"plan written to {output} (afd up --plan {output}; afd k8s render --config C --plan {output})")
    if pareto is not None:
        console.print(f"Pareto plot written to {pareto}")


def _print_plan(console: Console, result: Plan, document: PlanFile) -> None:
    request = result.request
    inventory = ", ".join(f"{n} x {k}" for k, n in request.inventory.items())
    title = (
        f"afd plan: {document.architecture} on {inventory}, TPOT <= {request.slo_tpot_ms:g} ms, "
        f"context {request.context_len}, link {document.request['link']}, ranked by {request.objective}"
    )
    console.print(ranking_table(list(result.candidates[: len(document.candidates)]), title))
    rules: dict[str, Any] = dict(result.rules)
    console.print(f"regime: {rules['chosen_regime']}. {rules['why']}", highlight=False)
    basis = result.best.prediction.basis
    console.print(
        f"costs rest on: attention {basis['attention']}; FFN {basis['ffn']}; link {basis['link']}", highlight=False
    )
    console.print(
        f"{len(result.candidates)} candidates met the limits; x = replicas of the deployment the inventory holds"
    )


def up_settings_from_plan(path: Path, console: Console) -> tuple[int, int, str]:
    """(--attn, --ffn, --microbatches) of `afd up --plan`, from a validated plan.json.

    This release's nodes compute on CPU, so a plan for accelerators brings up its node counts and microbatches
    on this machine's CPU, and says so; `afd k8s render --plan` places the pools on their hardware.
    """
    from afd.planning.plan_file import read_plan

    try:
        document = read_plan(path)
    except AfdError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    flags = document.up_arguments()
    settings = dict(zip(flags[::2], flags[1::2], strict=True))
    deployment = document.deployment
    kinds = {deployment.attention.kind, deployment.ffn.kind} - {"cpu"}
    if kinds:
        console.print(
            f"[yellow]note:[/yellow] the plan puts attention on {deployment.attention.kind} and FFN on "
            f"{deployment.ffn.kind}; `afd up` runs every node on this machine's CPU (use `afd k8s render --plan` "
            "to place the pools on their hardware)",
            highlight=False,
        )
    console.print(f"from plan {path}: " + " ".join(flags), highlight=False)
    return int(settings["--attn"]), int(settings["--ffn"]), settings["--microbatches"]
