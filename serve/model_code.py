"""The models-from-code file MLflow logs as the model (``python_model=`` this path).

MLflow runs this file at log and load time under a module name of its own
(``code_model_<uuid>``): it is never imported by our code. It only hands MLflow
an empty ``RideDurationModel``; MLflow then calls its ``load_context`` with the
vectorizer and estimator logged as artifacts. ``serve`` is found in the running
process or, anywhere else, in the copy of its model files logged as ``code_paths``.
"""

from mlflow.models import set_model

from serve.model import RideDurationModel

set_model(RideDurationModel())
