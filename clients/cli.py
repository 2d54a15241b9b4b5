"""The `hotlora` command line (console script `hotlora = hotlora.clients.cli:main`).

Client commands live here; `serve` and `prepare-model` come from `hotlora.server.cli` when the server is
installed. A gRPC error prints one line on stderr, `error: <STATUS>: <details>`, and exits 1.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Sequence

import grpc

from hotlora import __version__
from hotlora.clients import _commands as cmd
from hotlora.clients._common import ClientError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that refuses a mistyped option or command before parsing, with the closest real one
    ("did you mean --adapter?"). Checked first because argparse would take the word after a mistyped
    option as a positional argument: `generate --adaptr NAME PROMPT` would send NAME as the prompt.
    Each (sub)command checks its own words, up to the word of its subcommand."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        problem = self._unknown_word(args)
        if problem:
            self.error(problem)
        return super().parse_known_args(args, namespace)

    def _unknown_word(self, args: list[str]) -> str | None:
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        subparsers = {
            name: parser
            for a in self._actions
            if isinstance(a, argparse._SubParsersAction)
            for name, parser in a.choices.items()
        }
        commands = list(subparsers)
        for arg in args:
            if arg == "--" or arg in commands:
                return None  # the rest is positional, or the subcommand's to check
            if commands and not arg.startswith("-"):
                return f"unknown command {arg!r}" + _suggestion(
                    arg, commands, f"; choose from {', '.join(commands)}"
                )
            if not arg.startswith("--") or " " in arg:
                continue  # a value, a short option, or a text argparse reads as positional
            name = arg.split("=", 1)[0]
            if name in options or (self.allow_abbrev and any(o.startswith(name) for o in options)):
                continue
            owners = [c for c, p in subparsers.items() if any(name in a.option_strings for a in p._actions)]
            if owners:  # `hotlora --address A generate`: argparse reads a command's options after it
                return f"{name} goes after the command ({self.prog} {owners[0]} {name} ...)"
            return f"unrecognized option {name}" + _suggestion(name, options, f" (see {self.prog} --help)")
        return None


def _suggestion(word: str, known: Sequence[str], otherwise: str) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else otherwise


def _add(sub: argparse._SubParsersAction, name: str, help: str, func: Callable, parents=(), **kw):
    p = sub.add_parser(
        name, help=help, description=help, parents=list(parents), formatter_class=_Formatter, **kw
    )
    p.set_defaults(func=func)
    return p


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")


def _add_inference(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    p = _add(
        sub, "generate", "Generate text (streamed to stdout as it is produced).", cmd.cmd_generate, [conn]
    )
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--adapter", default="", help="adapter `name` or `name@N` (default: the base model)")
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user chat message (chat template)"
    )
    p.add_argument("--system", help="system message (implies --chat)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = server default")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling; 0 or 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default random)")
    p.add_argument("--stop", nargs="+", action="extend", metavar="S", help="stop strings")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer, then print it")
    p.add_argument("--json", action="store_true", help="print the whole GenerateResponse as JSON (no stream)")

    p = _add(sub, "embed", "Embed texts (pooled hidden state); prints JSON.", cmd.cmd_embed, [conn])
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--adapter", default="", help="adapter to embed through (default: the base model)")

    p = _add(sub, "classify", "Classify texts with an adapter that carries a head.", cmd.cmd_classify, [conn])
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--adapter", required=True, help="a SEQ_CLS adapter `name` or `name@N`")
    _json_flag(p)

    p = _add(
        sub,
        "health",
        "Check the server's grpc.health.v1 status; exit 0 only when SERVING (a Docker HEALTHCHECK).",
        cmd.cmd_health,
        [conn],
    )
    p.add_argument("--service", default="", help="service name, e.g. hotlora.v1.Inference ('' = the server)")

    p = _add(
        sub,
        "describe",
        "List the server's gRPC services and methods, or describe one service, method, message or enum, "
        "through server reflection (as grpcurl list / describe).",
        _describe,
        [conn],
    )
    p.add_argument("symbol", nargs="?", help="a full name, e.g. hotlora.v1.Inference (default: list them)")


def _describe(args: argparse.Namespace) -> int:
    from hotlora.clients.describe import cmd_describe  # grpc reflection's client, only for this command

    return cmd_describe(args)


def _add_group(
    sub: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse._SubParsersAction:
    """A command with subcommands (`hotlora NAME COMMAND`); NAME alone prints its help and exits 2."""
    top = sub.add_parser(name, help=help, description=description)
    top.set_defaults(func=lambda _args: (top.print_help(sys.stderr), 2)[1])
    return top.add_subparsers(title="commands", metavar="COMMAND")


def _add_adapters(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    asub = _add_group(
        sub,
        "adapters",
        "Upload, list, inspect, load, export and delete adapters.",
        "Manage the tenant's adapters. REF is `name` (latest version) or `name@N`.",
    )

    p = _add(asub, "upload", "Upload a PEFT adapter directory (a new version if the name exists).",
             cmd.cmd_adapters_upload, [conn])  # fmt: skip
    p.add_argument("directory", help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--name", required=True, help="adapter name: [a-z0-9][a-z0-9._-]{0,63}")
    p.add_argument("--description", default="")
    p.add_argument(
        "--labels", type=cmd.csv_list, help="comma-separated class labels, in head order (SEQ_CLS)"
    )
    _json_flag(p)

    p = _add(asub, "list", "List adapters (latest version of each name).", cmd.cmd_adapters_list, [conn])
    p.add_argument("--prefix", default="", help="only names starting with this")
    p.add_argument("--all-versions", action="store_true", help="every version, not only the latest")
    _json_flag(p)

    p = _add(asub, "show", "Show one adapter.", cmd.cmd_adapters_show, [conn])
    p.add_argument("ref")
    _json_flag(p)

    p = _add(asub, "delete", "Delete every version of NAME, or only NAME@N.", cmd.cmd_adapters_delete, [conn])
    p.add_argument("ref")

    p = _add(asub, "export", "Download an adapter as a PEFT directory.", cmd.cmd_adapters_export, [conn])
    p.add_argument("ref")
    p.add_argument("directory", help="destination directory (created)")

    p = _add(asub, "load", "Warm an adapter into a device slot now.", cmd.cmd_adapters_load, [conn])
    p.add_argument("ref")
    p.add_argument("--pin", action="store_true", help="keep it in its slot (never evicted)")
    _json_flag(p)

    p = _add(
        asub, "unload", "Evict an adapter from memory (it stays stored).", cmd.cmd_adapters_unload, [conn]
    )
    p.add_argument("ref")
    _json_flag(p)

    p = _add(asub, "evaluate", "Score an adapter (or a job's, or the base model) on labelled examples.",
             cmd.cmd_adapters_evaluate, [conn])  # fmt: skip
    p.add_argument("ref", nargs="?", default="", help="`name` or `name@N` (omit for the base model or --job)")
    p.add_argument("--examples", required=True, metavar="FILE.jsonl",
                   help='one JSON object a line: {"text", "label"} or {"prompt", "completion"}')  # fmt: skip
    p.add_argument("--job", default="", help="evaluate the adapter this fine-tune job trained")
    p.add_argument("--task", type=str.upper, choices=["SEQ_CLS", "CAUSAL_LM"], help="for the base model")
    p.add_argument(
        "--chat-template", action="store_true", help="CAUSAL_LM: wrap prompts in the chat template"
    )
    _json_flag(p)


def _add_finetune(sub: argparse._SubParsersAction, conn: argparse.ArgumentParser) -> None:
    fsub = _add_group(
        sub,
        "finetune",
        "Fine-tune adapters on-line on the resident model and follow the jobs.",
        "On-line fine-tuning jobs. Watching exits 0 only when the job SUCCEEDED.",
    )

    p = _add(fsub, "create", "Start a fine-tune, then watch it with a progress bar (unless --no-watch).",
             cmd.cmd_finetune_create, [conn])  # fmt: skip
    p.add_argument("--adapter", required=True, help="adapter to create, or an existing one to continue")
    p.add_argument("--task", required=True, type=str.upper, choices=["SEQ_CLS", "CAUSAL_LM"])
    p.add_argument(
        "--examples",
        required=True,
        metavar="FILE.jsonl",
        help='one JSON object a line: {"text", "label"} (SEQ_CLS) or {"prompt", "completion"} (CAUSAL_LM)',
    )
    p.add_argument("--validation", metavar="FILE.jsonl", help="validation examples (default: a split)")
    p.add_argument(
        "--method",
        type=str.upper,
        default="AUTO",
        choices=["AUTO", "HEAD_ONLY", "LORA", "LORA_PROGRESSIVE"],
        help="AUTO tries the others in order of cost and keeps the best validated one",
    )
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="time budget of AUTO's search (0 = the server's --finetune-max-seconds)")  # fmt: skip
    p.add_argument("--labels", type=cmd.csv_list, help="comma-separated label order (default: sorted labels)")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--target-modules", type=cmd.csv_list, help="comma-separated, e.g. q_proj,v_proj")
    p.add_argument("--layers", type=cmd.layer_list, help="layers to adapt, e.g. 20-29 or 0,5,7")
    p.add_argument("--seed", type=int)
    p.add_argument("--promote", type=str.upper, default="GATED", choices=["GATED", "ALWAYS"],
                   help="GATED: serve the result only if it beats the baseline on validation")  # fmt: skip
    p.add_argument(
        "--chat-template", action="store_true", help="CAUSAL_LM: wrap prompts in the chat template"
    )
    p.add_argument("--description", default="")
    p.add_argument("--no-watch", action="store_true", help="print the job id and return at once")
    p.add_argument("--json", action="store_true", help="print events (or the job) as JSON lines")

    p = _add(fsub, "watch", "Follow a job until it ends.", cmd.cmd_finetune_watch, [conn])
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print each event as a JSON line")

    p = _add(fsub, "list", "List fine-tune jobs.", cmd.cmd_finetune_list, [conn])
    _json_flag(p)

    p = _add(fsub, "show", "Show one job.", cmd.cmd_finetune_show, [conn])
    p.add_argument("id")
    _json_flag(p)

    p = _add(fsub, "cancel", "Cancel a job.", cmd.cmd_finetune_cancel, [conn])
    p.add_argument("id")


def build_parser() -> argparse.ArgumentParser:
    """The whole `hotlora` parser; environment defaults are read now (call it per run)."""
    parser = _Parser(
        prog="hotlora",
        description="hotlora: one resident base model serving and fine-tuning many tenants' LoRA adapters.",
        epilog=cmd.ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hotlora {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    register_commands = _server_cli("register_commands")  # adds `serve`, `serve-fleet`, `prepare-model`
    if register_commands is not None:
        register_commands(sub)
    conn = cmd.connection_parent()
    _add_inference(sub, conn)
    _add_adapters(sub, conn)
    _add_finetune(sub, conn)
    return parser


def _error_line(exc: grpc.RpcError) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    name = getattr(code, "name", None) or "UNKNOWN"
    return f"error: {name}: {' '.join(str(details or exc).split())}"


def _server_cli(name: str):
    """`hotlora.server.cli.<name>`, or None where only the client is installed."""
    try:  # import_module reads sys.modules (what is installed), not an attribute of the parent package
        server_cli = importlib.import_module("hotlora.server.cli")
    except ImportError:
        return None
    return getattr(server_cli, name, None)


def misspelt_variables(environ=None) -> list[str]:
    """Warnings for HOTLORA_* variables that nothing reads but a real one nearly matches: a typo in a
    variable would otherwise be ignored without a word. Only where the server's commands are installed
    (their variables are known then)."""
    server_variables = _server_cli("server_variables")
    if server_variables is None:
        return []
    known = sorted(server_variables() | cmd.ENV_NAMES)
    warnings = []
    for name in sorted(os.environ if environ is None else environ):
        if name.startswith("HOTLORA_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if close:
                warnings.append(f"warning: {name} is not a hotlora setting; did you mean {close[0]}?")
    return warnings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hotlora` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for warning in misspelt_variables():
        print(warning, file=sys.stderr)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except grpc.RpcError as exc:
        print(_error_line(exc), file=sys.stderr)
        return 1
    except (ClientError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
