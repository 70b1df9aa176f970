# syntax=docker/dockerfile:1
# The moecluster image (CPU): the operator by default; workers and frontends run
# the same image with their own command (python -m moecluster.workers.server ...).
#
#   docker build -t moecluster:dev .
#   docker build -t moecluster:e2e --build-arg TINY_MODEL=1 .   # + /models/tiny-mixtral
#
# Runs as uid 10001 with a read-only root filesystem: nothing is written outside
# HOME=/tmp, which Kubernetes mounts as an emptyDir.
FROM python:3.11-slim

# 1: bake a tiny random Mixtral checkpoint at /models/tiny-mixtral (e2e tests, demos).
ARG TINY_MODEL=0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    TRANSFORMERS_VERBOSITY=error

# torch first, from its CPU index (about 200 MB instead of the CUDA wheel's
# gigabytes), at the version pyproject.toml pins. Its own layer: it changes
# only when the pin does, not with every source edit.
COPY pyproject.toml /tmp/src/pyproject.toml
RUN pip install "$(python -c 'import tomllib; d = tomllib.load(open("/tmp/src/pyproject.toml", "rb")); \
print(next(r for r in d["project"]["dependencies"] if r.startswith("torch")))')" \
      --index-url https://download.pytorch.org/whl/cpu

# The repository root is the package (pyproject maps "moecluster" to "."). A
# regular, non-editable install: the source tree is deleted afterwards and the
# installed package never needs to write next to itself.
COPY . /tmp/src
RUN pip install "/tmp/src[k8s]" \
 && rm -rf /tmp/src /tmp/.cache \
 && python -c "import moecluster, kopf, kubernetes, torch; print('moecluster', moecluster.__file__, 'torch', torch.__version__)"

RUN if [ "$TINY_MODEL" = "1" ]; then \
      moectl model create --family mixtral --out /models/tiny-mixtral \
      && chmod -R a+rX /models && rm -rf /tmp/.cache; \
    fi

USER 10001:10001
WORKDIR /tmp
# Controller gRPC (operator), frontend, worker gRPC, worker bulk transfers, metrics, operator healthz.
EXPOSE 50055 50051 50061 50062 9090 8080
ENTRYPOINT ["moecluster-operator"]
