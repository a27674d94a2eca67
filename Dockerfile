# noodle's image: the package with its execution stack, `noodle` as the entrypoint, no model inside
# (models come from a volume: see docs/kubernetes.md).
#
#   docker build -t noodle:0.1.0 .                                   # CPU (torch's CPU wheels)
#   docker build -t noodle:0.1.0-cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .  # CUDA: the wheels bring their CUDA libraries
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/noodle
ENV PATH=/opt/noodle/bin:$PATH
# torch first, from the index that decides CPU or CUDA; `.[exec]` then keeps it (its range allows it).
# DL3013 (pin pip versions) is waived below: it is this source tree, not a package name.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY noodle ./noodle
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[exec]" && noodle --version

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 noodle \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin noodle
COPY --from=build /opt/noodle /opt/noodle
# HOME=/tmp: the pods mount /tmp writable and keep the root file system read-only
ENV PATH=/opt/noodle/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
EXPOSE 8000 50051
ENTRYPOINT ["noodle"]
CMD ["--help"]
