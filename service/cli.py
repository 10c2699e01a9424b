"""The ``trainq`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from core import DatasetUnavailable, SpecError, fit, load_dataset, parse_job_spec, summarize

if TYPE_CHECKING:
    from service.context import ServiceContext
    from service.settings import Settings

BAR_WIDTH = 30
#: What ``trainq upload`` sends (the API's ``format``), told by a file's suffix.
UPLOAD_FORMATS = ("npz", "csv", "txt")


class ProgressBar:
    """One line per epoch that fills as batches finish (redrawn in place on a terminal)."""

    def __init__(self, *, epochs: int, steps_per_epoch: int, stream: TextIO = sys.stderr) -> None:
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.stream = stream
        self.live = stream.isatty()
        self.epoch = 1
        self.started = time.perf_counter()

    def step(self, step: int, loss: float) -> None:
        if not self.live:
            return
        done = (step - 1) % self.steps_per_epoch + 1
        filled = BAR_WIDTH * done // self.steps_per_epoch
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(
            f"\repoch {self.epoch}/{self.epochs} [{bar}] {done}/{self.steps_per_epoch} "
            f"loss {loss:.4f}"
        )
        self.stream.flush()

    def epoch_done(self, epoch: int, metrics: dict[str, float]) -> None:
        shown = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "samples_per_s"]
        parts = [f"{name} {metrics[name]:.4g}" for name in shown if name in metrics]
        prefix = "\r" if self.live else ""
        bar = "#" * BAR_WIDTH
        self.stream.write(
            f"{prefix}epoch {epoch}/{self.epochs} [{bar}] " + "  ".join(parts) + "\033[K\n"
            if self.live
            else f"epoch {epoch}/{self.epochs}  " + "  ".join(parts) + "\n"
        )
        self.stream.flush()
        self.epoch = epoch + 1


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


class CommandError(Exception):
    """A failure the command line reports as one line, exit status 2."""


def _read_spec(path: str) -> Any:
    """A job spec file's JSON; a file that is not JSON is an error that names it."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path} is not JSON: {exc}") from None


def _train(args: argparse.Namespace) -> int:
    raw = _read_spec(args.file)
    training = raw.get("training", {}) if isinstance(raw, dict) else None
    if args.epochs is not None and isinstance(training, dict):  # then checked like the file
        raw["training"] = {**training, "epochs": args.epochs}
    job = parse_job_spec(raw)
    dataset = load_dataset(job.dataset.name)
    print(summarize(job.model, dataset.input_shape, dataset.num_classes))
    n_train = len(dataset.X) - int(round(len(dataset.X) * job.training.validation_split))
    bar = ProgressBar(
        epochs=job.training.epochs, steps_per_epoch=math.ceil(n_train / job.training.batch_size)
    )
    result = fit(job, dataset, on_step=bar.step, on_epoch=bar.epoch_done, threads=args.threads)
    for name, value in result.test.items():
        print(f"{name} {value:.4f}")
    if args.save:
        Path(args.save).write_bytes(result.trainer.save())
        print(f"saved {args.save}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    job = parse_job_spec(_read_spec(args.file))
    dataset = load_dataset(job.dataset.name)
    print(summarize(job.model, dataset.input_shape, dataset.num_classes))
    return 0


def _settings_before_ray() -> Settings:
    """The service's settings, read before Ray is imported.

    A new local Ray turns token authentication on by default and warns at every
    start that it did. Choosing it explicitly (``RAY_AUTH_MODE``, read when Ray is
    imported) keeps that default without the warning; joining ``RAY_ADDRESS`` leaves
    the cluster's own mode alone.
    """
    from service.settings import get_settings

    settings = get_settings()
    if settings.ray_address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    return settings


def _up(args: argparse.Namespace) -> int:
    import threading

    settings = _settings_before_ray()
    from service import roles

    context = roles.prepare(settings)
    token = roles.first_admin_token(context)
    resources = roles.start_ray(settings)
    context.needs_ray = True
    context.cluster_workers = int(resources.get("CPU", 1))
    context.cluster_gpus = int(resources.get("GPU", 0))
    stop = threading.Event()
    roles.run_dispatchers(context, count=args.dispatchers, runner=roles.job_runner(), stop=stop)
    url = f"http://{args.host}:{args.port}"
    print(f"trainq is up: data under {settings.home.resolve()}")
    print(f"home page: {url}/")
    print(f"API: {url}/api/v1  (OpenAPI docs at {url}/docs)")
    if token is not None:
        print("admin token for team 'default' (shown once; saved for the CLI):")
        print(token)
    try:
        roles.serve(context, host=args.host, port=args.port)
    finally:
        stop.set()
    return 0


def _api(args: argparse.Namespace) -> int:
    from service import roles

    context = _migrated_context()
    if args.workers > 1:  # each worker process builds its own context
        context.engine.dispose()
        import uvicorn

        uvicorn.run(
            "service.app:app_from_environment",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="warning",
            access_log=False,
        )
        return 0
    roles.serve(context, host=args.host, port=args.port)
    return 0


def _dispatcher(args: argparse.Namespace) -> int:
    import signal
    import threading

    settings = _settings_before_ray()
    from service import roles

    context = _migrated_context(settings)
    roles.start_ray(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = roles.run_dispatchers(context, count=args.count, runner=roles.job_runner(), stop=stop)
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=1.0)
    except KeyboardInterrupt:
        stop.set()
    return 0


def _require_schema(context: ServiceContext) -> None:
    """Stop with a one-line reason when the database is not at this code's revision."""
    from service.migrate import schema_problem

    problem = schema_problem(context.engine)
    if problem is not None:
        raise CommandError(problem)


def _db_upgrade(args: argparse.Namespace) -> int:
    """Migrate; at the newest revision also record the built-in datasets, so a team's
    deployment (which runs this once, before the API) offers them as ``trainq up`` does."""
    from service.settings import get_settings

    settings = get_settings()
    if args.revision == "head":
        from service import roles

        _, builtins = roles.migrate_and_register(settings)
        print("database at head")
        print(f"built-in datasets: {', '.join(builtins) or 'none'}")
        return 0
    from service.migrate import upgrade

    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url(), args.revision)
    print(f"database at {args.revision}")
    return 0


