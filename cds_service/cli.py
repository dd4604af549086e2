"""cds-service: the secondary-osteoporosis CDS Hooks service (serve), the same engine offline (evaluate), over a
whole Bulk Data export (screen), the request for a patient Bundle (request), a site's code survey (codes) and the
catalog check for content reviewers (check-catalog)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

import orjson

from .config import Settings


def _serve(args: argparse.Namespace) -> int:
    import os
    import shutil
    from pathlib import Path

    settings = Settings.from_env(host=args.host, port=args.port, workers=args.workers)
    # metrics from every worker: prometheus_client's multiprocess mode, set up before it is imported
    prom_dir = Path(settings.data_dir).resolve() / f"prometheus-{os.getpid()}"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)

    from gunicorn.app.base import BaseApplication

    from .web.http_server import log_config
    from prometheus_client import multiprocess

    from . import create_app

    def child_exit(server, worker):
        multiprocess.mark_process_dead(worker.pid)

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", max(1, settings.workers))
            self.cfg.set("threads", max(1, settings.threads))
            self.cfg.set("worker_class", "cds_service.web.http_server.JsonErrorWorker")   # gthread, JSON error answers
            self.cfg.set("preload_app", True)          # load and validate the catalog once, before forking
            self.cfg.set("timeout", 60)
            # workers recycled now and then, at staggered times: a burst's memory is given back, never all at once
            self.cfg.set("max_requests", settings.max_requests)
            self.cfg.set("max_requests_jitter", settings.max_requests // 4)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("keepalive", 5)
            self.cfg.set("accesslog", None)            # our own JSON request log has no patient data
            self.cfg.set("logconfig_dict", log_config(settings.log_level))
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("child_exit", child_exit)
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)   # one socket in $HOME would be shared by every instance

        def load(self):
            return app

    _check_port_free(settings.host, settings.port)
    app = create_app(settings)                         # settings, catalog and store checked before the banner
    auth = "client JWTs required" if settings.auth_required else "client JWT authentication OFF (CDS_AUTH=off): local testing only"
    print(f"cds-service: serving secondary-osteoporosis on http://{settings.host}:{settings.port} "
          f"({max(1, settings.workers)} workers, {auth}); discovery at /cds-services", file=sys.stderr, flush=True)
    master = os.getpid()
    try:
        Server().run()
    finally:
        # a worker leaving (recycled, or at shutdown) unwinds through here too, in its own process: only the master
        # removes the metrics folder. A recycled worker that removed it left every later worker failing each request
        # on its first metric (FileNotFoundError: a 500 for every patient-view after the first recycling).
        if os.getpid() == master:
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A port in use is a one-line start-up error, not gunicorn's retry loop and traceback."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ValueError(f"cannot bind {host}:{port}: the host name does not resolve (CDS_HOST or --host)") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(f"cannot bind {host}:{port}: {exc.strerror or exc} (CDS_PORT or --port)") from None


def _evaluate(args: argparse.Namespace) -> int:
    from .fhir.bundles import request_from_bundle
    from .knowledge.catalog import load_catalog
    from .errors import ServiceError, operation_outcome
    from .fhir.fhir_client import FhirClient
    from .services import CollectBetween, ServiceRegistry, evaluation_line, keep_out_of_gc_scans

    settings = Settings.from_env()
    as_of = _as_of(args, settings)
    services = ServiceRegistry(load_catalog(settings.cards_dir or None), FhirClient(), settings.fhir_timeout,
                               settings.fhir_page_size)
    keep_out_of_gc_scans()
    between = CollectBetween()                   # the cyclic collector between files, not inside one
    book = None
    if settings.snooze_secret_list:               # the service's own store: --explain says when a card is snoozed
        from .storage.feedback import open_store
        from .storage.snooze import SnoozeBook
        book = SnoozeBook(open_store(settings.resolved_database_url), settings.snooze_secret_list, settings.snooze_days)

    def snoozed(body: dict, result) -> bool:
        return book is not None and book.is_snoozed(body.get("fhirServer") or "", result.assessment.patient_id,
                                                    result.assessment, datetime.now(timezone.utc))
    failures = 0
    for name in _input_files(args.files):
        try:
            with between.unit():
                data = orjson.loads(sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes())
                body = request_from_bundle(data) if isinstance(data, dict) and data.get("resourceType") == "Bundle" \
                    else data
                line = evaluation_line(services, body, as_of, args.explain, snoozed)
        except OSError as exc:
            failures += 1
            message = f"cannot read {name}: {exc.strerror or type(exc).__name__}"
            line = {"file": name, "error": operation_outcome(message)}
            sys.stderr.write(f"cds-service evaluate: {message}\n")
        except orjson.JSONDecodeError as exc:
            failures += 1
            message = f"{name} is not valid JSON: {exc}"          # orjson says where: line, column, char
            line = {"file": name, "error": operation_outcome(message)}
            sys.stderr.write(f"cds-service evaluate: {message}\n")
        except ServiceError as exc:
            failures += 1
            line = {"file": name, "status": exc.status, "error": operation_outcome(exc.diagnostics, exc.code)}
            sys.stderr.write(f"cds-service evaluate: {name}: {exc.status} {exc.diagnostics}\n")
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
    sys.stdout.flush()
    return 1 if failures else 0


def _request(args: argparse.Namespace) -> int:
    """The patient-view request an EHR would send for a patient Bundle: what to POST with curl or a test client."""
    from .fhir.bundles import request_from_bundle
    from .errors import ServiceError

    name = args.bundle
    try:
        data = orjson.loads(sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise ValueError(f"{name} is not a FHIR Bundle")
    try:
        body = request_from_bundle(data)
    except ServiceError as exc:
        raise ValueError(f"{name}: {exc.diagnostics}") from None
    if args.fhir_server:
        body["fhirServer"] = args.fhir_server
    sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _screen(args: argparse.Namespace) -> int:
    """Every patient of a Bulk Data export: findings, worklist, report and summary in --out."""
    from .screening import progress_bar, screen

    settings = Settings.from_env()
    as_of = _as_of(args, settings)
    workers = args.workers or len(os.sched_getaffinity(0))
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    if args.master and args.engine != "spark":
        raise ValueError("--master is for --engine spark")
    try:
        summary = screen(args.export, args.out, as_of, workers, settings.cards_dir or None, progress_bar(),
                         engine=args.engine, master=args.master)
    except KeyboardInterrupt:
        print("cds-service screen: interrupted; no output was written", file=sys.stderr)
        return 130
    problems = [f"{len(summary['malformed_lines'])} unreadable line(s)" if summary["malformed_lines"] else "",
                f"{len(summary['failed_patients'])} patient(s) failed" if summary["failed_patients"] else "",
                f"{sum(summary['resources_without_patient'].values())} resource(s) without a patient"
                if summary["resources_without_patient"] else ""]
    cards = sum(summary["cards"].values())
    print(f"cds-service screen: {summary['patients']:,} patients, {cards:,} with a card, "
          f"{summary['patients_per_second']:,} patients/s; wrote {args.out}/"
          "{findings.ndjson,worklist.csv,worklist.parquet,report.html,summary.json}", file=sys.stderr)
    if any(problems):
        print("cds-service screen: warning: " + ", ".join(p for p in problems if p)
              + " (summary.json and report.html list them)", file=sys.stderr)
    return 0


def _spark_classes(args: argparse.Namespace) -> int:
    """Record the class archive local Spark sessions start from (once per machine, and after a Java or PySpark
    upgrade): `screen --engine spark` then starts its JVM in about half the time."""
    from .screening.spark import record_class_archive

    started = time.perf_counter()
    path = record_class_archive()
    print(f"cds-service spark-classes: recorded {path} ({path.stat().st_size / 1e6:,.0f} MB) in "
          f"{time.perf_counter() - started:,.0f} s; local Spark sessions now start from it", file=sys.stderr)
    return 0


def _check_catalog(args: argparse.Namespace) -> int:
    """For a content reviewer's CI: exit 0 and a summary, or every problem and exit 2."""
    from .knowledge.catalog import DEFAULT_CARDS_DIR, load_catalog

    folder = args.directory or Settings.from_env().cards_dir or str(DEFAULT_CARDS_DIR)
    catalog = load_catalog(folder)
    print(f"{folder}: catalog {catalog.version} OK: {len(catalog.causes)} causes, "
          f"{len(catalog.observation_rules)} lab rules, {len(catalog.value_sets)} value sets")
    return 0


