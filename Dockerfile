FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY cards ./cards
COPY fixtures ./fixtures
COPY tools ./tools
RUN pip install --no-cache-dir . && useradd --system --home /data cds && mkdir -p /data && chown cds /data
USER cds
ENV CDS_HOST=0.0.0.0 CDS_PORT=8080 CDS_DATA_DIR=/data CDS_CARDS_DIR=/app/cards
EXPOSE 8080
CMD ["cds-service", "serve"]
