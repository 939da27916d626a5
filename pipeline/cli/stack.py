"""`sparsegen stack up|down|status`: the local development stack (MLflow, S3 via moto, Ray head).

The library is ``infra.stack``; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys


def _emit_json(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True, default=str))


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    if getattr(args, "json", False):
        _emit_json({"ok": False, "error": message})
    print(f"sparsegen stack {args.stack_command}: error: {message}", file=sys.stderr)
    return code


def _cmd_up(args: argparse.Namespace) -> int:
    from infra import stack

    def log(message: str) -> None:
        print(f"[stack] {message}", file=sys.stderr)

    try:
        state = stack.up(
            args.dir, bucket=args.bucket, s3_port=args.s3_port, mlflow_port=args.mlflow_port,
            ray_port=args.ray_port, dashboard_port=args.dashboard_port, ray_num_cpus=args.ray_num_cpus,
            timeout=args.timeout, log=None if args.quiet else log,
        )
    except stack.StackError as exc:
        return _fail(args, str(exc))
    except KeyboardInterrupt:
        return _fail(args, "interrupted; everything started was stopped", 130)
    env = stack.client_env(state)
    if args.json:
        _emit_json({
            "ok": True,
            "state_dir": state["state_dir"],
            "already_running": bool(state.get("already_running")),
            "up_seconds": state.get("up_seconds"),
            "services": {name: {"url": s["url"], "pid": s["pid"], "log": s["log"]}
                         for name, s in state["services"].items()},
            "env": env,
        })
    else:
        if state.get("already_running"):
            print(f"# stack already running (state: {state['state_dir']})", file=sys.stderr)
        print(f"# sparsegen dev stack; load with: eval \"$(sparsegen stack up --dir {state['state_dir']})\"")
        print(stack.format_exports(env))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from infra import stack

    try:
        result = stack.down(args.dir, grace=args.grace)
    except stack.StackError as exc:
        return _fail(args, str(exc))
    if args.json:
        _emit_json({"ok": True, **result})
    elif not result["stopped"]:
        print(f"no stack recorded in {result['state_dir']}; nothing to stop")
    else:
        parts = ", ".join(f"{name}: {s['found']} processes" for name, s in result["services"].items())
        print(f"stack stopped ({parts})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from infra import stack

    try:
        report = stack.status(args.dir)
    except stack.StackError as exc:
        return _fail(args, str(exc))
    if args.json:
        _emit_json({"ok": True, **report})
    elif not report["exists"]:
        print(f"stack: not running (no state in {report['state_dir']})")
    else:
        print(f"stack: {'running' if report['running'] else 'DEGRADED'} ({report['state_dir']})")
        for name, svc in report["services"].items():
            state = "healthy" if svc["healthy"] else ("alive, not answering" if svc["alive"] else "dead")
            extra = f" gcs={svc['gcs_address']} auth={svc['auth_mode']}" if name == "ray" and svc.get("url") else ""
            print(f"  {name:<7} {state:<22} {svc['url'] or '-'}{extra} pids={svc['pids']}")
    return 0 if report["running"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stack",
        help="start/stop/check the local dev stack (MLflow, S3 via moto, Ray head)",
        description="Local development stack: an MLflow tracking server (sqlite, artifacts proxied to S3), "
        "a moto S3 server and a Ray head with token auth, all bound to 127.0.0.1. "
        "State, logs and the Ray token live under --dir.",
    )
    sub = parser.add_subparsers(dest="stack_command", metavar="ACTION")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", default=None, metavar="STATE_DIR",
                       help="state directory (default: ./sparsegen-work/stack)")
        p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")

    p_up = sub.add_parser("up", help="start the stack and print the client environment as export lines",
                          description="Start MLflow, moto S3 and a Ray head on free loopback ports; print "
                          "`export` lines (MLFLOW_TRACKING_URI, RAY_ADDRESS, AWS_ENDPOINT_URL, ...).")
    common(p_up)
    p_up.add_argument("--bucket", default="sparsegen", help="S3 bucket to create (default: sparsegen)")
    p_up.add_argument("--s3-port", type=int, default=None, help="port of the S3 server (default: a free port)")
    p_up.add_argument("--mlflow-port", type=int, default=None, help="port of MLflow (default: a free port)")
    p_up.add_argument("--ray-port", type=int, default=None, help="GCS port of the Ray head (default: a free port)")
    p_up.add_argument("--dashboard-port", type=int, default=None,
                      help="Ray dashboard / job API port (default: a free port)")
    p_up.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs the Ray head advertises")
    p_up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health checks")
    p_up.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p_up.set_defaults(func=_cmd_up)

    p_down = sub.add_parser("down", help="stop exactly what `stack up` started",
                            description="Stop the processes recorded by `stack up` (by session id); "
                            "a Ray instance started elsewhere is not touched.")
    common(p_down)
    p_down.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p_down.set_defaults(func=_cmd_down)

    p_status = sub.add_parser("status", help="show what runs and where (exit 1 unless all healthy)")
    common(p_status)
    p_status.set_defaults(func=_cmd_status)
