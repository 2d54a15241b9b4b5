"""Terminal output for the CLI: JSON dumps, rich tables, progress displays."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hotlora.clients import _common as c
from hotlora.v1 import adapters_pb2, training_pb2


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(obj: Any) -> None:
    if isinstance(obj, Message):
        obj = to_dict(obj)
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def stdout_console() -> Console:
    # piped output (scripts, tests) is not squeezed into 80 columns
    return Console(width=None if sys.stdout.isatty() else 200)


def stderr_console() -> Console:
    return Console(stderr=True)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


# ---------------------------------------------------------------------------------------------- adapters


def adapter_ref(a: adapters_pb2.Adapter) -> str:
    return f"{a.name}@{a.version}"


def adapters_table(adapters: list[adapters_pb2.Adapter]) -> Table:
    table = Table(show_header=True, header_style="bold")
    for col in ("ADAPTER", "TASK", "RANK", "ALPHA", "LABELS", "STATE", "PINNED", "SIZE", "SOURCE", "CREATED"):
        table.add_column(col, justify="right" if col in ("RANK", "ALPHA", "SIZE") else "left")
    for a in adapters:
        table.add_row(
            adapter_ref(a),
            c.enum_name(*c.TASK, a.task),
            str(a.rank),
            f"{a.alpha:g}",
            ",".join(a.labels) or "-",
            c.enum_name(*c.ADAPTER_STATE, a.state),
            "yes" if a.pinned else "",
            human_bytes(a.size_bytes),
            c.enum_name(*c.ADAPTER_SOURCE, a.source),
            when(a.created_at),
        )
    return table


def adapter_details(a: adapters_pb2.Adapter) -> list[tuple[str, str]]:
    return [
        ("adapter", adapter_ref(a)),
        ("tenant", a.tenant),
        ("description", a.description or "-"),
        ("task", c.enum_name(*c.TASK, a.task)),
        ("rank", str(a.rank)),
        ("alpha", f"{a.alpha:g}"),
        ("target_modules", ", ".join(a.target_modules) or "-"),
        ("labels", ", ".join(a.labels) or "-"),
        ("state", c.enum_name(*c.ADAPTER_STATE, a.state) + (" (pinned)" if a.pinned else "")),
        ("waiting_requests", str(a.waiting_requests)),
        ("size", f"{human_bytes(a.size_bytes)} ({a.size_bytes} bytes)"),
        ("sha256", a.sha256 or "-"),
        ("source", c.enum_name(*c.ADAPTER_SOURCE, a.source)),
        ("created", when(a.created_at)),
        *validation_details(a.validation),
        *head_details(a),
    ]


def head_details(a: adapters_pb2.Adapter) -> list[tuple[str, str]]:
    """What a SEQ_CLS head reads and how its export loads (GetAdapter sets head_features)."""
    if not a.HasField("head_features"):
        return []
    f = a.head_features
    pool = "last token" if f.pooling == "last" else "mean pooling"
    layer = "last layer" if f.layer == -1 else f"layer {f.layer}"
    export = (
        f"needs {a.export_loader}.load_classifier: PEFT's classifier reads the last token's final state "
        "(the export's README.md says how)"
        if a.export_loader
        else "loads with stock PEFT (AutoModelForSequenceClassification + PeftModel.from_pretrained)"
    )
    return [("head_features", f"{pool}, {layer}"), ("export", export)]


def validation_details(v: adapters_pb2.AdapterValidation) -> list[tuple[str, str]]:
    if not v.scheme:
        return []
    pairs = [
        ("validation", f"{v.metric_name} {v.score:.4f} ± {v.stderr:.4f} ({v.scheme}, {v.examples} examples, "
         f"baseline {v.baseline:.4f}, {v.method})"),
    ]  # fmt: skip
    if v.previous_task_examples:
        pairs.append(("previous task", f"{v.previous_task_score:.4f} vs {v.previous_task_reference:.4f} "
                      f"± {v.previous_task_stderr:.4f} ({v.previous_task_examples} examples)"))  # fmt: skip
    return pairs


def evaluation_details(e: training_pb2.EvaluateResponse) -> list[tuple[str, str]]:
    pairs = [("adapter", e.adapter or "(base model)"), ("task", c.enum_name(*c.TASK, e.task)),
             ("examples", str(e.examples))]  # fmt: skip
    if e.labels:
        width = max(len(x) for x in e.labels)
        rows = [f"{label:>{width}} " + " ".join(f"{n:5d}" for n in row.counts)
                for label, row in zip(e.labels, e.confusion, strict=True)]  # fmt: skip
        pairs += [("accuracy", f"{e.accuracy:.4f}"), ("macro_f1", f"{e.macro_f1:.4f}")]
        pairs += [(f"confusion[{i}]", row) for i, row in enumerate(rows)]
    else:
        pairs += [("loss", f"{e.loss:.4f}"), ("perplexity", f"{e.perplexity:.3f}"),
                  ("exact_match", f"{e.exact_match:.4f}"), ("tokens", str(e.tokens))]  # fmt: skip
    return pairs


def print_pairs(pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        sys.stdout.write(f"{key:<{width}}  {value}\n")


def upload_progress(total_label: str) -> Progress:
    return Progress(
        TextColumn(total_label),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=not sys.stderr.isatty(),
    )


# ---------------------------------------------------------------------------------------------- training


def job_state(job: training_pb2.FineTuneJob) -> str:
    return c.enum_name(*c.JOB_STATE, job.state)


def metrics_text(m: training_pb2.FineTuneMetrics) -> str:
    parts = []
    if m.total_steps:
        parts.append(f"step {m.step}/{m.total_steps}")
    if m.epoch:
        parts.append(f"epoch {m.epoch}")
    if m.step:
        parts.append(f"loss {m.train_loss:.4f}")
    if m.metric_name or m.HasField("validation_metric"):
        parts.append(f"{m.metric_name or 'validation'} {_known(m, 'validation_metric', 'not yet scored')} "
                     f"(baseline {_known(m, 'baseline_metric', 'not yet measured')})")  # fmt: skip
    return "  ".join(parts)


def _known(m: training_pb2.FineTuneMetrics, field: str, unknown: str) -> str:
    """A figure the job has measured; the server leaves it unset until then (never a 0 that is not one)."""
    return f"{getattr(m, field):.4f}" if m.HasField(field) else unknown


def jobs_table(jobs: list[training_pb2.FineTuneJob]) -> Table:
    table = Table(show_header=True, header_style="bold")
    for col in ("ID", "ADAPTER", "TASK", "METHOD", "STATE", "PROGRESS", "RESULT", "CREATED"):
        table.add_column(col)
    for j in jobs:
        m = j.metrics
        table.add_row(
            j.id,
            j.adapter,
            c.enum_name(*c.TASK, j.task),
            c.enum_name(*c.METHOD, j.method),
            job_state(j),
            f"{m.step}/{m.total_steps}" if m.total_steps else "-",
            j.result_adapter or "-",
            when(j.created_at),
        )
    return table


def job_details(j: training_pb2.FineTuneJob) -> list[tuple[str, str]]:
    pairs = [
        ("id", j.id),
        ("adapter", j.adapter),
        ("task", c.enum_name(*c.TASK, j.task)),
        ("method", c.enum_name(*c.METHOD, j.method)),
        ("state", job_state(j)),
        ("progress", metrics_text(j.metrics) or "-"),
        *candidate_lines(j.metrics),
        ("result", (j.result_adapter or "-") + (" (promoted)" if j.promoted else "")),
        ("created", when(j.created_at)),
        ("finished", when(j.finished_at)),
    ]
    if j.error:
        pairs.append(("error", j.error))
    return pairs


def candidate_lines(m: training_pb2.FineTuneMetrics) -> list[tuple[str, str]]:
    pairs = []
    for x in m.candidates:
        text = x.status + (
            f" {x.score:.4f} ± {x.stderr:.4f} in {x.seconds:.1f} s" if x.status == "scored" else ""
        )
        pairs.append((f"candidate {x.name}", text + (f" ({x.note})" if x.note else "")))
    if m.winner_reason:
        pairs.append(("why", m.winner_reason))
    if m.previous_task_examples:
        pairs.append(("previous task", f"{m.previous_task_score:.4f} vs {m.previous_task_reference:.4f} "
                      f"± {m.previous_task_stderr:.4f}"))  # fmt: skip
    return pairs


def job_summary(j: training_pb2.FineTuneJob) -> str:
    line = f"job {j.id} {job_state(j)}"
    if j.error:
        line += f": {j.error}"
    elif j.result_adapter:
        line += f": adapter {j.result_adapter}" + (" promoted" if j.promoted else " not promoted")
    m = j.metrics
    if m.metric_name and m.HasField("validation_metric"):
        line += (
            f" ({m.metric_name} {m.validation_metric:.4f} vs baseline {_known(m, 'baseline_metric', '-')})"
        )
    return line


class JobProgress:
    """Shows FineTuneEvents: a live rich bar (on stderr) when both streams are a terminal; otherwise one
    line per event on stdout, flushed as it comes, so a pipe (`| tee`, `| grep`) reads each at once."""

    def __init__(self, job_id: str):
        self.live = sys.stderr.isatty() and sys.stdout.isatty()
        self.console = stderr_console()
        self._last_line = ""
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(f"fine-tune {job_id}", total=None, info="")

    def __enter__(self) -> JobProgress:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def update(self, event: training_pb2.FineTuneEvent) -> None:
        job, m = event.job, event.job.metrics
        info = metrics_text(m)
        if self.live:
            state = job_state(job)
            if state != self._last_line:  # one permanent line per state change; the bar shows the rest
                self.progress.console.print(
                    f"{state}  {event.message}".rstrip(), highlight=False, markup=False
                )
                self._last_line = state
            self.progress.update(
                self.task, total=m.total_steps or None, completed=m.step, info=f"{state}  {info}"
            )
        else:
            line = f"[{job_state(job)}] {info}" + (f"  {event.message}" if event.message else "")
            if line != self._last_line:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()  # a pipe is block-buffered: without it nothing shows until the job ends
                self._last_line = line
