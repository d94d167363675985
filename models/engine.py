"""Former home of the FER workflows' shared machinery, now split by concern; re-exported here for a
short while so branches written against it keep working. Import from the modules instead:
models.modeling (model building, class lists, TrainStep), models.cli (options, device, autocast),
models.metrics (evaluation, metrics, metrics.jsonl), models.distributed, models.rng,
models.checkpoint (our checkpoints and official ones), models.plots.
"""
from .checkpoint import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    atomic_save,
    is_our_checkpoint,
    load_checkpoint_file,
    load_for_inference,
)
from .cli import AMP_DTYPES, add_checkpoint_arguments, autocast, resolve_device, run_cli  # noqa: F401
from .cli import claim_run_dir, default_workers, prog_name, write_text  # noqa: F401
from .distributed import _dist_device, cleanup_distributed, setup_distributed  # noqa: F401
from .metrics import confusion_matrix, metrics_from_confusion, read_jsonl, run_evaluation, write_jsonl  # noqa: F401
from .modeling import TrainStep, build_model, logits_of, model_classes, parse_pretrained  # noqa: F401
from .plots import plot_confusion, plot_curves  # noqa: F401
from .rng import rng_state, seed_everything, set_rng_state  # noqa: F401
