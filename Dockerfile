# One image for every role: api, dispatcher, ray head and ray workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY workers ./workers
COPY service ./service
COPY migrations ./migrations
COPY examples ./examples
RUN pip install .

ENV TRAINQ_HOME=/data
VOLUME ["/data"]
EXPOSE 8000
CMD ["trainq", "api", "--host", "0.0.0.0", "--port", "8000"]
