# AWS Lambda image of the streaming handler (Kinesis trigger): serve.lambda_function.lambda_handler,
# on AWS's "alternative base image" path: python:3.11-slim + the runtime interface client
# (awslambdaric), so it builds wherever a python image does. Context: the repo root; BuildKit.
#   docker build -f serve/lambda.Dockerfile -t duration-stream .
# Loads MODEL_URI through MLFLOW_TRACKING_URI at cold start (artifacts proxied by the tracking
# server). To bake a model into the image instead (no tracking server at runtime):
#   mlflow artifacts download -u models:/duration/3 -d build/model
#   docker build -f serve/lambda.Dockerfile --target baked --build-arg MODEL_VERSION=3 \
#                -t duration-stream:3 .
# Set PREDICTIONS_STREAM_NAME and DEAD_LETTER_DESTINATION on the function. Lambda runs the image
# as a non-root user on a read-only file system with a writable /tmp: nothing here needs more.
FROM python:3.11.11-slim-bookworm AS function

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LAMBDA_TASK_ROOT=/var/task \
    PYTHONPATH=/var/task \
    MODEL_URI=models:/duration@production \
    PREDICTIONS_STREAM_NAME=ride_predictions \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

WORKDIR /var/task

# Test suites of the scientific packages are dropped (~70 MB that never run in a function).
COPY serve/requirements-model.txt serve/requirements-lambda.txt /var/task/
RUN --mount=type=cache,id=duration-pip,target=/root/.cache/pip \
    pip install -r /var/task/requirements-lambda.txt \
 && site=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))") \
 && find "$site/pandas" "$site/numpy" "$site/scipy" "$site/sklearn" \
         -depth -type d -name tests -exec rm -rf {} +

COPY serve/ /var/task/serve/

# The runtime interface client polls the Lambda Runtime API and calls the handler.
ENTRYPOINT ["python", "-m", "awslambdaric"]
CMD ["serve.lambda_function.lambda_handler"]

# --target baked: the model folder of `mlflow artifacts download` inside the image.
FROM function AS baked
ARG MODEL_VERSION=""
COPY build/model/ /opt/ml/model/
ENV MODEL_LOCATION=/opt/ml/model \
    MODEL_VERSION=${MODEL_VERSION}

# The default target: the model comes from MODEL_URI at cold start.
FROM function
