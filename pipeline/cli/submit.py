"""`sparsegen submit train|tune`: run `sparsegen train|tune` on a Ray cluster as a Ray job.

The library is ``pipeline.distributed.submit``; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _cmd_submit(args: argparse.Namespace) -> int:
    prog = f"sparsegen submit {args.kind}"

    def fail(message: str, code: int = 2, exc: BaseException | None = None) -> int:
        from pipeline.preflight import debug_enabled

        if exc is not None and debug_enabled(args):
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": message}))
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code

    entry_args = list(args.entry_args)
    if entry_args and entry_args[0] == "--":
        entry_args = entry_args[1:]
    try:
        env = _parse_env(args.env)
    except ValueError as exc:
        return fail(str(exc), exc=exc)
    from pipeline.distributed import submit
    from pipeline.preflight import PreflightError, check_job_api

    problems, address = [], None
    try:
        address = submit.resolve_address(args.address)
    except submit.SubmitError as exc:
        problems.append(str(exc))
    problem = entry_problems(args.kind, entry_args)
    if problem:  # a config mistake fails here, not minutes later on the cluster
        problems.append(problem)
    if problems:
        return fail("; ".join(problems))
    try:
        check_job_api(address)
    except PreflightError as exc:
        return fail(str(exc), exc=exc)
    try:
        result = submit.submit_job(
            args.address, entry_args, args.kind, wait=not args.no_wait, env=env,
            working_dir=args.working_dir or submit.REPO_ROOT,
            forward_env=[*submit.DEFAULT_FORWARDED_ENV, *args.forward_env],
            forward_aws_credentials=args.forward_aws_credentials,
            submission_id=args.submission_id,
            # With --json the job's logs go to stderr so that stdout ends with the JSON object.
            log_stream=sys.stderr if args.json else sys.stdout,
        )
    except submit.SubmitError as exc:
        return fail(str(exc), exc=exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the job keeps running (stop it with `ray job stop <id>`)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"ok": True, **result}, sort_keys=True))
    elif args.no_wait:
        print(result["job_id"])
    else:
        print(f"job {result['job_id']} {result['status']}", file=sys.stderr)
    if args.no_wait:
        return 0
    return 0 if result["succeeded"] else 1


def entry_problems(kind: str, entry_args: list[str]) -> str | None:
    """The mistakes in the `sparsegen train|tune` arguments of a job, found before it is submitted: unknown
    flags, and every config (or search-space) mistake at once. What only the cluster can see (its data,
    MLflow server and Ray) is checked by the job itself, in its first seconds. None when all is well (or
    when the arguments ask for --help, which the job prints)."""
    import contextlib
    import io

    if any(arg in ("-h", "--help") for arg in entry_args):
        return None
    from pipeline.cli import build_parser
    from pipeline.config import ConfigError, load_config

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = build_parser().parse_args([kind, *entry_args])
    except SystemExit:
        lines = errors.getvalue().strip().splitlines() or ["invalid arguments"]
        return f"the {kind} arguments after --: {lines[-1].split(': error: ', 1)[-1]}"
    try:
        if kind == "train":
            from pipeline.cli.train import apply_cli_options

            apply_cli_options(load_config(parsed.config or parsed.preset or "paper64", parsed.overrides), parsed)
        else:
            from pipeline.cli.tune import settings_from_args
            from pipeline.tuning.search import prepare
            from pipeline.tuning.space import SpaceError

            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    prepare(settings_from_args(parsed))
            except SpaceError as exc:
                return f"the tune arguments after --: invalid search space {exc.source}: {'; '.join(exc.problems)}"
    except ConfigError as exc:
        return f"the {kind} arguments after --: invalid configuration: {'; '.join(exc.problems)}"
    return None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit `sparsegen train|tune` to a Ray cluster as a Ray job",
        description="Submit `python jobs/<kind>.py ARGS` with this checkout as the job's working dir to the "
        "Ray job API at --address (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS). Exit 0 iff the "
        "job SUCCEEDED (with --no-wait: iff it was submitted).",
    )
    sub = parser.add_subparsers(dest="kind", metavar="KIND")
    sub.required = True
    for kind in ("train", "tune"):
        p = sub.add_parser(
            kind, help=f"run `sparsegen {kind} ARGS` on the cluster",
            description=f"Submit `sparsegen {kind} ARGS` as a Ray job. Put the {kind} arguments after `--`, "
            f"e.g. `sparsegen submit {kind} --address http://127.0.0.1:8265 -- --help`.",
        )
        p.add_argument("--address", default=None,
                       help="Ray dashboard / job API URL, http://HOST:PORT (default: $RAY_ADDRESS)")
        p.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
        p.add_argument("--json", action="store_true",
                       help="print one JSON object on the last stdout line (job logs go to stderr)")
        p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                       help="extra environment variable for the job (repeatable; visible via the job API)")
        p.add_argument("--forward-env", action="append", default=[], metavar="NAME",
                       help="copy this variable from the current environment to the job (repeatable; by "
                       "default only MLFLOW_EXPERIMENT_NAME: the cluster brings its own MLflow URI and S3 access)")
        p.add_argument("--forward-aws-credentials", action="store_true",
                       help="also send AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN (default: the "
                       "cluster's own credentials, e.g. its instance profile)")
        p.add_argument("--submission-id", default=None, help="job id to use (default: generated by Ray)")
        p.add_argument("--working-dir", default=None,
                       help="directory uploaded as the job's working dir; must contain jobs/ "
                       "(default: the repository this sparsegen was imported from)")
        p.add_argument("entry_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                       help=f"arguments of `sparsegen {kind}`")
        p.set_defaults(func=_cmd_submit)
