"""The MLflow pyfunc model as code ("models from code"): `serving.log_pyfunc` logs this file
instead of a pickled object, so loading the model runs no deserialised code."""

import mlflow

from cellseg.serving import CellsegPyfunc

mlflow.models.set_model(CellsegPyfunc())
