"""Training, evaluation and inference for densekit models.

``trainer.train`` runs a whole training run into a run directory (``densekit.rundir`` says
what it holds) from a ``config.TrainConfig``; ``engine`` has the epoch and evaluation
loops; ``recipes`` every number of a recipe; ``runtime`` the one choice of device and
precision; ``inference`` uses a finished run (``evaluate_run``, ``predict``).
"""

from .config import TrainConfig
from .engine import EvalResult, evaluate
from .inference import EvalReport, Prediction, evaluate_run, predict
from .recipes import RECIPES, Recipe, get_recipe
from .runtime import Runtime, select_runtime
from .trainer import EpochEnd, Event, RunStart, TrainSummary, train

__all__ = ["RECIPES", "EvalReport", "EvalResult", "Event", "Prediction", "Recipe", "RunStart", "EpochEnd", "Runtime", "TrainConfig",
           "TrainSummary", "evaluate", "evaluate_run", "get_recipe", "predict", "select_runtime", "train"]
