"""Secondary-osteoporosis CDS Hooks service."""
from __future__ import annotations

import gc
import logging

from flask import Flask

from .config import Settings

__version__ = "0.1.0"


def create_app(settings: Settings | None = None) -> Flask:
    """Application factory: build the catalog, engine, FHIR client and feedback store once."""
    from . import api, logs
    from .catalog import load_catalog
    from .feedback import open_store
    from .fhir_client import FhirClient
    from .record import warm_models
    from .service import OsteoporosisService

    settings = settings or Settings.from_env()
    logs.configure(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    catalog = load_catalog(settings.cards_dir or None)
    warm_models()
    client = FhirClient(max_pages=settings.fhir_max_pages, max_bytes=settings.fhir_max_bytes)
    app.extensions["cds"] = {
        "settings": settings,
        "catalog": catalog,
        "service": OsteoporosisService(catalog, client, settings.fhir_timeout, settings.fhir_page_size,
                                       settings.fhir_allowlist_prefixes),
        "feedback": open_store(settings.resolved_database_url),
    }
    app.register_blueprint(api.bp)
    if settings.bench_endpoint:
        app.register_blueprint(api.bench_bp)
    api.install_handlers(app)
    logging.getLogger(__name__).info("service ready", extra={"event": "startup", "catalog_version": catalog.version})
    # The catalog and models live for the whole process: keep them out of the cyclic GC's scans.
    gc.collect()
    gc.freeze()
    return app
