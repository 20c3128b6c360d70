# The aioqueue demo worker image (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (cached while only the demo or tests change), then the whole project.
COPY pyproject.toml README.md ./
COPY aioqueue ./aioqueue
RUN pip install ".[fast,aiohttp]"
COPY . .

RUN useradd --system --uid 10001 --no-create-home aioqueue
USER aioqueue

# Overridden by docker-compose.yml; `python -m` puts /app on sys.path for services.demo.
CMD ["python", "-m", "aioqueue.worker", "services.demo.tasks:app", "--concurrency", "50"]
