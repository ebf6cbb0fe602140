"""Training, evaluation and inference for densekit models.

``trainer.train`` runs a whole training run into a run directory (``checkpoint`` says
what it holds); ``engine`` has the epoch and evaluation loops; ``recipes`` every number
of a recipe; ``runtime`` the one choice of device and precision; ``inference`` uses a
finished run (``evaluate_run``, ``predict``).
"""

from .checkpoint import load_run_model
from .engine import EvalResult, evaluate
from .inference import evaluate_run, predict
from .recipes import RECIPES, Recipe, get_recipe
from .runtime import Runtime, select_runtime
from .trainer import TrainConfig, train

__all__ = ["RECIPES", "EvalResult", "Recipe", "Runtime", "TrainConfig", "evaluate", "evaluate_run",
           "get_recipe", "load_run_model", "predict", "select_runtime", "train"]
