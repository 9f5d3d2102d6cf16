"""``ua3d batch <task>``: the argument definitions and the command (hooked into :mod:`ua3d.cli`).

One sub-command per registered task. Its input kinds become options taking a glob (per-item files,
paired by the wildcard key) or a plain path (one file for all items); ``--manifest`` lists the items
instead (CSV or JSON lines). Task options become ``--option-name`` flags; per-item manifest values
override them. Exit code: 0 when every item is done or skipped, 1 when any item failed, 130/143 when
interrupted, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .tasks import TASKS, Option

__all__ = ["add_parser", "cmd_batch"]

EPILOG = """examples:
  ua3d batch depth-sr --rgb 'scenes/*/color.png' --depth 'scenes/*/depth_lr.png' --out hr/ --workers 2
  ua3d batch depth-sr --manifest items.csv --out hr/ --engine ray --address auto
  ua3d batch fuse-frames --rgb 'seq/color/*.jpg' --depth 'seq/depth/*.png' --features 'feats/*.npy' \\
      --intrinsics seq/camera.json --trajectory seq/trajectory.log --out frames/

resume: an item is skipped when <out>/<id>.json records the same config hash and its outputs exist;
--force redoes it. Failed items are listed at the end (exit code 1); the others are kept."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(p: argparse.ArgumentParser, o: Option) -> None:
    if o.name in ("seed", "device") and any(a.dest == o.name for a in p._actions):
        return  # the common --seed / --device of ua3d
    kw = {"dest": f"opt_{o.name}", "default": None}
    default = "" if o.default is None else f" (default {o.default})"
    if o.type is bool:
        p.add_argument(_flag(o.name), action="store_const", const=True, help=o.help + default, **kw)
    else:
        p.add_argument(
            _flag(o.name), type=o.type, choices=o.choices, metavar=o.name.upper(), help=o.help + default, **kw
        )


def add_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """Register ``batch`` under ``subparsers`` (the ``ua3d`` sub-command action); ``parents``: common options."""
    b = subparsers.add_parser(
        "batch",
        help="run a task over a folder or a manifest (resumable; local pool or Ray)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    tasks = b.add_subparsers(dest="batch_task", required=True, metavar="TASK")
    for name in sorted(TASKS):
        task = TASKS[name]
        p = tasks.add_parser(
            name,
            parents=list(parents),
            help=task.help,
            description=task.help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        src = p.add_argument_group("items (a glob per input kind, or --manifest)")
        for kind in task.input_kinds:
            opt = " (optional)" if kind in task.optional_inputs else ""
            src.add_argument(
                _flag(kind),
                dest=f"in_{kind}",
                default=None,
                metavar="GLOB|PATH",
                help=task.input_help.get(kind, kind) + opt,
            )
        src.add_argument("--manifest", default=None, help="CSV or JSON-lines file: one row per item (README)")
        run = p.add_argument_group("run")
        run.add_argument(
            "--out", required=True, help="output folder (one output + <id>.json sidecar per item)"
        )
        run.add_argument(
            "--engine", default="local", choices=("local", "ray"), help="default local (process pool)"
        )
        run.add_argument(
            "--workers",
            type=int,
            default=None,
            help="items in parallel (default: the usable cores; 0 = in this process, local only)",
        )
        run.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch threads per item (default cores // workers, so workers x threads <= cores)",
        )
        run.add_argument(
            "--address",
            default=None,
            help="ray: 'auto' or HOST:PORT of a running cluster (default: start a local instance)",
        )
        run.add_argument("--force", action="store_true", help="redo items that are already done")
        run.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
        run.add_argument("--verbose", action="store_true", help="one line per finished item")
        run.add_argument("--json", default=None, help="also write the summary JSON here")
        opts = p.add_argument_group(f"{name} options")
        for o in task.options:
            _add_option(opts, o)
        p.set_defaults(func=cmd_batch)
    return b


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the kill test in a subprocess
    raise SystemExit(143)


def cmd_batch(args) -> int:
    from .runner import run

    task = TASKS[args.batch_task]
    globs = {k: getattr(args, f"in_{k}") for k in task.input_kinds if getattr(args, f"in_{k}", None)}
    options = {o.name: getattr(args, f"opt_{o.name}", None) for o in task.options}
    for common in ("seed", "device"):
        if common in options and options[common] is None and getattr(args, common, None) is not None:
            options[common] = getattr(args, common)
    if args.manifest:
        items, shared = args.manifest, globs
    else:
        if not globs:
            raise ValueError(
                f"give the items: a glob per input kind ({', '.join(_flag(k) for k in task.inputs)}) "
                f"or --manifest"
            )
        items, shared = globs, {}
    quiet = getattr(args, "quiet", False)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        summary = run(
            task,
            items,
            out=args.out,
            engine=args.engine,
            workers=args.workers,
            threads=args.threads,
            address=args.address,
            options=options,
            shared_inputs=shared,
            force=args.force,
            dry_run=args.dry_run,
            progress=not quiet,
            verbose=args.verbose and not quiet,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        from .store import write_json_atomic

        write_json_atomic(args.json, summary.to_dict())
    if args.dry_run:
        for i in summary.planned:
            print(f"run   {i}")
        for i in summary.skipped:
            print(f"skip  {i} (done)")
        for f in summary.failed:
            print(f"fail  {f['id']}: {f['path']}: {f['error']}")
    if not quiet or summary.failed:
        print(summary.text(), file=sys.stderr if summary.failed else sys.stdout)
    return 0 if summary.ok else 1
