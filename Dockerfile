FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY cards ./cards
COPY fixtures ./fixtures
COPY tools ./tools
# builds the wheel (the catalog inside it) and installs it
RUN pip install --no-cache-dir . && useradd --system --home /data cds && mkdir -p /data && chown cds /data
USER cds
ENV CDS_HOST=0.0.0.0 CDS_PORT=8080 CDS_DATA_DIR=/data
EXPOSE 8080
CMD ["cds-service", "serve"]
