# Serves a prebuilt bundle: no torch in the image (build bundles with `funnel build` elsewhere).
#   docker build -t funnel .
#   docker run -p 8000:8000 -v $PWD/bundles/ml-100k:/bundle:ro funnel
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/srv/.numba-cache \
    FUNNEL_BUNDLE=/bundle FUNNEL_DB_PATH=/state/funnel.db FUNNEL_HOST=0.0.0.0 FUNNEL_PORT=8000

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app app
COPY core core
COPY sim sim
COPY retrieval retrieval
COPY prerank prerank
COPY rank rank
COPY fusion fusion
COPY rerank rerank
COPY loadtest loadtest
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 funnel \
 && mkdir -p /state /srv/.numba-cache && chown funnel /state /srv/.numba-cache

USER funnel
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz').status == 200 else 1)"
CMD ["funnel", "serve"]
