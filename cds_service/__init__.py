"""Secondary-osteoporosis CDS Hooks service."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings

if TYPE_CHECKING:            # Flask is imported by create_app: the CLI's screen and evaluate never load it
    from flask import Flask

__version__ = "0.1.0"


def service_secrets(settings: Settings, store) -> list[str]:
    """The configured secrets (current first), or one made once and kept in the store (shared by every worker)."""
    return settings.snooze_secret_list or [getattr(store, "store", store).secret("snooze-hmac")]


def snooze_book(settings: Settings, store, secrets: list[str], behind=None):
    """The snooze book (on by default), keyed with the service secrets."""
    from .storage.snooze import SnoozeBook
    if settings.snooze != "on":
        return None
    return SnoozeBook(store, secrets, settings.snooze_days, behind=behind)


def create_app(settings: Settings | None = None) -> Flask:
    """Application factory: build the catalog, engine, FHIR client and feedback store once."""
    from flask import Flask

    from .web import api
    from . import logs
    from .knowledge.catalog import load_catalog
    from .storage.behind import BehindTheResponse
    from .storage.card_ids import CardIds
    from .storage.feedback import GuardedStore, open_store
    from .fhir.fhir_client import FhirClient
    from .fhir.record import warm_models
    from .services import CollectBetween, ServiceRegistry, keep_out_of_gc_scans

    settings = settings or Settings.from_env()
    logs.configure(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    catalog = load_catalog(settings.cards_dir or None)
    warm_models()
    client = FhirClient(max_pages=settings.fhir_max_pages, max_bytes=settings.fhir_max_bytes)
    store = GuardedStore(open_store(settings.resolved_database_url))      # deadlines: a stuck store never stalls us
    behind = BehindTheResponse()                                           # store writes after the response
    secrets = service_secrets(settings, store)                             # read from the store once, if kept there
    authenticator = None
    if settings.auth_required:
        from .web.auth import ClientAuthenticator, JtiStore, SharedJtiStore, parse_trusted_issuers
        issuers = parse_trusted_issuers(settings.trusted_issuers)
        if not issuers:
            raise ValueError("Client authentication is required but CDS_TRUSTED_ISSUERS is empty "
                             "(set it, or CDS_AUTH=off for local testing)")
        jti = JtiStore(Path(settings.data_dir) / "jti.sqlite3")
        if hasattr(store.store, "first_use_jti"):          # PostgreSQL: one replay cache for every replica
            jti = SharedJtiStore(store, jti)
        authenticator = ClientAuthenticator(issuers, jti)
    else:
        logging.getLogger(__name__).warning(
            "client JWT authentication is OFF (CDS_AUTH=%s, host %s): for local testing only", settings.auth,
            settings.host, extra={"event": "auth_off"})
    app.extensions["cds"] = {
        "authenticator": authenticator,
        "settings": settings,
        "catalog": catalog,
        "services": ServiceRegistry(catalog, client, settings.fhir_timeout, settings.fhir_page_size,
                                    settings.fhir_allowlist_prefixes),
        "feedback": store,
        "behind": behind,
        "card_ids": CardIds(secrets),
        "snooze": snooze_book(settings, store, secrets, behind),
    }
    app.register_blueprint(api.bp)
    # the cyclic collector between requests, not inside them (where it re-walks the request's own objects)
    app.wsgi_app = CollectBetween().wrap_wsgi(api.SlashTolerant(app.wsgi_app))
    if settings.bench_endpoint:
        app.register_blueprint(api.bench_bp)
    api.install_handlers(app)
    logging.getLogger(__name__).info("service ready", extra={"event": "startup", "catalog_version": catalog.version})
    keep_out_of_gc_scans()
    return app

