# syntax=docker/dockerfile:1
# AWS Lambda image of the streaming handler (Kinesis trigger): serve.lambda_function.lambda_handler.
#   docker build -f serve/lambda.Dockerfile -t duration-stream .
# Loads MODEL_URI through MLFLOW_TRACKING_URI at cold start (artifacts proxied by the tracking
# server). To bake a model into the image instead (no tracking server at runtime):
#   mlflow artifacts download -u models:/duration/3 -d build/model
#   docker build -f serve/lambda.Dockerfile --build-context model=build/model \
#                --build-arg MODEL_LOCATION=/opt/ml/model --build-arg MODEL_VERSION=3 \
#                -t duration-stream:3 .
# The named context "model" replaces the empty stage below; an empty MODEL_LOCATION means
# "load MODEL_URI". Set PREDICTIONS_STREAM_NAME and DEAD_LETTER_DESTINATION on the function.

# Empty unless `--build-context model=DIR` is given.
FROM scratch AS model

FROM public.ecr.aws/lambda/python:3.11

ARG MODEL_LOCATION=""
ARG MODEL_VERSION=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_URI=models:/duration@production \
    MODEL_LOCATION=${MODEL_LOCATION} \
    MODEL_VERSION=${MODEL_VERSION} \
    PREDICTIONS_STREAM_NAME=ride_predictions \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# mlflow-skinny loads pyfunc models without the server/UI dependencies of full mlflow; skops
# reads the model's state (full mlflow brings it, skinny does not).
RUN pip install --no-cache-dir \
        "mlflow-skinny==3.17.2" "scikit-learn==1.9.1" "pandas==3.1.1" "numpy==2.4.6" \
        "scipy==1.17.1" "skops==0.16.0" "boto3==1.44.8" "pydantic-settings==2.16.3" \
        "click==8.5.1"

COPY --from=model / /opt/ml/model/
COPY serve/ ${LAMBDA_TASK_ROOT}/serve/

CMD ["serve.lambda_function.lambda_handler"]