def _migrated_context(settings: Settings | None = None) -> ServiceContext:
    """The service's context (from ``settings``, else the environment's) on a database
    at this code's revision; else a one-line reason, exit 2."""
    from service.context import ServiceContext
    from service.settings import get_settings

    context = ServiceContext.from_settings(settings or get_settings())
    _require_schema(context)
    return context


def _token_create(args: argparse.Namespace) -> int:
    from service.auth import create_token

    context = _migrated_context()
    with context.session_factory() as session:
        team, token = create_token(session=session, team_name=args.team)
    print(f"token for team {team.name!r} (shown once):")
    print(token)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from service.auth import list_tokens

    context = _migrated_context()
    with context.session_factory() as session:
        tokens = list_tokens(session=session, team_name=args.team)
    print(f"{'id':>6}  {'team':<24} created")
    for token, team in tokens:
        print(f"{token.id:>6}  {team[:24]:<24} {token.created_at:%Y-%m-%d %H:%M:%S}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from service.auth import TOKEN_CACHE_S, revoke_token

    context = _migrated_context()
    with context.session_factory() as session:
        team = revoke_token(session=session, token_id=args.token_id)
    if team is None:
        raise CommandError(f"no token {args.token_id} ('trainq token list' shows them)")
    print(
        f"token {args.token_id} of team {team!r} revoked; the API stops taking it "
        f"within {TOKEN_CACHE_S:g} s"
    )
    return 0


def _client(args: argparse.Namespace):  # noqa: ANN202 - lazily imported type
    from service.client import Client

    return Client(url=args.url, token=args.token)


def _submit(args: argparse.Namespace) -> int:
    spec = _read_spec(args.file)
    job = _client(args).submit(spec, idempotency_key=args.idempotency_key)
    print(f"job {job['id']} {job['status']}: {job['name']}")
    return 0


def _jobs(args: argparse.Namespace) -> int:
    page = _client(args).jobs(status=args.status, name=args.name, limit=args.limit)
    print(f"{'id':>6}  {'status':<10} {'name':<28} {'created':<20} metrics")
    for job in page["data"]:
        final = job.get("final_metrics") or {}
        shown = "  ".join(
            f"{k} {final[k]:.4g}" for k in ("val_accuracy", "test_accuracy") if k in final
        )
        if job["status"] == "running":
            shown = _progress(job["progress"])
        print(
            f"{job['id']:>6}  {job['status']:<10} {job['name'][:28]:<28} "
            f"{job['created_at'][:19]:<20} {shown}"
        )
    print(f"{len(page['data'])} of {page['count']} jobs")
    return 0


def _progress(progress: dict[str, Any]) -> str:
    """``epoch 2/5, about 12 s left``: a running job's progress in words."""
    said = f"epoch {progress['epochs_done']}/{progress['epochs']}"
    eta = progress["eta_s"]
    if eta is None:
        return said
    minutes = round(eta / 60)
    if minutes == 0:
        left = f"{round(eta)} s"
    else:
        left = f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
    return f"{said}, about {left} left"


class _EpochPrinter:
    """Turns a job's metric events into one line per finished epoch, with a live
    line of the latest loss in between when the output is a terminal."""

    SHOWN = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "samples_per_s")

    def __init__(self, epochs: int, stream: TextIO = sys.stderr) -> None:
        self.epochs = epochs
        self.stream = stream
        self.live = stream.isatty()
        self.pending_step: int | None = None
        self.printed_step = -1  # the step of the last epoch printed
        self.rows: dict[int, dict[str, float]] = {}
        self.done = 0
        self.loss = float("nan")

    def metric(self, name: str, step: int, value: float) -> None:
        if name != "loss" and step <= self.printed_step:
            return  # sent again after a reconnection; its epoch is printed
        if self.pending_step is not None and step != self.pending_step:
            self.flush()
        if name == "loss":
            self.loss = value
            if self.live:
                filled = BAR_WIDTH * self.done // max(self.epochs, 1)
                bar = "#" * filled + "-" * (BAR_WIDTH - filled)
                self.stream.write(
                    f"\repoch {self.done + 1}/{self.epochs} [{bar}] loss {value:.4f}\033[K"
                )
                self.stream.flush()
            return
        self.rows.setdefault(step, {})[name] = value
        if name == "epoch":
            self.pending_step = step

    def flush(self) -> None:
        if self.pending_step is None:
            return
        row = self.rows.pop(self.pending_step, {})
        self.printed_step = self.pending_step
        self.pending_step = None
        self.done = int(row.get("epoch", self.done + 1))
        parts = "  ".join(f"{k} {row[k]:.4g}" for k in self.SHOWN if k in row)
        prefix = "\r" if self.live else ""
        self.stream.write(
            f"{prefix}epoch {self.done}/{self.epochs}  {parts}\033[K\n"
            if self.live
            else f"epoch {self.done}/{self.epochs}  {parts}\n"
        )
        self.stream.flush()


