# shoal's container image. The default target, `cpu`, holds a CPU build of torch from PyTorch's CPU index.
#
#   docker build -t shoal .                                                    # CPU
#   docker build -t shoal:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .  # CUDA (PyPI's torch)
#   docker build -t shoal:cluster --build-arg EXTRAS=cluster .                 # + Ray Serve (KubeRay)
#   deploy/container/build-offline [--tag TAG]                                 # no registry reachable
#
# Build args: TORCH_INDEX_URL (empty: whatever pip is configured with), TORCH_VERSION, EXTRAS (shoal's extras,
# e.g. cluster), APT_PACKAGES (more Debian packages in the final image, e.g. `ffmpeg` so the web UI streams).
# PIP_CONF names a pip.conf that the build mounts (build-offline does); nothing of it stays in the image.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ARG PIP_CONF=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# torch first, in a layer of its own: it is most of the image and changes least.
RUN if [ -n "$PIP_CONF" ]; then export PIP_CONFIG_FILE="$PIP_CONF"; fi \
 && python3 -m venv /opt/shoal \
 && /opt/shoal/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      "torch==$TORCH_VERSION"
COPY pyproject.toml README.md /src/
COPY src /src/src
ARG EXTRAS=""
RUN if [ -n "$PIP_CONF" ]; then export PIP_CONFIG_FILE="$PIP_CONF"; fi \
 && /opt/shoal/bin/pip install --no-cache-dir "/src${EXTRAS:+[$EXTRAS]}" \
 && find /opt/shoal -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS cpu
ARG APT_PACKAGES=""
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates $APT_PACKAGES \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && useradd --uid 1000 --user-group --create-home --home-dir /home/shoal --shell /usr/sbin/nologin shoal \
 && mkdir -p /data /checkpoints \
 && chown shoal:shoal /data /checkpoints
COPY --from=build /opt/shoal /opt/shoal
# On PATH for login shells too (Debian's /etc/profile resets PATH; KubeRay starts Ray with `bash -lc`).
RUN for tool in shoal ray serve; do [ ! -e /opt/shoal/bin/$tool ] || ln -s /opt/shoal/bin/$tool /usr/local/bin/; done
COPY deploy/container/healthcheck /usr/local/bin/shoal-healthcheck
# `shoal download` (default dir checkpoints/<repo>) and `shoal serve` (which looks in checkpoints/ first) both
# resolve checkpoints/ against the working directory /: the checkpoints volume.
ENV PATH=/opt/shoal/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SHOAL_HOST=0.0.0.0 \
    SHOAL_PORT=8080 \
    SHOAL_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    XDG_CACHE_HOME=/data/cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /
USER 1000:1000
VOLUME ["/data", "/checkpoints"]
# HTTP, and Wyoming (on when SHOAL_WYOMING_PORT is set; compose.yaml sets it)
EXPOSE 8080 10200
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["shoal-healthcheck"]
# shoal itself is PID 1: SIGTERM reaches it, it lets in-flight requests finish (SHOAL_SHUTDOWN_GRACE, 30 s) and
# exits 0. Arguments after the image name replace `serve`: `docker run ... shoal download`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["shoal"]
CMD ["serve"]
