"""The models-from-code file of a registered adapter: MLflow runs it to build the model it serves.

``icmlora register`` hands this file to ``mlflow.pyfunc.log_model(python_model=...)``; MLflow keeps
a copy beside the model and, on ``load_model`` or ``mlflow models serve``, runs it, then calls
``load_context`` with the model's artifacts (base model, adapter) and ``model_config`` (the
``predict`` params). Not imported by anything else (running it sets MLflow's current model).
"""

import mlflow

from icmlora.serving import AdapterDetector

mlflow.models.set_model(AdapterDetector())