def _as_of(args: argparse.Namespace, settings: Settings) -> date:
    """--as-of, else CDS_AS_OF, else today."""
    try:
        return date.fromisoformat(args.as_of) if args.as_of else settings.evaluation_date()
    except ValueError:
        raise ValueError(f"--as-of {args.as_of!r} is not a date (YYYY-MM-DD)") from None


def _input_files(names: list[str]) -> list[str]:
    """Files as named; a folder stands for every *.json in it, in name order; "-" is standard input."""
    from .clinical.survey import bundle_files

    out: list[str] = []
    for name in names:
        out += [str(f) for f in bundle_files([name])] if name != "-" and Path(name).is_dir() else [name]
    return out


def _codes(args: argparse.Namespace) -> int:
    from .knowledge.catalog import load_catalog
    from .clinical.survey import run

    settings = Settings.from_env()
    as_of = _as_of(args, settings)
    return run(load_catalog(settings.cards_dir or None), args.paths, args.unmatched, args.csv, as_of=as_of)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__, epilog=_settings_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the CDS Hooks service (gunicorn)")
    serve.add_argument("--host", default=None, help="bind address (CDS_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (CDS_PORT, default 8080)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes (CDS_WORKERS, default: cores)")
    serve.set_defaults(func=_serve)
    ev = sub.add_parser("evaluate", help="print the service response for FHIR Bundles or CDS Hooks requests")
    ev.add_argument("files", nargs="+", help="FHIR R4 Bundle (one patient) or CDS Hooks request JSON files")
    ev.add_argument("--as-of", default=None, help="evaluation date YYYY-MM-DD (default: today or CDS_AS_OF)")
    ev.add_argument("--explain", action="store_true", help="add the findings and their evidence to each line")
    ev.set_defaults(func=_evaluate)
    codes = sub.add_parser("codes", help="list every distinct coding in FHIR Bundles and what the catalog makes of it")
    codes.add_argument("paths", nargs="+", help="Bundle files, or folders of *.json Bundles")
    codes.add_argument("--unmatched", action="store_true", help="only codings the catalog gives no meaning")
    codes.add_argument("--csv", action="store_true", help="CSV instead of a tab-separated table")
    codes.add_argument("--as-of", help="evaluation date for the rows read from the record (default: today)")
    codes.set_defaults(func=_codes)
    req = sub.add_parser("request", help="print the patient-view request for a patient Bundle (to POST it)")
    req.add_argument("bundle", help="FHIR R4 Bundle holding one Patient and their resources, or - for stdin")
    req.add_argument("--fhir-server", default=None, help="fhirServer to name in the request (for the fallback)")
    req.set_defaults(func=_request)
    scr = sub.add_parser("screen", help="screen every patient of a FHIR Bulk Data export (findings, worklist, report)")
    scr.add_argument("export", help="Bulk Data export folder (Type.*.ndjson[.gz]) or its completion manifest")
    scr.add_argument("--out", required=True, help="folder for findings.ndjson, worklist.csv/.parquet, report.html, summary.json")
    scr.add_argument("--as-of", default=None, help="evaluation date YYYY-MM-DD (default: today or CDS_AS_OF)")
    scr.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    scr.add_argument("--engine", choices=["local", "spark"], default="local",
                     help="local: DuckDB and worker processes on this machine; spark: Apache Spark (the [spark] "
                          "extra), on --master, the spark-submit session, or local[WORKERS]")
    scr.add_argument("--master", default=None, help="Spark master URL with --engine spark (yarn, k8s://..., "
                                                    "spark://host:7077, local[4]); default: spark-submit's or local")
    scr.set_defaults(func=_screen)
    classes = sub.add_parser("spark-classes", help="record the class archive that local Spark sessions (screen "
                                                   "--engine spark) start from: once per machine, ~1 minute")
    classes.set_defaults(func=_spark_classes)
    check = sub.add_parser("check-catalog", help="validate a catalog folder (default: the one the service uses)")
    check.add_argument("directory", nargs="?", default=None, help="folder holding catalog.yaml and the files it names")
    check.set_defaults(func=_check_catalog)
    args = parser.parse_args(argv)
    from .knowledge.catalog import CatalogError
    try:
        return args.func(args)
    except BrokenPipeError:                       # `cds-service codes ... | head`: the reader has what it wanted
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())     # no second error when Python flushes stdout at exit
        return 141                                # 128 + SIGPIPE, as a command killed by the signal
    except CatalogError as exc:                   # every problem, one line each, as cards/FILE:LINE: message
        if len(exc.problems) == 1:
            print(f"cds-service {args.command}: {exc.problems[0]}", file=sys.stderr)
            return 2
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"cds-service {args.command}: the catalog has {len(exc.problems)} problem(s)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:          # settings, store URL, dates: one line, exit 2
        print(f"cds-service {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cds-secondary-osteoporosis")
    except PackageNotFoundError:                  # run from a source tree that was never installed
        return "unknown"


def _settings_help() -> str:
    from .config import ENV_DOC, Settings

    defaults = Settings.__dataclass_fields__
    lines = ["settings (environment variables, read by every command; 'COMMAND --help' for its options):"]
    for name, doc in ENV_DOC.items():
        default = defaults[name].default
        shown = f" [default: {default}]" if isinstance(default, (str, int, float)) and default != "" else ""
        lines.append(f"  CDS_{name.upper():18s} {doc}{shown}")
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
