"""Handlers of the `hotlora` client commands: each takes the parsed arguments and returns the exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotlora.clients import _common as c
from hotlora.clients import _render as r
from hotlora.clients.client import Client

ENV_HELP = """\
environment:
  HOTLORA_ADDRESS      server address for client commands (default 127.0.0.1:50051)
  HOTLORA_TOKEN        bearer token sent as `authorization: Bearer <token>`
  HOTLORA_TIMEOUT      default deadline in seconds for each call
  HOTLORA_CA_CERT      PEM file of the CA that signed the server certificate (turns TLS on)
  HOTLORA_CLIENT_CERT  PEM client certificate for mTLS (with HOTLORA_CLIENT_KEY)
  HOTLORA_CLIENT_KEY   PEM private key of the client certificate
  HOTLORA_TLS          1 = TLS with the system's root certificates

exit status: 0 on success; 1 on an error (printed as `error: <STATUS>: <details>`); 2 on bad usage.
"""
#: The variables the client commands read (those listed above).
ENV_NAMES = frozenset(line.split()[0] for line in ENV_HELP.splitlines() if line.startswith("  HOTLORA_"))


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--address",
        default=_env("HOTLORA_ADDRESS", c.DEFAULT_ADDRESS),
        help="server host:port (env HOTLORA_ADDRESS; default %(default)s)",
    )
    g.add_argument("--token", default=_env("HOTLORA_TOKEN"), help="bearer token (env HOTLORA_TOKEN)")
    timeout = _env("HOTLORA_TIMEOUT")
    g.add_argument(
        "--timeout",
        type=float,
        default=float(timeout) if timeout else None,
        help="deadline in seconds for each call (env HOTLORA_TIMEOUT; default none)",
    )
    g.add_argument(
        "--ca-cert", default=_env("HOTLORA_CA_CERT"), help="CA certificate PEM (env HOTLORA_CA_CERT)"
    )
    g.add_argument(
        "--client-cert", default=_env("HOTLORA_CLIENT_CERT"), help="client certificate PEM for mTLS"
    )
    g.add_argument("--client-key", default=_env("HOTLORA_CLIENT_KEY"), help="client private key PEM for mTLS")
    g.add_argument(
        "--tls",
        action="store_true",
        default=_env("HOTLORA_TLS", "0").lower() in ("1", "true", "yes"),
        help="use TLS with the system root certificates (env HOTLORA_TLS)",
    )
    return p


def _client(args: argparse.Namespace, timeout: float | None = None) -> Client:
    return Client(
        args.address,
        args.token,
        timeout=args.timeout if args.timeout is not None else timeout,
        root_certificates=args.ca_cert,
        private_key=args.client_key,
        certificate_chain=args.client_cert,
        tls=True if args.tls else None,
    )


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def layer_list(value: str) -> list[int]:
    """ "20,21" or "20-23" or a mix."""
    out: list[int] = []
    for part in csv_list(value):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {value!r}; use e.g. 20,21 or 20-29") from None
    return out


# ---------------------------------------------------------------------------------------------- inference


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    kwargs: dict[str, Any] = dict(
        adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop or (),
    )  # fmt: skip
    if args.chat or args.system is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        kwargs["messages"] = messages
    else:
        kwargs["prompt"] = prompt
    with _client(args) as client:
        if args.json or args.no_stream:
            resp = client.generate(**kwargs)
            if args.json:
                r.print_json(resp)
            else:
                sys.stdout.write(resp.text + "\n")
            return 0
        with client.generate_stream(**kwargs) as stream:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.embed(args.texts, adapter=args.adapter)
    r.print_json({"adapter": resp.adapter, "embeddings": [list(e.values) for e in resp.embeddings]})
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.classify(args.texts, adapter=args.adapter)
    if args.json:
        r.print_json(resp)
        return 0
    for res in resp.results:
        scores = ", ".join(f"{s.label} {s.score:.4f}" for s in res.scores)
        sys.stdout.write(f"{res.label}\t{res.score:.4f}\t[{scores}]\n")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args, timeout=5.0) as client:
        status = client.health(args.service)
    sys.stdout.write(status + "\n")
    return 0 if status == "SERVING" else 1


# ---------------------------------------------------------------------------------------------- adapters


def cmd_adapters_upload(args: argparse.Namespace) -> int:
    files = c.peft_files(args.directory)  # refuse bad directories before connecting
    total = sum(f.stat().st_size for f in files)
    with _client(args) as client, r.upload_progress(f"uploading {args.name}") as progress:
        task = progress.add_task("upload", total=total)
        adapter = client.upload_adapter(
            args.directory,
            args.name,
            description=args.description,
            labels=args.labels or (),
            progress=lambda sent, _total: progress.update(task, completed=sent),
        )
    if args.json:
        r.print_json(adapter)
    else:
        sys.stdout.write(
            f"uploaded {r.adapter_ref(adapter)} ({c.enum_name(*c.TASK, adapter.task)}, rank {adapter.rank}, "
            f"{r.human_bytes(adapter.size_bytes)}, sha256 {adapter.sha256[:12]})\n"
        )
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.list_adapters(args.prefix, args.all_versions)
    return _list(args, list(resp.adapters), r.adapters_table, "no adapters")


def _list(args: argparse.Namespace, items: list[Any], table: Callable[[list[Any]], Any], none: str) -> int:
    """Messages as a JSON list (--json), `none` when there are none, else as `table(items)`."""
    if args.json:
        r.print_json([r.to_dict(item) for item in items])
    elif not items:
        sys.stdout.write(none + "\n")
    else:
        r.stdout_console().print(table(items))
    return 0


def _show(args: argparse.Namespace, message: Any, details: Callable[[Any], Any]) -> int:
    """One message as JSON (--json) or as the `details(message)` pairs."""
    if getattr(args, "json", False):
        r.print_json(message)
    else:
        r.print_pairs(details(message))
    return 0


def _show_adapter(args: argparse.Namespace, adapter: Any) -> int:
    return _show(args, adapter, r.adapter_details)


def cmd_adapters_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _show_adapter(args, client.get_adapter(args.ref))


def cmd_adapters_evaluate(args: argparse.Namespace) -> int:
    examples = _read_examples(args.examples)
    with _client(args) as client:
        resp = client.evaluate_adapter(
            args.ref, examples, job_id=args.job, task=args.task, use_chat_template=args.chat_template
        )
    return _show(args, resp, r.evaluation_details)


def cmd_adapters_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ack = client.delete_adapter(args.ref)
    sys.stdout.write((ack.message or f"deleted {args.ref}") + "\n")
    return 0


def cmd_adapters_load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _show_adapter(args, client.load_adapter(args.ref, pin=args.pin))


def cmd_adapters_unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _show_adapter(args, client.unload_adapter(args.ref))


def cmd_adapters_export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        paths = client.export_adapter(args.ref, args.directory)
    for p in paths:
        sys.stdout.write(f"{p}\n")
    return 0


# ---------------------------------------------------------------------------------------------- training


def _read_examples(path: str) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise c.ClientError(f"cannot read {path!r}: {exc.strerror}") from exc
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise c.ClientError(f"{path}: invalid JSON: {exc}") from exc
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise c.ClientError(f"{path}:{n}: invalid JSON: {exc.msg}") from exc
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise c.ClientError(
                f"{path}: example {n} is not an object ({{text, label}} or {{prompt, completion}})"
            )
    return rows


def _watch(client: Client, job_id: str, as_json: bool) -> int:
    job = None
    with client.watch_finetune(job_id) as events:
        if as_json:
            for event in events:
                job = event.job
                sys.stdout.write(json.dumps(r.to_dict(event), ensure_ascii=False) + "\n")
                sys.stdout.flush()
        else:
            with r.JobProgress(job_id) as display:
                for event in events:
                    job = event.job
                    display.update(event)
    if job is None or job.state not in c.TERMINAL_JOB_STATES:
        job = client.get_finetune(job_id)
    if not as_json:
        sys.stdout.write(r.job_summary(job) + "\n")
    return 0 if r.job_state(job) == "SUCCEEDED" else 1


def cmd_finetune_create(args: argparse.Namespace) -> int:
    examples = _read_examples(args.examples)
    validation = _read_examples(args.validation) if args.validation else []
    hp = {
        "rank": args.rank, "alpha": args.alpha, "learning_rate": args.learning_rate, "epochs": args.epochs,
        "batch_size": args.batch_size, "target_modules": args.target_modules,
        "layers_to_transform": args.layers, "seed": args.seed,
    }  # fmt: skip
    with _client(args) as client:
        job = client.create_finetune(
            args.adapter, args.task, examples, validation=validation, method=args.method,
            labels=args.labels or (), hyperparameters=hp, promote=args.promote,
            use_chat_template=args.chat_template, description=args.description,
            max_seconds=args.max_seconds,
        )  # fmt: skip
        if args.no_watch:
            if args.json:
                r.print_json(job)
            else:
                sys.stdout.write(f"{job.id}\n")
            return 0
        r.stderr_console().print(
            f"job {job.id} {r.job_state(job)}", highlight=False, markup=False, soft_wrap=True
        )
        return _watch(client, job.id, args.json)


def cmd_finetune_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _watch(client, args.id, args.json)


def cmd_finetune_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.list_finetunes()
    return _list(args, list(resp.jobs), r.jobs_table, "no fine-tune jobs")


def cmd_finetune_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_finetune(args.id)
    return _show(args, job, r.job_details)


def cmd_finetune_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_finetune(args.id)
    sys.stdout.write(f"job {job.id} {r.job_state(job)}\n")
    return 0