def _watch(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.job(args.job_id)
    where = ""
    if job["status"] == "running":
        where = f" ({_progress(job['progress'])})"
    elif job["status"] == "queued":
        where = f" ({job['jobs_ahead']} job(s) ahead)"
    print(f"job {job['id']} {job['name']}: {job['status']}{where}")
    printer = _EpochPrinter(job["spec"]["training"]["epochs"])
    # A reconnected stream sends the status and the attempts again: each is said once.
    said: set[tuple[int, str]] = set()  # (attempt number, its status)
    status = None
    for event, data in client.events(args.job_id):
        if event == "metric":
            printer.metric(data["name"], data["step"], data["value"])
            continue
        line = None
        if event == "status" and data["status"] != status:
            status = data["status"]
            line = f"status: {status}"
        elif event == "run":
            line = f"{data['kind']}: {data['message']}"
        elif event == "attempt" and (data["number"], data["status"]) not in said:
            said.add((data["number"], data["status"]))
            if data["status"] in ("failed", "lost"):
                line = f"attempt {data['number']} {data['status']}: {data['error']}"
            elif data["status"] == "running" and data["number"] > 1:
                line = f"attempt {data['number']} started"
        if line is not None:
            printer.flush()
            print(line, file=sys.stderr)
    printer.flush()
    final = client.job(args.job_id)
    print(f"job {final['id']} {final['status']}")
    for name, value in (final.get("final_metrics") or {}).items():
        if "/" not in name:
            print(f"  {name} {value:.4g}")
    if final.get("error"):
        print(f"  error: {final['error']}")
    return 0 if final["status"] == "succeeded" else 1


def _describe(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    print(f"job {job['id']} {job['name']}: {job['status']}")
    progress = job["progress"]
    said = f"epoch {progress['epochs_done']}/{progress['epochs']}"
    if job["status"] == "running":
        said = _progress(progress)
    elif job["status"] == "queued":
        said += f"; {job['jobs_ahead']} job(s) ahead in the queue"
    print(f"  dataset    {job['dataset_name']} v{job['dataset_version']}")
    print(f"  progress   {said}")
    times = [f"submitted {job['created_at']}"]
    if job["queue_wait_s"] is not None:
        times.append(f"waited {job['queue_wait_s']:.1f} s")
    if job["run_time_s"] is not None:
        times.append(f"ran {job['run_time_s']:.1f} s")
    print(f"  times      {'; '.join(times)}")
    if job["attempt_history"]:
        print("  attempts")
    for attempt in job["attempt_history"]:
        error = f": {attempt['error']}" if attempt["error"] else ""
        print(f"    {attempt['number']} {attempt['status']} on {attempt['dispatcher']}{error}")
    if job["run_events"]:
        print("  run events")
    for event in job["run_events"]:
        print(
            f"    attempt {event['attempt']}, after epoch {event['epoch']}: "
            f"{event['kind']}: {event['message']}"
        )
    final = {k: v for k, v in (job["final_metrics"] or {}).items() if "/" not in k}
    if final:
        print("  final metrics")
    for name, value in final.items():
        print(f"    {name} {value:.4g}")
    if job["error"]:
        print(f"  error: {job['error']}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    listed = _client(args).datasets(args.name)["data"]
    print(f"{'name':<24} {'version':>7}  {'kind':<20} {'input shape':<14} {'classes':>7} samples")
    for dataset in listed:
        shape = "x".join(str(d) for d in dataset["input_shape"])
        classes = dataset["num_classes"] if dataset["num_classes"] is not None else "-"
        origin = "  built-in" if dataset["builtin"] else ""
        print(
            f"{dataset['name'][:24]:<24} {dataset['version']:>7}  {dataset['kind']:<20} "
            f"{shape:<14} {classes:>7} {dataset['num_samples']}{origin}"
        )
    return 0


def _upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    fmt = args.format or path.suffix.lstrip(".").lower()
    if fmt not in UPLOAD_FORMATS:
        raise CommandError(
            f"{path}: cannot tell its format from its name; --format is one of "
            f"{', '.join(UPLOAD_FORMATS)}"
        )
    dataset = _client(args).upload(args.name, path.read_bytes(), fmt)
    shape = "x".join(str(d) for d in dataset["input_shape"])
    print(
        f"dataset {dataset['name']} version {dataset['version']}: {dataset['kind']}, "
        f"{dataset['num_samples']} samples of {shape}"
    )
    return 0


def _download(args: argparse.Namespace) -> int:
    data = _client(args).artifact(args.job_id, args.epoch)
    default = f"job-{args.job_id}" + (f"-epoch-{args.epoch}" if args.epoch is not None else "")
    path = Path(args.output or f"{default}.npz")
    path.write_bytes(data)
    print(f"saved {path} ({len(data):,} bytes)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    inputs = list(args.text) if args.text else _rows(args.file)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    answer = _client(args).predict(args.job_id, inputs, **options)
    if args.json:
        print(json.dumps(answer))
    else:
        for predicted in answer["predictions"]:
            print(predicted)
    return 0


def _rows(file: str | None) -> list[Any]:
    """The rows to predict from a file: a ``.npz``'s array ``X``, or a ``.json`` list
    (or an object with ``inputs``, the API's own body)."""
    if file is None:
        raise CommandError("predict needs rows: a .npz (array X) or .json file, or --text")
    path = Path(file)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if "X" not in arrays:
                    raise CommandError(f"{path} has no array X (it has {', '.join(arrays.files)})")
                return list(arrays["X"].tolist())
        except (ValueError, zipfile.BadZipFile) as exc:  # not an archive; Python objects
            raise CommandError(f"{path} is not an .npz of numbers: {exc}") from None
    if path.suffix != ".json":
        raise CommandError(f"{path}: predict reads a .npz (array X) or a .json list of rows")
    rows = _read_spec(file)
    rows = rows.get("inputs") if isinstance(rows, dict) else rows
    if not isinstance(rows, list):
        raise CommandError(f"{path} holds neither a list of rows nor an object with inputs")
    return rows


def _cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job_id)
    if job["status"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:  # running: its dispatcher stops it at the next step
        print(f"job {job['id']} {job['status']}: asked to stop; it stops within seconds")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    response = _client(args).metrics(
        args.job_id, names=args.names, format="csv", max_points=args.max_points
    )
    sys.stdout.write(response.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainq", description="trainq: train neural networks")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="embedded mode: API, dispatcher, local Ray, SQLite")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--dispatchers", type=int, default=1)
    up.set_defaults(run=_up)
    api = commands.add_parser("api", help="serve the REST API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.set_defaults(run=_api)
    dispatcher = commands.add_parser("dispatcher", help="claim and run queued jobs on Ray")
    dispatcher.add_argument("--count", type=int, default=1, help="dispatcher threads")
    dispatcher.set_defaults(run=_dispatcher)

    db = commands.add_parser("db", help="database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="apply migrations")
    db_upgrade.add_argument("revision", nargs="?", default="head")
    db_upgrade.set_defaults(run=_db_upgrade)

    token = commands.add_parser("token", help="API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    token_create = token_commands.add_parser("create", help="create a token (and the team)")
    token_create.add_argument("--team", required=True)
    token_create.set_defaults(run=_token_create)
    token_list = token_commands.add_parser("list", help="tokens by id, team and age (not values)")
    token_list.add_argument("--team")
    token_list.set_defaults(run=_token_list)
    token_revoke = token_commands.add_parser("revoke", help="revoke a token by its id")
    token_revoke.add_argument("token_id", type=int)
    token_revoke.set_defaults(run=_token_revoke)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--url", help="API base URL (TRAINQ_URL, default 127.0.0.1:8000)")
        command.add_argument("--token", help="API token (TRAINQ_TOKEN, or the one 'up' saved)")
        return command

    submit = client_command("submit", "submit a job spec")
    submit.add_argument("file")
    submit.add_argument("--idempotency-key")
    submit.set_defaults(run=_submit)
    jobs = client_command("jobs", "list jobs")
    jobs.add_argument("--status")
    jobs.add_argument("--name")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(run=_jobs)
    watch = client_command("watch", "follow a job live")
    watch.add_argument("job_id", type=int)
    watch.set_defaults(run=_watch)
    cancel = client_command("cancel", "cancel a queued or running job")
    cancel.add_argument("job_id", type=int)
    cancel.set_defaults(run=_cancel)
    metrics = client_command("metrics", "a job's metrics as CSV")
    metrics.add_argument("job_id", type=int)
    metrics.add_argument("--names")
    metrics.add_argument("--max-points", type=int)
    metrics.set_defaults(run=_metrics)
    predict = client_command("predict", "a job's model's predictions, one line per row")
    predict.add_argument("job_id", type=int)
    predict.add_argument("file", nargs="?", help=".npz (array X) or .json list of rows")
    predict.add_argument("--text", action="append", help="a text to predict (repeatable)")
    predict.add_argument("--max-new-tokens", type=int, default=0, help="a language model's")
    predict.add_argument("--temperature", type=float, default=0.0)
    predict.add_argument("--json", action="store_true", help="the whole answer, with outputs")
    predict.set_defaults(run=_predict)
    describe = client_command("describe", "a job: progress, attempts, run events, result")
    describe.add_argument("job_id", type=int)
    describe.set_defaults(run=_describe)
    download = client_command("download", "a job's model, or a checkpoint, as .npz")
    download.add_argument("job_id", type=int)
    download.add_argument("--epoch", type=int, help="the checkpoint of this epoch")
    download.add_argument("-o", "--output", help="file to write (job-ID[-epoch-N].npz)")
    download.set_defaults(run=_download)
    datasets = client_command("datasets", "the team's datasets and the built-ins")
    datasets.add_argument("name", nargs="?", help="one dataset's versions")
    datasets.set_defaults(run=_datasets)
    upload = client_command("upload", "upload a dataset file as the next version of NAME")
    upload.add_argument("name")
    upload.add_argument("file", help=".npz (X, y), .csv or .txt")
    upload.add_argument("--format", choices=UPLOAD_FORMATS, help="when the suffix does not say")
    upload.set_defaults(run=_upload)

    train = commands.add_parser("train", help="train a job spec in this process")
    train.add_argument("file", help="job spec (JSON)")
    train.add_argument("--epochs", type=int, help="override training.epochs")
    train.add_argument("--save", help="write the final state (.npz) here")
    train.add_argument(
        "--threads",
        type=_at_least_one,
        default=1,
        help="split each batch over this many threads (a model without batchnorm)",
    )
    train.set_defaults(run=_train)
    summary = commands.add_parser("summary", help="layers, shapes, parameters and FLOPs of a job")
    summary.add_argument("file", help="job spec (JSON)")
    summary.set_defaults(run=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (CommandError, SpecError, DatasetUnavailable, KeyError, OSError) as exc:
        print(f"trainq: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from service.client import ApiError, ApiUnreachable

        if isinstance(exc, ApiError | ApiUnreachable):
            print(f"trainq: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
